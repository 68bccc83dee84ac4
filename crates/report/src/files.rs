//! Writing a run's files so that a crash never leaves half a file: each goes to a temporary name
//! in the same folder and is renamed into place. Also the tokenizer copy and transformers'
//! `*_results.json` layout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ReportError;

/// Tokenizer files `trainer.save_model` leaves next to an adapter (through the tokenizer's
/// `save_pretrained`), copied when the model folder has them.
pub const TOKENIZER_FILES: [&str; 4] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Write `bytes` to `path` atomically (quant's one atomic writer: temporary file, sync, rename;
/// nothing left behind on failure).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    pyfiles::write_atomic(path, bytes).map_err(ReportError::io("writing", path))
}

/// Copy the tokenizer files of `model_dir` that exist into `output_dir` (atomically), as
/// `trainer.save_model` saves the tokenizer with the adapter so the folder loads on its own.
/// Returns the files written.
pub fn copy_tokenizer_files(model_dir: &Path, output_dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(output_dir).map_err(ReportError::io("creating", output_dir))?;
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let src = model_dir.join(name);
        if !src.is_file() {
            continue;
        }
        let bytes = std::fs::read(&src).map_err(ReportError::io("reading", &src))?;
        let dst = output_dir.join(name);
        write_atomic(&dst, &bytes)?;
        copied.push(dst);
    }
    Ok(copied)
}

/// JSON as Python's `json.dump(value, indent=4, sort_keys=True)` writes it (transformers'
/// `save_metrics`): Python's float repr and `ensure_ascii` escapes.
pub fn json_sorted(value: &BTreeMap<String, serde_json::Value>) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> =
        value.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    pyfiles::json::Dumps::SORTED_4.dumps(&serde_json::Value::Object(map)).into_bytes()
}

/// `Trainer.save_metrics(split, metrics)`: `<split>_results.json`, and the same keys merged into
/// `all_results.json` (keeping what an earlier call put there).
pub fn save_metrics(
    output_dir: &Path,
    split: &str,
    metrics: &BTreeMap<String, serde_json::Value>,
) -> Result<Vec<PathBuf>, ReportError> {
    let path = output_dir.join(format!("{split}_results.json"));
    write_atomic(&path, &json_sorted(metrics))?;
    let all = output_dir.join("all_results.json");
    let mut merged: BTreeMap<String, serde_json::Value> = match std::fs::read(&all) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ReportError::Json {
            path: all.clone(),
            line: None,
            source,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(ReportError::io("reading", &all)(e)),
    };
    merged.extend(metrics.iter().map(|(k, v)| (k.clone(), v.clone())));
    write_atomic(&all, &json_sorted(&merged))?;
    Ok(vec![path, all])
}
