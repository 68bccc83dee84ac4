//! Data sources against `datasets` 5.2: every case of `golden/sources/expected.json` (made by
//! `scripts/golden_sources.py` with `datasets`, pyarrow and the alignment-handbook's mixture code)
//! is resolved and read by nibble and compared split by split, file by file, row by row; plus the
//! errors a user meets (a dataset not in the cache, a missing split, a corrupt file).

use std::path::{Path, PathBuf};

use config::types::DatasetMixture;
use data::source::{hub_snapshot, parse_split_spec};
use data::{
    DataPlan, Error, Example, load_mixture, load_rows, load_training_data, resolve_dataset,
    train_test_split_indices,
};
use pyfiles::HubCache;
use serde_json::Value;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/sources")
}

fn expected() -> Value {
    let p = golden_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("golden file")).expect("golden JSON")
}

fn hub() -> HubCache {
    HubCache { path: golden_dir().join("hub") }
}

/// The golden script runs from the golden folder: local ids are relative to it.
fn id(raw: &str) -> String {
    if raw.starts_with("nibble-test/") {
        raw.to_owned()
    } else {
        golden_dir().join(raw).display().to_string()
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-sources-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().expect("row object").keys().map(String::as_str).collect()
}

/// Rows equal as JSON and with their columns in the same order.
fn assert_rows(got: &[Value], want: &Value, what: &str) {
    let want = want.as_array().expect("rows");
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "{what}: row {i}");
        assert_eq!(keys(g), keys(w), "{what}: row {i} column order");
    }
}

#[test]
fn splits_and_files_are_those_datasets_resolves() {
    let g = expected();
    for case in g["splits"].as_array().expect("splits") {
        let raw = case["id"].as_str().expect("id");
        let config = case["config"].as_str();
        let files = resolve_dataset(&id(raw), config, &hub()).expect("resolves");
        let got: Vec<(String, Vec<String>)> = files
            .splits
            .iter()
            .map(|s| {
                let rel = s
                    .files
                    .iter()
                    .map(|f| f.strip_prefix(&files.root).expect("inside root").display().to_string())
                    .collect();
                (s.name.clone(), rel)
            })
            .collect();
        let want: Vec<(String, Vec<String>)> = case["splits"]
            .as_object()
            .expect("split map")
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_array()
                        .expect("files")
                        .iter()
                        .map(|f| f.as_str().expect("path").to_owned())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(got, want, "{raw} (config {config:?})");
    }
}

