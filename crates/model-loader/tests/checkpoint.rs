//! Checkpoints on disk: single and sharded safetensors read memory-mapped, and every kind of
//! corrupt input reported with the file and tensor at fault.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model_loader::{Checkpoint, Error, HfConfig};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch");
    d
}

/// Re-save the tiny model as `n` shards with an index, as transformers does for large models.
fn shard_tiny(dir: &Path, n: usize) {
    let single = Checkpoint::open(&tiny()).expect("tiny");
    let names: Vec<String> = single.names().map(str::to_owned).collect();
    let mut weight_map = BTreeMap::new();
    for (k, chunk) in names.chunks(names.len().div_ceil(n)).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = chunk
            .iter()
            .map(|name| {
                let t = single.tensor(name).expect("tensor");
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(t.dtype, t.shape.to_vec(), t.data).expect("view"),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).expect("write shard");
        for name in chunk {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    std::fs::copy(tiny().join("config.json"), dir.join("config.json")).expect("config");
}

#[test]
fn single_file_checkpoint_matches_its_config() {
    let c = Checkpoint::open(&tiny()).expect("open");
    let cfg = HfConfig::from_dir(&tiny()).expect("config");
    c.check_against(&cfg).expect("shapes fit");
    let e = c.tensor("model.embed_tokens.weight").expect("embed");
    assert_eq!(e.shape, [226, 64]);
    assert_eq!(e.data.len(), 226 * 64 * 4);
    assert_eq!(c.shard_count(), 1);
}

#[test]
fn sharded_checkpoint_gives_the_same_bytes() {
    let dir = scratch("sharded");
    shard_tiny(&dir, 3);
    let sharded = Checkpoint::open(&dir).expect("open sharded");
    let single = Checkpoint::open(&tiny()).expect("open single");
    assert_eq!(sharded.shard_count(), 3);
    assert_eq!(sharded.names().collect::<Vec<_>>(), single.names().collect::<Vec<_>>());
    for name in single.names() {
        let (a, b) = (single.tensor(name).expect("a"), sharded.tensor(name).expect("b"));
        assert_eq!((a.shape, a.data), (b.shape, b.data), "{name}");
    }
    sharded.check_against(&HfConfig::from_dir(&dir).expect("config")).expect("fits");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_shard_is_named() {
    let dir = scratch("missing");
    shard_tiny(&dir, 2);
    let gone = dir.join("model-00002-of-00002.safetensors");
    std::fs::remove_file(&gone).expect("remove");
    match Checkpoint::open(&dir) {
        Err(Error::MissingShard { shard, .. }) => assert_eq!(shard, gone),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_files_and_header_overflow_name_the_file() {
    let dir = scratch("corrupt");
    let bytes = std::fs::read(tiny().join("model.safetensors")).expect("read");
    let path = dir.join("model.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("truncated");
    let e = Checkpoint::open(&dir).expect_err("truncated").to_string();
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
    let mut overflow = bytes.clone();
    overflow[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &overflow).expect("overflow");
    let e = Checkpoint::open(&dir).expect_err("overflow").to_string();
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
    std::fs::write(&path, b"nope").expect("tiny file");
    assert!(Checkpoint::open(&dir).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shapes_that_do_not_fit_config_name_the_tensor() {
    let c = Checkpoint::open(&tiny()).expect("open");
    let mut cfg = HfConfig::from_dir(&tiny()).expect("config");
    cfg.shape.intermediate = 128;
    let e = c.check_against(&cfg).expect_err("mismatch").to_string();
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[160, 64]")
            && e.contains("[128, 64]"),
        "{e}"
    );
    cfg.shape.intermediate = 160;
    cfg.shape.layers = 3;
    let e = c.check_against(&cfg).expect_err("missing layer");
    assert!(matches!(e, Error::MissingTensor { ref name, .. } if name.starts_with("model.layers.2.")), "{e}");
}

#[test]
fn an_index_pointing_at_the_wrong_shard_is_an_error() {
    let dir = scratch("badindex");
    shard_tiny(&dir, 2);
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).expect("read")).expect("json");
    index["weight_map"]["lm_head.weight"] = serde_json::json!("model-00001-of-00002.safetensors");
    index["weight_map"]["model.embed_tokens.weight"] = serde_json::json!("model-00002-of-00002.safetensors");
    std::fs::write(&index_path, index.to_string()).expect("write");
    let e = Checkpoint::open(&dir).expect_err("wrong shard").to_string();
    assert!(e.contains("the index puts tensor"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resident file-backed pages of this process, KiB (Linux).
fn rss_file_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssFile:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn released_pages_leave_the_process_but_not_the_data() {
    let dir = scratch("release");
    // 16 MiB of a known pattern, between two small tensors (so the release is mid-file).
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let small = vec![7u8; 4 * 3];
    fn view(data: &[u8], n: usize) -> safetensors::tensor::TensorView<'_> {
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n], data).expect("view")
    }
    let tensors = vec![
        ("a".to_owned(), view(&small, 3)),
        ("big".to_owned(), view(&big, big.len() / 4)),
        ("z".to_owned(), view(&small, 3)),
    ];
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).expect("write");
    let c = Checkpoint::open(&dir).expect("open");
    let sum = |d: &[u8]| d.iter().map(|&b| u64::from(b)).sum::<u64>();
    let want = sum(&big);
    assert_eq!(sum(c.tensor("big").expect("big").data), want);
    let before = rss_file_kib();
    c.release("big");
    let after = rss_file_kib();
    if let (Some(before), Some(after)) = (before, after) {
        assert!(before >= after + 8 * 1024, "RssFile {before} KiB -> {after} KiB after releasing 16 MiB");
    }
    // Reading again faults the same bytes back in; the neighbours are untouched.
    assert_eq!(sum(c.tensor("big").expect("big").data), want);
    assert_eq!(c.tensor("a").expect("a").data, &small[..]);
    assert_eq!(c.tensor("z").expect("z").data, &small[..]);
    c.release("no such tensor");
}
