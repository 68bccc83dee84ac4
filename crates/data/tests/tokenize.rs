//! Parity with TRL 1.16: every case of `golden/tokenize.json` (made by
//! `scripts/golden_tokenize.py` from TRL's own SFTTrainer and collator) is prepared and batched by
//! nibble and compared token for token, label for label, position for position.

use std::path::{Path, PathBuf};

use data::template::ChatTemplate;
use data::{Dataset, Error, Example, TokenizeOptions, Tokenizer, nprandom, prepare_dataset, read_rows};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenize.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("golden file")).expect("golden JSON")
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-tokenize-golden-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The rows a case names: inline rows, the first rows of a file, or the synthetic text rows of
/// the golden script (`f"row {i}: " + "word " * (i % 17)`).
fn rows(source: &Value, name: &str) -> Vec<Example> {
    if let Some(file) = source.get("file").and_then(Value::as_str) {
        let take = source["take"].as_u64().expect("take") as usize;
        let mut rows = read_rows(&root().join(file), "text").expect("rows");
        rows.truncate(take);
        return rows;
    }
    if let Some(n) = source.get("synthetic").and_then(Value::as_u64) {
        return (0..n)
            .map(|i| Example::Text(format!("row {i}: {}", "word ".repeat((i % 17) as usize))))
            .collect();
    }
    let p = scratch().join(format!("{name}.jsonl"));
    let text: String = source.as_array().expect("inline rows").iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&p, text).expect("write rows");
    read_rows(&p, "text").expect("rows")
}

fn tokenizer(g: &Value, case: &Value) -> Result<Tokenizer, Error> {
    let dir = root().join("models/tiny-llama");
    let mut json: Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).expect("tokenizer.json"))
            .expect("json");
    let variant = &g["tokenizers"][case["tokenizer"].as_str().expect("tokenizer variant")];
    if let Some(pp) = variant.get("post_processor") {
        json["post_processor"] = pp.clone();
    }
    let mut cfg: Value = serde_json::from_slice(
        &std::fs::read(dir.join("tokenizer_config.json")).expect("tokenizer_config.json"),
    )
    .expect("json");
    if let Some(Value::Object(patch)) = variant.get("config") {
        cfg.as_object_mut().expect("object").extend(patch.clone());
    }
    let cfg = serde_json::to_vec(&cfg).expect("serialize");
    let bytes = serde_json::to_vec(&json).expect("serialize");
    let c = &case["config"];
    Tokenizer::from_bytes(&bytes, Some(&cfg), &dir)?
        .with_overrides(c["eos_token"].as_str(), c["pad_token"].as_str())
}

fn options(config: &Value) -> TokenizeOptions {
    let mut o = TokenizeOptions::default();
    let get = |k: &str| config.get(k);
    if let Some(v) = get("max_length") {
        o.max_length = v.as_u64().map(|n| n as usize);
    }
    if let Some(v) = get("truncation_mode") {
        o.truncation_mode = serde_json::from_value(v.clone()).expect("truncation_mode");
    }
    if let Some(v) = get("packing_strategy") {
        o.packing_strategy = serde_json::from_value(v.clone()).expect("packing_strategy");
    }
    o.packing = get("packing").and_then(Value::as_bool).unwrap_or(false);
    o.padding_free = get("padding_free").and_then(Value::as_bool).unwrap_or(false);
    o.pad_to_multiple_of = get("pad_to_multiple_of").and_then(Value::as_u64).map(|n| n as usize);
    o.completion_only_loss = get("completion_only_loss").and_then(Value::as_bool);
    o.assistant_only_loss = get("assistant_only_loss").and_then(Value::as_bool).unwrap_or(false);
    o.shuffle_dataset = get("shuffle_dataset").and_then(Value::as_bool).unwrap_or(false);
    o.seed = get("seed").and_then(Value::as_u64).unwrap_or(42);
    o.num_proc = get("dataset_num_proc").and_then(Value::as_u64).map(|n| n as usize);
    o
}

fn run(g: &Value, case: &Value) -> Result<Dataset, Error> {
    let name = case["name"].as_str().expect("name");
    let tok = tokenizer(g, case)?;
    let source = match case["template"].as_str() {
        Some("gen") => g["gen_template"].as_str().expect("gen template").to_owned(),
        _ => std::fs::read_to_string(root().join("models/tiny-llama/chat_template.jinja")).expect("template"),
    };
    let template = ChatTemplate::new(&source).expect("template compiles");
    prepare_dataset(&rows(&case["rows"], name), &tok, Some(&template), &options(&case["config"]))
}

/// The prepared samples as the golden script writes them.
fn as_json(d: &Dataset) -> Vec<Value> {
    d.samples
        .iter()
        .map(|s| {
            let mut v = json!({"input_ids": s.input_ids, "labels": s.labels});
            if let Some(l) = &s.seq_lengths {
                v["seq_lengths"] = json!(l);
            }
            v
        })
        .collect()
}

