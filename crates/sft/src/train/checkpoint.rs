//! Checkpoints as transformers lays them out (`<output_dir>/checkpoint-<step>/` with the adapter
//! files, optimizer state and `trainer_state.json` in TrainerState's shape, `state.rs`), written
//! into a temporary directory and renamed into place, so an interrupted save never leaves a
//! half-written checkpoint.

use crate::Error;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{AdamW, Progress};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::CheckpointIo { path: path.to_owned(), source }
}

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

/// A checkpoint directory's contents.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Where the run stood.
    pub progress: Progress,
    /// Optimizer moments by name.
    pub optimizer: Vec<(String, Tensor)>,
    /// Optimizer steps taken.
    pub optimizer_step: u64,
}

impl Checkpoint {
    /// Write `checkpoint-<step>` under `output_dir`; `save_adapter(dir)` writes the adapter files.
    pub fn save(
        output_dir: &Path,
        progress: &Progress,
        optimizer: &AdamW,
        info: &super::state::StateInfo,
        save_adapter: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, Error> {
        let name = format!("checkpoint-{}", progress.global_step);
        let dest = output_dir.join(&name);
        let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        save_adapter(&tmp).map_err(|message| Error::BadCheckpoint { path: tmp.clone(), message })?;
        let (tensors, step) = optimizer.state();
        let opt_path = tmp.join(OPTIMIZER);
        // Written from host memory (the moments live on the model's device).
        let host: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(n, t)| Ok((n.as_str(), t.f_to_device(tch::Device::Cpu)?)))
            .collect::<Result<_, tch::TchError>>()
            .map_err(|e| Error::BadCheckpoint { path: opt_path.clone(), message: e.to_string() })?;
        let named: Vec<(&str, &Tensor)> = host.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_safetensors(&named, &opt_path)
            .map_err(|e| Error::BadCheckpoint { path: opt_path.clone(), message: e.to_string() })?;
        // libtorch writes without syncing: flush it before the folder is renamed into place.
        std::fs::File::open(&opt_path).and_then(|f| f.sync_all()).map_err(io(&opt_path))?;
        // transformers' TrainerState shape, nibble's resume fields in a callback entry of their own.
        let state = super::state::to_json(progress, info, Some(step));
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        pyfiles::write_atomic(&tmp.join(STATE), text.as_bytes()).map_err(io(&tmp.join(STATE)))?;
        // Every entry on disk before the folder gets its real name, and the name before we go on.
        pyfiles::atomic::sync_dir(&tmp).map_err(io(&tmp))?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        pyfiles::atomic::sync_dir(output_dir).map_err(io(output_dir))?;
        tracing::info!(checkpoint = %dest.display(), "saved checkpoint");
        Ok(dest)
    }

    /// Read a checkpoint directory written by [`Checkpoint::save`].
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let state_path = dir.join(STATE);
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let bad = |message: String| Error::BadCheckpoint { path: state_path.clone(), message };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (progress, optimizer_step) = super::state::from_json(&value).map_err(bad)?;
        let optimizer_step = optimizer_step.ok_or_else(|| bad("no `optimizer_step`".into()))?;
        let opt_path = dir.join(OPTIMIZER);
        let optimizer = Tensor::read_safetensors(&opt_path)
            .map_err(|e| Error::BadCheckpoint { path: opt_path.clone(), message: e.to_string() })?;
        Ok(Checkpoint { dir: dir.to_owned(), progress, optimizer, optimizer_step })
    }
}

/// Checkpoint directories under `output_dir`, oldest step first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io(output_dir))?;
        let name = e.file_name();
        if let Some(step) =
            name.to_str().and_then(|n| n.strip_prefix("checkpoint-")).and_then(|s| s.parse().ok())
            && e.path().join(STATE).is_file()
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `output_dir`, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(list(output_dir)?.pop().map(|(_, p)| p))
}

/// Delete the oldest checkpoints beyond `limit`, as transformers' `rotate_checkpoints`: the newest
/// (to resume from) and `best` (`best_model_checkpoint`) are never deleted, and the limit grows to
/// keep both.
pub fn rotate(output_dir: &Path, limit: Option<usize>, best: Option<&Path>) -> Result<(), Error> {
    let Some(limit) = limit.filter(|l| *l > 0) else { return Ok(()) };
    let all: Vec<PathBuf> = list(output_dir)?.into_iter().map(|(_, p)| p).collect();
    if all.len() <= limit {
        return Ok(());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let newest = all.last().cloned().unwrap_or_default();
    let protected = |p: &Path| same(p, &newest) || best.is_some_and(|b| same(p, b));
    let kept = 1 + usize::from(best.is_some_and(|b| all.iter().any(|p| same(p, b)) && !same(b, &newest)));
    let keep = limit.max(kept);
    let mut remaining = all.len();
    for dir in &all {
        if remaining <= keep {
            break;
        }
        if protected(dir) {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
        tracing::info!(checkpoint = %dir.display(), "removed old checkpoint (save_total_limit)");
        remaining -= 1;
    }
    Ok(())
}