#[test]
fn rows_are_those_datasets_loads() {
    let g = expected();
    for case in g["loads"].as_array().expect("loads") {
        let (raw, config, split) = (
            case["id"].as_str().expect("id"),
            case["config"].as_str(),
            case["split"].as_str().expect("split"),
        );
        let rows =
            load_rows(&id(raw), config, split, &hub()).unwrap_or_else(|e| panic!("{raw} {split}: {e}"));
        let what = format!("{raw} (config {config:?}) split {split}");
        let cols: Vec<String> = case["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c.as_str().expect("name").into())
            .collect();
        if !rows.is_empty() {
            assert_eq!(rows.columns(), cols, "{what}: columns");
        }
        assert_rows(&rows.values, &case["rows"], &what);
        assert_eq!(rows.origins.len(), rows.len());
    }
}

#[test]
fn mixtures_are_the_handbooks() {
    let g = expected();
    for case in g["mixtures"].as_array().expect("mixtures") {
        let mut spec = case["mixture"].clone();
        for d in spec["datasets"].as_array_mut().expect("datasets") {
            let raw = d["id"].as_str().expect("id").to_owned();
            d["id"] = Value::String(id(&raw));
        }
        let mix: DatasetMixture = serde_json::from_value(spec).expect("a DatasetMixture");
        let got = load_mixture(&mix, &hub()).unwrap_or_else(|e| panic!("{:?}: {e}", case["mixture"]));
        let what = format!("mixture {}", case["mixture"]);
        assert_rows(&got.train.values, &case["result"]["train"], &format!("{what}: train"));
        match (&got.test, case["result"].get("test")) {
            (Some(t), Some(want)) => assert_rows(&t.values, want, &format!("{what}: test")),
            (None, None) => {}
            (got, want) => panic!("{what}: test split {} vs {}", got.is_some(), want.is_some()),
        }
    }
}

#[test]
fn train_test_split_indices_are_datasets() {
    let g = expected();
    let ints = |v: &Value| -> Vec<usize> {
        v.as_array().expect("ints").iter().map(|x| x.as_u64().expect("index") as usize).collect()
    };
    for case in g["split_indices"].as_array().expect("cases") {
        let n = case["n"].as_u64().expect("n") as usize;
        let size = case["test_size"].as_f64().expect("size");
        let seed = case["seed"].as_u64().expect("seed");
        let (train, test) = train_test_split_indices(n, size, seed).expect("splits");
        assert_eq!(train, ints(&case["train"]), "n={n} test_size={size} seed={seed}: train");
        assert_eq!(test, ints(&case["test"]), "n={n} test_size={size} seed={seed}: test");
    }
}

fn recipe(yaml: &str) -> config::Recipe {
    config::Loader::new().yaml("recipe.yaml", yaml).load().unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

#[test]
fn a_recipe_mixture_gives_train_and_eval_examples() {
    let g = expected();
    let case = &g["mixtures"][1];
    let chat = id("files/chat.parquet");
    let yaml = format!(
        "model_name_or_path: m\neval_strategy: steps\neval_steps: 10\ndataset_mixture:\n  seed: 42\n  test_split_size: 0.2\n  datasets:\n\
         \x20   - {{id: {chat}, columns: [messages], weight: 0.5}}\n\
         \x20   - {{id: nibble-test/chat-mix, split: train_sft, columns: [messages], weight: 0.75}}\n\
         \x20   - {{id: nibble-test/chat-mix, split: test_sft, columns: [messages]}}\n"
    );
    let r = recipe(&yaml);
    let data = load_training_data(&r, &hub()).expect("loads");
    let want_train = case["result"]["train"].as_array().expect("rows");
    let want_test = case["result"]["test"].as_array().expect("rows");
    assert_eq!(data.train.len(), want_train.len());
    assert_eq!(data.eval.as_ref().map(Vec::len), Some(want_test.len()));
    // The first training row is the golden's first row, as a conversation.
    let Example::Conversation { messages, .. } = &data.train[0] else { panic!("a conversation") };
    let want_msgs = want_train[0]["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), want_msgs.len());
    assert_eq!(messages[0].content, want_msgs[0]["content"]);

    // Fingerprints: stable, distinct for train and eval, and sensitive to every setting.
    let plan = DataPlan::from_recipe(&r, &hub()).expect("plan");
    assert_eq!(plan.train_fingerprint(), data.train_fingerprint);
    assert_eq!(
        DataPlan::from_recipe(&r, &hub()).expect("plan").train_fingerprint(),
        plan.train_fingerprint()
    );
    assert_ne!(Some(plan.train_fingerprint()), plan.eval_fingerprint());
    for (from, to) in [
        ("weight: 0.5", "weight: 0.6"),
        ("seed: 42", "seed: 43"),
        ("0.2", "0.25"),
        ("[messages], weight: 0.75", "[messages], weight: 0.7"),
    ] {
        let other = DataPlan::from_recipe(&recipe(&yaml.replacen(from, to, 1)), &hub()).expect("plan");
        assert_ne!(other.train_fingerprint(), plan.train_fingerprint(), "{from} -> {to}");
    }
    // Without evaluation, no eval rows.
    let no_eval = recipe(&yaml.replace("eval_strategy: steps\neval_steps: 10\n", ""));
    let data = load_training_data(&no_eval, &hub()).expect("loads");
    assert!(data.eval.is_none() && data.eval_fingerprint.is_none());
    assert_eq!(data.train.len(), want_train.len());
}

#[test]
fn dataset_name_uses_the_train_and_test_splits() {
    let r = recipe(
        "model_name_or_path: m\ndataset_name: nibble-test/chat-mix\ndataset_train_split: train_sft\n\
         dataset_test_split: test_sft\neval_strategy: epoch\n",
    );
    let data = load_training_data(&r, &hub()).expect("loads");
    assert_eq!((data.train.len(), data.eval.as_ref().map(Vec::len)), (12, Some(4)));
    // The explicit `default` config of the README is the same data.
    let r2 = recipe(
        "model_name_or_path: m\ndataset_name: nibble-test/chat-mix\ndataset_config: default\n\
         dataset_train_split: train_sft\ndataset_test_split: test_sft\neval_strategy: epoch\n",
    );
    assert_eq!(load_training_data(&r2, &hub()).expect("loads"), data);
    // A local file is one split, `train`; it is the golden's rows, as prompt/completion.
    let pc = id("files/pc.parquet");
    let data = load_training_data(&recipe(&format!("model_name_or_path: m\ndataset_name: {pc}\n")), &hub())
        .expect("loads");
    assert_eq!(data.train.len(), 17);
    assert_eq!(
        data.train[0],
        Example::PromptCompletion { prompt: "pc prompt 0".into(), completion: " pc completion 0".into() }
    );
    let e = load_training_data(
        &recipe(&format!("model_name_or_path: m\ndataset_name: {pc}\neval_strategy: steps\neval_steps: 5\n")),
        &hub(),
    )
    .expect_err("a single file has no test split");
    assert!(
        matches!(&e, Error::NoSplit { split, available, .. } if split == "test" && available == &["train"]),
        "{e}"
    );
}

#[test]
fn a_dataset_not_in_the_cache_names_the_folder_searched() {
    let empty = scratch("empty-hub");
    let cache = HubCache { path: empty.clone() };
    let r = recipe(
        "model_name_or_path: m\ndataset_mixture:\n  datasets:\n    - {id: org/absent, split: train_sft}\n",
    );
    let e = load_training_data(&r, &cache).expect_err("not cached");
    let msg = e.to_string();
    let folder = empty.join("datasets--org--absent");
    assert!(matches!(&e, Error::NotInCache { searched, .. } if *searched == folder), "{e}");
    for part in ["`org/absent`", "split `train_sft`", folder.to_str().expect("utf-8"), "never downloads"] {
        assert!(msg.contains(part), "{msg} lacks {part}");
    }
    // A folder without refs/main, or whose ref names no snapshot, is not cached either.
    std::fs::create_dir_all(folder.join("refs")).expect("mkdir");
    assert!(matches!(hub_snapshot("org/absent", &cache), Err(Error::NotInCache { .. })));
    std::fs::write(folder.join("refs/main"), "abc\n").expect("write");
    assert!(matches!(hub_snapshot("org/absent", &cache), Err(Error::NotInCache { .. })));
    std::fs::create_dir_all(folder.join("snapshots/abc")).expect("mkdir");
    assert_eq!(hub_snapshot("org/absent", &cache).expect("found"), folder.join("snapshots/abc"));
    // A path-like id that does not exist is not looked up in the hub.
    let e = resolve_dataset("./no/such/dir", None, &cache).expect_err("missing");
    assert!(matches!(e, Error::NoSuchPath { .. }), "{e}");
}

#[test]
fn missing_splits_configs_and_columns_are_named() {
    let e = load_rows("nibble-test/chat-mix", None, "train", &hub()).expect_err("no train split");
    let msg = e.to_string();
    assert!(msg.contains("no split `train`") && msg.contains("train_sft, test_sft"), "{msg}");
    let e = load_rows("nibble-test/chat-mix", Some("nope"), "train", &hub()).expect_err("no config");
    assert!(matches!(&e, Error::NoConfig { available, .. } if available == &["default", "alt"]), "{e}");
    let e = load_rows(&id("dir_sharded"), None, "train[:200%]", &hub()).expect_err("bad slice");
    assert!(matches!(e, Error::SplitSpec { .. }), "{e}");
    // No README: a config is a folder of the snapshot (nibble's reading of the hub's layout).
    let rows = load_rows("nibble-test/bare", Some("cfg2"), "train", &hub()).expect("config folder");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.values[0]["prompt"], "cfg2 prompt 0");
    let e = load_rows("nibble-test/bare", Some("cfg3"), "train", &hub()).expect_err("no such folder");
    assert!(matches!(&e, Error::NoConfig { available, .. } if available.contains(&"cfg2".to_owned())), "{e}");
    // Columns the dataset lacks.
    let mix: DatasetMixture = serde_json::from_value(serde_json::json!({
        "datasets": [{"id": id("files/pc.parquet"), "columns": ["prompt", "messages"]}]
    }))
    .expect("mixture");
    let e = load_mixture(&mix, &hub()).expect_err("no messages column");
    assert!(matches!(&e, Error::Columns { missing, .. } if missing == &["messages"]), "{e}");
    // Several configs and none marked default.
    let d = scratch("two-configs");
    std::fs::write(
        d.join("README.md"),
        "---\nconfigs:\n- config_name: a\n  data_files: a.jsonl\n- config_name: b\n  data_files:\n  - split: train\n    \
         path: b.jsonl\n  - split: test\n    path: a.jsonl\n- config_name: c\n  data_files: c/*.jsonl\n---\n",
    )
    .expect("write");
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"a\"}\n").expect("write");
    let e = resolve_dataset(d.to_str().expect("utf-8"), None, &hub()).expect_err("which config?");
    assert!(matches!(&e, Error::ConfigMissing { available, .. } if available == &["a", "b", "c"]), "{e}");
    let e = resolve_dataset(d.to_str().expect("utf-8"), Some("c"), &hub()).expect_err("no files at all");
    assert!(matches!(e, Error::Empty { .. }) && e.to_string().contains("c/*.jsonl"), "{e}");
    let files = resolve_dataset(d.to_str().expect("utf-8"), Some("b"), &hub()).expect("resolves");
    let e = files.split("train").expect_err("b.jsonl is not there");
    assert!(matches!(e, Error::SplitWithoutFiles { .. }), "{e}");
}

#[test]
fn unreadable_data_names_the_file_and_row() {
    let d = scratch("corrupt");
    let bad = d.join("train.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet PAR1").expect("write");
    let e = load_rows(bad.to_str().expect("utf-8"), None, "train", &hub()).expect_err("corrupt");
    assert!(matches!(&e, Error::Parquet { path, .. } if *path == bad), "{e}");
    assert!(e.to_string().contains(bad.to_str().expect("utf-8")), "{e}");
    // A truncated copy of a real file.
    let good = std::fs::read(golden_dir().join("files/chat.parquet")).expect("read");
    std::fs::write(&bad, &good[..good.len() / 2]).expect("write");
    assert!(matches!(
        load_rows(bad.to_str().expect("utf-8"), None, "train", &hub()),
        Err(Error::Parquet { .. })
    ));
    // JSON: the line at fault.
    let j = d.join("rows.jsonl");
    std::fs::write(&j, "{\"text\": \"a\"}\n\n{\"text\": \n").expect("write");
    let e = load_rows(j.to_str().expect("utf-8"), None, "train", &hub()).expect_err("bad JSON");
    assert!(e.to_string().contains("rows.jsonl: row 3"), "{e}");
    // A row that fits no format: named by file and row, after shuffling too.
    std::fs::write(&j, "{\"text\": \"a\"}\n{\"text\": 1}\n").expect("write");
    let r = recipe(&format!(
        "model_name_or_path: m\ndataset_mixture:\n  seed: 3\n  datasets:\n    - {{id: {}}}\n",
        j.display()
    ));
    let e = load_training_data(&r, &hub()).expect_err("row 2 fits no format");
    assert!(e.to_string().contains("rows.jsonl: row 2: `text` must be a string"), "{e}");
    // Formats nibble does not read.
    let csv = d.join("x.csv");
    std::fs::write(&csv, "a,b\n1,2\n").expect("write");
    assert!(matches!(
        resolve_dataset(csv.to_str().expect("utf-8"), None, &hub()),
        Err(Error::Unsupported { .. })
    ));
    let dir = scratch("csv-dir");
    std::fs::write(dir.join("train.csv"), "a,b\n1,2\n").expect("write");
    assert!(matches!(
        resolve_dataset(dir.to_str().expect("utf-8"), None, &hub()),
        Err(Error::Unsupported { .. })
    ));
    let empty = scratch("no-data");
    assert!(matches!(
        resolve_dataset(empty.to_str().expect("utf-8"), None, &hub()),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn fingerprints_follow_file_bytes() {
    let d = scratch("fingerprint");
    let f = d.join("train.jsonl");
    std::fs::write(&f, "{\"text\": \"a\"}\n").expect("write");
    let r = recipe(&format!("model_name_or_path: m\ndataset_name: {}\n", d.display()));
    let a = DataPlan::from_recipe(&r, &hub()).expect("plan").train_fingerprint();
    std::fs::write(&f, "{\"text\": \"b\"}\n").expect("write");
    let b = DataPlan::from_recipe(&r, &hub()).expect("plan").train_fingerprint();
    assert_ne!(a, b);
    // A test file does not change the training key.
    std::fs::write(d.join("test.jsonl"), "{\"text\": \"t\"}\n").expect("write");
    assert_eq!(DataPlan::from_recipe(&r, &hub()).expect("plan").train_fingerprint(), b);
    assert_eq!(parse_split_spec("train").expect("spec").len(), 1);
}

/// Every file under a folder: relative path -> bytes (a symlink by its target).
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(root).expect("inside").display().to_string();
            let meta = std::fs::symlink_metadata(&p).expect("metadata");
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).expect("link");
                out.push((rel, format!("-> {}", target.display()).into_bytes()));
            } else if meta.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn golden_files_are_what_the_script_makes_now() {
    let python = std::env::var("NIBBLE_PYTHON").expect(
        "NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned datasets and sets it)",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = scratch("regenerated").join("sources");
    let run = std::process::Command::new(&python)
        .arg(root.join("scripts/golden_sources.py"))
        .arg(&out)
        .output()
        .expect("run the golden script");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (now, committed) = (tree(&out), tree(&golden_dir()));
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&now), names(&committed), "golden file list is stale");
    for ((name, a), (_, b)) in now.iter().zip(&committed) {
        assert!(
            a == b,
            "crates/data/tests/golden/sources/{name} is stale; regenerate with\n  \"$NIBBLE_PYTHON\" \
             scripts/golden_sources.py crates/data/tests/golden/sources"
        );
    }
}