fn check_case(g: &Value, case: &Value) -> Result<(), String> {
    let got = run(g, case);
    if let Some(err) = case.get("error") {
        return match got {
            Err(_) => Ok(()),
            Ok(d) => Err(format!("TRL refuses it ({err}) but nibble prepared {} samples", d.len())),
        };
    }
    let d = got.map_err(|e| format!("nibble failed: {e}"))?;
    let want_rows = case["num_rows"].as_u64().expect("num_rows") as usize;
    if d.len() != want_rows {
        return Err(format!("{} samples, TRL has {want_rows}", d.len()));
    }
    let prepared = as_json(&d);
    if let Some(digest) = case.get("digest").and_then(Value::as_str) {
        if json!(d.num_tokens()) != case["num_tokens"] {
            return Err(format!("{} tokens, TRL has {}", d.num_tokens(), case["num_tokens"]));
        }
        let text = serde_json::to_string(&prepared).expect("serialize");
        let ours: String = Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        return if ours == digest { Ok(()) } else { Err("sample contents differ (digest)".into()) };
    }
    for (i, (ours, theirs)) in prepared.iter().zip(case["prepared"].as_array().expect("prepared")).enumerate()
    {
        if ours != theirs {
            return Err(format!("sample {i} differs:\n nibble {ours}\n    TRL {theirs}"));
        }
    }
    let batch_size = case["batch_size"].as_u64().expect("batch_size") as usize;
    let batches: Vec<_> = d.sequential_batches(batch_size).collect();
    let want = case["batches"].as_array().expect("batches");
    if batches.len() != want.len() {
        return Err(format!("{} batches, TRL has {}", batches.len(), want.len()));
    }
    for (i, (b, w)) in batches.iter().zip(want).enumerate() {
        let shape = |v: &[i64]| -> Value { json!(v.chunks(b.cols.max(1)).collect::<Vec<_>>()) };
        let mut fields = vec![("input_ids", shape(&b.input_ids)), ("labels", shape(&b.labels))];
        if w.get("position_ids").is_some() {
            fields.push(("position_ids", shape(&b.position_ids)));
        }
        if w.get("attention_mask").is_some() {
            fields.push(("attention_mask", shape(&b.attention_mask())));
        }
        for (k, ours) in fields {
            if ours != w[k] {
                return Err(format!("batch {i} {k} differs:\n nibble {ours}\n    TRL {}", w[k]));
            }
        }
        // Segments: a padding-free row restarts one at each position 0.
        if w.get("position_ids").is_some() {
            let starts =
                b.position_ids.iter().zip(&b.segment_ids).filter(|(p, s)| **p == 0 && **s >= 0).count();
            let segments = b.segment_ids.iter().copied().max().map_or(0, |m| m + 1) as usize;
            if starts != segments {
                return Err(format!("batch {i}: {starts} sequence starts but {segments} segments"));
            }
        }
    }
    Ok(())
}

#[test]
fn every_golden_case_matches_trl() {
    let g = golden();
    let cases = g["cases"].as_array().expect("cases");
    assert!(cases.len() >= 30, "the golden file lost cases");
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            check_case(&g, c).err().map(|e| format!("{}: {e}", c["name"].as_str().unwrap_or("?")))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from TRL:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_cases_cover_the_pipeline() {
    let g = golden();
    let names: Vec<&str> =
        g["cases"].as_array().expect("cases").iter().filter_map(|c| c["name"].as_str()).collect();
    for want in [
        "chat_default",
        "chat_assistant_only",
        "text_default",
        "pc_default",
        "conv_pc_assistant_only",
        "pc_trunc_keep_start",
        "pc_trunc_keep_end",
        "pack_bfd",
        "pack_bfd_split",
        "pack_wrapped",
        "padding_free_text",
        "pack_shuffle",
        "many_bfd",
    ] {
        assert!(names.contains(&want), "golden case {want} is missing");
    }
    assert_eq!(g["versions"]["trl"], "1.16.0", "goldens must come from the pinned TRL");
}

#[test]
fn numpy_permutations_match() {
    let g = golden();
    for p in g["permutations"].as_array().expect("permutations") {
        let entropy: Vec<u64> =
            p["entropy"].as_array().expect("entropy").iter().map(|v| v.as_u64().expect("u64")).collect();
        let n = p["n"].as_u64().expect("n") as usize;
        let want: Vec<usize> = p["permutation"]
            .as_array()
            .expect("perm")
            .iter()
            .map(|v| v.as_u64().expect("u64") as usize)
            .collect();
        assert_eq!(nprandom::permutation(&entropy, n), want, "default_rng({entropy:?}).permutation({n})");
    }
}

#[test]
fn golden_file_is_what_the_script_makes_now() {
    let python = std::env::var("NIBBLE_PYTHON")
        .expect("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned TRL and sets it)");
    let script = root().join("scripts/golden_tokenize.py");
    let out = std::process::Command::new(&python).arg(&script).output().expect("run the golden script");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tokenize.json"))
        .expect("golden file");
    assert!(
        out.stdout == committed,
        "crates/data/tests/golden/tokenize.json is stale; regenerate with\n  \"$NIBBLE_PYTHON\" \
         scripts/golden_tokenize.py > crates/data/tests/golden/tokenize.json"
    );
}
