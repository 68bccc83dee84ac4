//! The tokenization cache as a run uses it: the first run writes it, the second loads it, a
//! damaged file is rebuilt, and anything that changes the samples changes the key. Also the
//! options as a recipe sets them.

use std::path::{Path, PathBuf};

use data::{CacheOutcome, Error, TokenizeOptions, Tokenizer, load_or_prepare};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-tokenize-cache-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn tiny() -> Tokenizer {
    Tokenizer::from_dir(&root().join("models/tiny-llama")).expect("tokenizer")
}

fn template() -> String {
    std::fs::read_to_string(root().join("models/tiny-llama/chat_template.jinja")).expect("template")
}

#[test]
fn second_run_loads_the_cache_and_damage_is_rebuilt() {
    let cache = scratch("hit");
    let data = root().join("data/tiny-chat.jsonl");
    let opts = TokenizeOptions { packing: true, max_length: Some(128), ..TokenizeOptions::default() };
    let tmpl = template();
    let (first, outcome) =
        load_or_prepare(&data, &tiny(), Some(&tmpl), &opts, Some(&cache)).expect("prepares");
    let CacheOutcome::Written(path) = outcome else {
        panic!("first run should write the cache, got {outcome:?}")
    };
    assert!(path.starts_with(&cache));
    let (second, outcome) = load_or_prepare(&data, &tiny(), Some(&tmpl), &opts, Some(&cache)).expect("loads");
    assert_eq!(outcome, CacheOutcome::Hit(path.clone()));
    assert_eq!(first, second);

    // A damaged cache is ignored and written again.
    let mut bytes = std::fs::read(&path).expect("cache file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).expect("damage");
    let (third, outcome) =
        load_or_prepare(&data, &tiny(), Some(&tmpl), &opts, Some(&cache)).expect("rebuilds");
    assert_eq!(outcome, CacheOutcome::Written(path.clone()));
    assert_eq!(first, third);
    std::fs::write(&path, b"garbage").expect("damage");
    let (_, outcome) = load_or_prepare(&data, &tiny(), Some(&tmpl), &opts, Some(&cache)).expect("rebuilds");
    assert_eq!(outcome, CacheOutcome::Written(path.clone()));

    // Batching settings are not part of the key, but still apply to what is loaded.
    let wrapped_free = TokenizeOptions { pad_to_multiple_of: Some(64), ..opts.clone() };
    let (d, outcome) =
        load_or_prepare(&data, &tiny(), Some(&tmpl), &wrapped_free, Some(&cache)).expect("loads");
    assert_eq!(outcome, CacheOutcome::Hit(path));
    assert_eq!(d.collate.pad_to_multiple_of, Some(64));

    // Only the cache file is left in the directory (no temporary files).
    let names: Vec<_> =
        std::fs::read_dir(&cache).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn inputs_that_change_the_samples_change_the_file() {
    let cache = scratch("keys");
    let data = root().join("data/tiny-chat.jsonl");
    let tmpl = template();
    let base = TokenizeOptions::default();
    let path = |tok: &Tokenizer, t: &str, o: &TokenizeOptions| match load_or_prepare(
        &data,
        tok,
        Some(t),
        o,
        Some(&cache),
    )
    .expect("prepares")
    .1
    {
        CacheOutcome::Written(p) | CacheOutcome::Hit(p) => p,
        CacheOutcome::NotCached => panic!("not cached"),
    };
    let p0 = path(&tiny(), &tmpl, &base);
    assert_eq!(p0, path(&tiny(), &tmpl, &base));
    assert_ne!(p0, path(&tiny(), &tmpl, &TokenizeOptions { max_length: Some(16), ..base.clone() }));
    assert_ne!(p0, path(&tiny(), &format!("{tmpl}{{{{ '' }}}}"), &base));
    let tok = tiny().with_overrides(Some("</s>"), None).expect("override");
    assert_ne!(p0, path(&tok, &tmpl, &base));

    // A changed data file too.
    let copy = cache.join("copy.jsonl");
    let mut text = std::fs::read_to_string(&data).expect("data");
    std::fs::write(&copy, &text).expect("copy");
    let (_, a) = load_or_prepare(&copy, &tiny(), Some(&tmpl), &base, Some(&cache)).expect("prepares");
    assert_eq!(a, CacheOutcome::Hit(p0.clone()), "the key follows the bytes, not the file name");
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n");
    std::fs::write(&copy, &text).expect("grow");
    let (d, b) = load_or_prepare(&copy, &tiny(), Some(&tmpl), &base, Some(&cache)).expect("prepares");
    assert!(matches!(b, CacheOutcome::Written(ref p) if *p != p0), "{b:?}");
    assert_eq!(d.len(), 241);
}

#[test]
fn without_a_cache_dir_nothing_is_written() {
    let data = root().join("data/tiny-chat.jsonl");
    let (d, outcome) = load_or_prepare(&data, &tiny(), Some(&template()), &TokenizeOptions::default(), None)
        .expect("prepares");
    assert_eq!(outcome, CacheOutcome::NotCached);
    assert_eq!(d.len(), 240);
}

#[test]
fn row_errors_name_the_file_and_row() {
    let dir = scratch("rows");
    let data = dir.join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n",
    )
    .expect("write");
    let generation = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}\
               {% else %}{{ m.content }}{% endif %}{% endfor %}";
    let opts = TokenizeOptions { assistant_only_loss: true, ..TokenizeOptions::default() };
    let e =
        load_or_prepare(&data, &tiny(), Some(generation), &opts, None).expect_err("row 2 has no assistant");
    assert!(matches!(e, Error::Row { row: 2, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("bad.jsonl: row 2:") && msg.contains("assistant"), "{msg}");

    let e = load_or_prepare(&dir.join("missing.jsonl"), &tiny(), None, &opts, None).expect_err("no file");
    assert!(e.to_string().contains("missing.jsonl"), "{e}");
    let e = load_or_prepare(&data, &tiny(), Some("{% if %}"), &opts, None).expect_err("bad template");
    assert!(matches!(e, Error::TemplateCompile(_) | Error::TemplateRender(_)), "{e:?}");
}

#[test]
fn options_follow_the_recipe() {
    let yaml = "model_name_or_path: m\ndataset_name: d\nmax_length: 256\npacking: true\npacking_strategy: wrapped\n\
                pad_to_multiple_of: 8\nassistant_only_loss: true\nshuffle_dataset: true\nseed: 3\n\
                dataset_num_proc: 2\neval_packing: false\ndataset_text_field: body\n";
    let recipe = config::Loader::new().yaml("recipe.yaml", yaml).load().expect("recipe");
    let o = TokenizeOptions::from_recipe(&recipe);
    assert_eq!(o.max_length, Some(256));
    assert!(o.packing && o.assistant_only_loss && o.shuffle_dataset);
    assert_eq!(o.packing_strategy, config::types::PackingStrategy::Wrapped);
    assert_eq!(o.pad_to_multiple_of, Some(8));
    assert_eq!((o.seed, o.num_proc), (3, Some(2)));
    assert_eq!(o.dataset_text_field, "body");
    assert!(!o.effective_padding_free(), "wrapped packing is not padding-free");
    assert!(!TokenizeOptions::for_eval(&recipe).packing);

    let defaults = config::Loader::new()
        .yaml("r.yaml", "model_name_or_path: m\ndataset_name: d\n")
        .load()
        .expect("recipe");
    let o = TokenizeOptions::from_recipe(&defaults);
    assert_eq!(o, TokenizeOptions::default(), "the recipe defaults are TRL's");
}
