//! Recipes end to end: the seed's handbook QLoRA recipe, older key generations, layering and
//! every kind of error with its key and place.

use std::path::Path;

use config::types::*;
use config::{Diagnostic, Error, Kind, Loader, Origin, Position, Recipe, Source};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).expect("repo root")
}

fn load_yaml(text: &str) -> Result<Recipe, Error> {
    Loader::new().yaml("recipe.yaml", text).load()
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match load_yaml(text) {
        Ok(_) => panic!("expected the recipe to be rejected:\n{text}"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

fn at(line: usize, column: usize) -> Origin {
    Origin::File { path: "recipe.yaml".into(), position: Some(Position { line, column }) }
}

const MINIMAL: &str = "model_name_or_path: m\ndataset_name: d\n";

#[test]
fn seed_qlora_recipe_resolves_to_trl_effective_values() {
    let path = repo().join("recipes/zephyr-7b-beta/sft/config_qlora.yaml");
    let r = Loader::new().file(&path).load().expect("seed recipe loads");
    let (m, d, t) = (&r.model, &r.data, &r.training);

    assert_eq!(m.model_name_or_path.as_deref(), Some("mistralai/Mistral-7B-v0.1"));
    assert_eq!(m.model_revision, "main");
    assert_eq!(m.dtype, Dtype::Bfloat16, "torch_dtype maps to dtype");
    assert_eq!(m.attn_implementation.as_deref(), Some("flash_attention_2"));
    assert!(m.load_in_4bit && m.use_peft && !m.load_in_8bit);
    assert_eq!((m.lora_r, m.lora_alpha), (16, 16));
    assert_eq!(m.lora_dropout, 0.05);
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    assert_eq!(m.lora_target_modules, Some(TargetModules::List(targets.map(String::from).to_vec())));
    assert_eq!(m.bnb_4bit_quant_type, QuantType::Nf4, "TRL default");
    assert!(!m.use_bnb_nested_quant, "TRL default");

    let mix = d.dataset_mixture.as_ref().expect("mixture");
    assert_eq!(mix.datasets.len(), 2);
    assert_eq!(mix.datasets[0].id, "HuggingFaceH4/ultrachat_200k");
    assert_eq!(mix.datasets[0].config.as_deref(), Some("default"));
    assert_eq!(mix.datasets[0].split, "train_sft");
    assert_eq!(mix.datasets[1].split, "test_sft");
    assert_eq!(mix.datasets[0].columns, Some(vec!["messages".to_owned()]));
    assert_eq!(mix.datasets[0].weight, 1.0);
    assert_eq!(mix.test_split_size, Some(1000.0));
    assert_eq!(mix.seed, 0);
    assert!(t.chat_template.as_deref().is_some_and(|c| c.contains("add_generation_prompt")));
    assert_eq!(t.dataset_num_proc, Some(12));

    assert_eq!(t.bf16, Some(true));
    assert!(t.do_eval);
    assert_eq!(t.eval_strategy, Interval::Epoch);
    assert_eq!(t.gradient_accumulation_steps, 2);
    assert!(t.gradient_checkpointing);
    assert_eq!(
        t.gradient_checkpointing_kwargs.as_ref().and_then(|k| k.get("use_reentrant")),
        Some(&serde_json::json!(false))
    );
    assert_eq!(t.hub_model_id.as_deref(), Some("zephyr-7b-sft-qlora"));
    assert_eq!(t.hub_strategy, "every_save");
    assert_eq!(t.learning_rate, 2.0e-4);
    assert_eq!(t.log_level, LogLevel::Info);
    assert_eq!(t.logging_steps, 5.0);
    assert_eq!(t.logging_strategy, Interval::Steps);
    assert_eq!(t.lr_scheduler_type, Scheduler::Cosine);
    assert_eq!(t.max_length, Some(2048), "max_seq_length maps to max_length");
    assert_eq!(t.max_steps, -1);
    assert_eq!(t.num_train_epochs, 1.0);
    assert_eq!(t.output_dir.as_deref(), Some("data/zephyr-7b-sft-qlora"));
    assert!(t.overwrite_output_dir);
    assert_eq!((t.per_device_eval_batch_size, t.per_device_train_batch_size), (8, 4));
    assert!(t.push_to_hub);
    assert_eq!(t.report_to, ReportTo::Many(vec!["tensorboard".into()]));
    assert_eq!(t.save_strategy, SaveStrategy::Steps);
    assert_eq!(t.save_steps, 100.0);
    assert_eq!(t.save_total_limit, Some(1));
    assert_eq!(t.seed, 42);
    assert_eq!(t.warmup_steps, 0.1, "warmup_ratio maps to a fractional warmup_steps");

    // Sources: given keys come from the file, the rest are defaults.
    assert_eq!(r.sources["lora_alpha"], Source::File);
    assert_eq!(r.sources["max_length"], Source::File);
    assert_eq!(r.sources["lora_dropout"], Source::File);
    assert_eq!(r.sources["bnb_4bit_quant_type"], Source::Default);
    assert_eq!(r.sources["use_bnb_nested_quant"], Source::Default);

    // Old spellings are announced, never dropped silently.
    for old in ["max_seq_length", "torch_dtype", "warmup_ratio"] {
        assert!(r.warnings.iter().any(|w| w.key == old), "no warning for {old}: {:?}", r.warnings);
    }
    let ignored =
        r.warnings.iter().find(|w| w.message.contains("does not act")).expect("ignored-keys warning");
    for k in ["push_to_hub", "hub_model_id", "do_eval", "attn_implementation"] {
        assert!(ignored.key.contains(k), "{k} not listed in {ignored:?}");
    }
}

#[test]
fn print_config_json_names_keys_as_the_recipe_and_sources() {
    let r = load_yaml("model_name_or_path: m\ndataset_name: d\nlora_alpha: 64\nmax_seq_length: 512\n")
        .expect("loads");
    let j = r.to_json();
    assert_eq!(j["model"]["lora_alpha"], 64);
    assert_eq!(j["model"]["lora_dropout"], 0.05);
    assert_eq!(j["model"]["bnb_4bit_quant_type"], "nf4");
    assert_eq!(j["model"]["use_bnb_nested_quant"], false);
    assert_eq!(j["training"]["max_length"], 512);
    assert_eq!(j["training"]["bf16"], true, "TRL: bf16 defaults to true unless fp16");
    assert_eq!(j["sources"]["lora_alpha"], "file");
    assert_eq!(j["sources"]["max_length"], "file");
    assert_eq!(j["sources"]["lora_dropout"], "default");
}

#[test]
fn older_handbook_generation_maps_to_the_new_meaning() {
    let text = "\
model_name_or_path: m
torch_dtype: float16
use_flash_attention_2: true
dataset_mixer:
  HuggingFaceH4/ultrachat_200k: 0.5
  org/other: 1.0
dataset_splits:
- train_sft
- test_sft
dataset_configs: [default, other]
max_seq_length: 1024
packing_strategy: ffd
evaluation_strategy: epoch
preprocessing_num_workers: 4
truncation_side: left
max_train_samples: 100
";
    let r = load_yaml(text).expect("old recipe loads");
    assert_eq!(r.model.dtype, Dtype::Float16);
    assert_eq!(r.model.attn_implementation.as_deref(), Some("flash_attention_2"));
    let mix = r.data.dataset_mixture.expect("mixture");
    assert_eq!(mix.datasets.len(), 2, "one train split per dataset");
    assert_eq!(
        (mix.datasets[0].id.as_str(), mix.datasets[0].split.as_str()),
        ("HuggingFaceH4/ultrachat_200k", "train_sft")
    );
    assert_eq!(mix.datasets[0].weight, 0.5);
    assert_eq!(mix.datasets[0].config.as_deref(), Some("default"));
    assert_eq!(mix.datasets[1].config.as_deref(), Some("other"));
    assert_eq!(mix.eval_datasets.len(), 2, "test splits become evaluation data, whole");
    assert!(mix.eval_datasets.iter().all(|d| d.split == "test_sft" && d.weight == 1.0));
    assert_eq!(r.training.max_length, Some(1024));
    assert_eq!(r.training.packing_strategy, PackingStrategy::Bfd);
    assert_eq!(r.training.eval_strategy, Interval::Epoch);
    assert_eq!(r.training.dataset_num_proc, Some(4));
    assert_eq!(r.training.truncation_mode, TruncationMode::KeepEnd);
    for old in [
        "torch_dtype",
        "use_flash_attention_2",
        "dataset_mixer",
        "max_seq_length",
        "packing_strategy",
        "evaluation_strategy",
        "preprocessing_num_workers",
        "truncation_side",
        "max_train_samples",
    ] {
        let w = r
            .warnings
            .iter()
            .find(|w| w.key == old)
            .unwrap_or_else(|| panic!("no warning for {old}: {:?}", r.warnings));
        assert!(
            matches!(w.origin, Origin::File { position: Some(_), .. }),
            "{old} warning has no line: {w:?}"
        );
    }
}

#[test]
fn old_and_new_spelling_that_disagree_is_a_conflict() {
    let d = errors("model_name_or_path: m\ndataset_name: d\nmax_seq_length: 512\nmax_length: 1024\n");
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!((d[0].kind, d[0].key.as_str(), &d[0].origin), (Kind::Conflict, "max_seq_length", &at(3, 1)));
}

#[test]
fn three_mistakes_are_reported_together_with_lines() {
    let text = "\
model_name_or_path: m
dataset_name: d
lora_r: 0
learnin_rate: 1.0e-4
per_device_train_batch_size: four
";
    let d = errors(text);
    assert_eq!(d.len(), 3, "{d:#?}");
    assert_eq!((d[0].kind, d[0].key.as_str(), &d[0].origin), (Kind::OutOfRange, "lora_r", &at(3, 1)));
    assert_eq!((d[1].kind, d[1].key.as_str(), &d[1].origin), (Kind::UnknownKey, "learnin_rate", &at(4, 1)));
    assert!(d[1].message.contains("did you mean `learning_rate`"), "{}", d[1].message);
    assert_eq!(
        (d[2].kind, d[2].key.as_str(), &d[2].origin),
        (Kind::WrongType, "per_device_train_batch_size", &at(5, 1))
    );
    let shown = Error::Invalid(d).to_string();
    assert!(shown.contains("recipe.yaml:3:1: lora_r: must be at least 1, got 0"), "{shown}");
    assert!(shown.contains("recipe.yaml:4:1: learnin_rate"), "{shown}");
    assert!(shown.contains("recipe.yaml:5:1: per_device_train_batch_size"), "{shown}");
}

#[test]
fn each_range_rule_names_its_key() {
    let cases: &[(&str, &str, Kind)] = &[
        ("lora_r: 0", "lora_r", Kind::OutOfRange),
        ("learning_rate: -1.0e-4", "learning_rate", Kind::OutOfRange),
        ("warmup_ratio: 1.5", "warmup_ratio", Kind::OutOfRange),
        ("lora_dropout: 1.0", "lora_dropout", Kind::OutOfRange),
        ("bnb_4bit_quant_type: int4", "bnb_4bit_quant_type", Kind::WrongType),
        ("load_in_4bit: true\nload_in_8bit: true\nuse_peft: true", "load_in_8bit", Kind::Conflict),
        ("load_in_4bit: true", "load_in_4bit", Kind::Conflict),
        ("per_device_train_batch_size: 0", "per_device_train_batch_size", Kind::OutOfRange),
        ("gradient_accumulation_steps: 0", "gradient_accumulation_steps", Kind::OutOfRange),
        ("max_steps: 0", "max_steps", Kind::OutOfRange),
        ("optim: adamw_torhc", "optim", Kind::WrongType),
        ("bf16: true\nfp16: true", "fp16", Kind::Conflict),
        ("lr_scheduler_type: cosinus", "lr_scheduler_type", Kind::WrongType),
        ("save_total_limit: 0", "save_total_limit", Kind::OutOfRange),
        ("max_length: 0", "max_length", Kind::OutOfRange),
        ("hub_private_repo: maybe", "hub_private_repo", Kind::WrongType),
    ];
    for (snippet, key, kind) in cases {
        let d = errors(&format!("{MINIMAL}{snippet}\n"));
        assert!(
            d.iter().any(|x| x.key == *key && x.kind == *kind),
            "{snippet}: expected {kind:?} on {key}, got {d:#?}"
        );
        let hit = d.iter().find(|x| x.key == *key).expect("hit");
        assert!(
            matches!(hit.origin, Origin::File { position: Some(Position { line, .. }), .. } if line >= 3),
            "{snippet}: {hit:?}"
        );
    }
    let mixture: &[(&str, &str, Kind)] = &[
        ("eval_strategy: steps\ndataset_mixture: {datasets: [{id: x}]}", "eval_strategy", Kind::Conflict),
        (
            "dataset_mixture: {datasets: [{id: x, weight: 2.0}]}",
            "dataset_mixture.datasets.0.weight",
            Kind::OutOfRange,
        ),
        ("dataset_mixture: {datasets: []}", "dataset_mixture.datasets", Kind::OutOfRange),
        (
            "dataset_mixture:\n  datasets:\n  - {id: a, columns: [messages]}\n  - {id: b, columns: [text]}",
            "dataset_mixture.datasets",
            Kind::Conflict,
        ),
        (
            "dataset_mixture: {datasets: [{id: x}], test_split_size: 2.5}",
            "dataset_mixture.test_split_size",
            Kind::OutOfRange,
        ),
        ("dataset_name: d\ndataset_mixture: {datasets: [{id: x}]}", "dataset_mixture", Kind::Conflict),
    ];
    for (snippet, key, kind) in mixture {
        let d = errors(&format!("model_name_or_path: m\n{snippet}\n"));
        assert!(
            d.iter().any(|x| x.key == *key && x.kind == *kind),
            "{snippet}: expected {kind:?} on {key}, got {d:#?}"
        );
    }
    let optim = errors(&format!("{MINIMAL}optim: adamw_torhc\n"));
    assert!(optim[0].message.contains("did you mean `adamw_torch`"), "{}", optim[0].message);
}

#[test]
fn missing_required_keys_name_the_file() {
    let d = errors("lora_r: 8\n");
    let keys: Vec<_> = d.iter().map(|x| (x.kind, x.key.as_str())).collect();
    assert_eq!(keys, vec![(Kind::Missing, "model_name_or_path"), (Kind::Missing, "dataset_name")]);
    assert_eq!(d[0].origin, Origin::File { path: "recipe.yaml".into(), position: None });
}

#[test]
fn syntax_errors_have_a_position() {
    let d = errors("model_name_or_path: m\nlora_target_modules: [q_proj, v_proj\n");
    assert_eq!(d[0].kind, Kind::Syntax);
    assert!(
        matches!(d[0].origin, Origin::File { position: Some(Position { line: 2 | 3, .. }), .. }),
        "{:?}",
        d[0]
    );
    let d = errors("- just\n- a list\n");
    assert_eq!(d[0].kind, Kind::Syntax);
}

#[test]
fn nested_mistakes_point_inside_the_mixture() {
    let text = "model_name_or_path: m\ndataset_mixture:\n  datasets:\n    - id: a\n      wieght: 0.5\n";
    let d = errors(text);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].kind, Kind::WrongType);
    assert!(d[0].message.contains("wieght"), "{}", d[0].message);
    assert!(
        matches!(d[0].origin, Origin::File { position: Some(Position { line: 2..=5, .. }), .. }),
        "{:?}",
        d[0]
    );
}

#[test]
fn layers_apply_in_order_defaults_file_env_cli() {
    let env = vec![
        ("NIBBLE_LORA_R".to_owned(), "32".to_owned()),
        ("NIBBLE_LEARNING_RATE".to_owned(), "3e-4".to_owned()),
        ("NIBBLE_HOME".to_owned(), "/somewhere".to_owned()),
        ("PATH".to_owned(), "/bin".to_owned()),
    ];
    let cli = config::split_flags(&[
        "--learning_rate".into(),
        "5e-4".into(),
        "--lora_target_modules".into(),
        "q_proj,v_proj".into(),
        "--packing".into(),
        "--model_revision=20240101".into(),
        "--lora_modules_to_save".into(),
        "[embed_tokens, lm_head]".into(),
    ])
    .expect("flags split");
    let r = Loader::new()
        .yaml("recipe.yaml", format!("{MINIMAL}lora_r: 8\nlearning_rate: 1.0e-4\n"))
        .env(env)
        .cli(cli)
        .load()
        .expect("loads");
    assert_eq!(r.model.lora_r, 32);
    assert_eq!(r.sources["lora_r"], Source::Env);
    assert_eq!(r.training.learning_rate, 5e-4);
    assert_eq!(r.sources["learning_rate"], Source::Cli);
    assert_eq!(
        r.model.lora_target_modules,
        Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
    );
    assert!(r.training.packing, "a bare flag means true");
    assert_eq!(r.model.model_revision, "20240101", "a numeric-looking flag value is kept as a string");
    assert_eq!(r.model.lora_modules_to_save, Some(vec!["embed_tokens".into(), "lm_head".into()]));
    assert_eq!(r.sources["dataset_name"], Source::File);
    assert_eq!(r.sources["lora_dropout"], Source::Default);
}

#[test]
fn env_and_cli_errors_name_the_variable_and_flag() {
    let e = Loader::new()
        .yaml("recipe.yaml", MINIMAL)
        .env([("NIBBLE_LORA_RR".to_owned(), "3".to_owned())])
        .cli(config::split_flags(&["--lora_r".into(), "0".into()]).expect("split"))
        .load()
        .expect_err("rejected");
    let d = e.diagnostics();
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(d[0].origin, Origin::Env { var: "NIBBLE_LORA_RR".into() });
    assert!(d[0].message.contains("did you mean `lora_r`"));
    assert_eq!(d[1].origin, Origin::Cli { flag: "--lora_r".into() });
    assert!(e.to_string().contains("command line --lora_r: lora_r: must be at least 1"), "{e}");
}

#[test]
fn env_section_is_collected_not_treated_as_keys() {
    let r = load_yaml(&format!("{MINIMAL}env:\n  HF_HUB_OFFLINE: 1\n  TOKENIZERS_PARALLELISM: false\n"))
        .expect("loads");
    assert_eq!(r.env.get("HF_HUB_OFFLINE").map(String::as_str), Some("1"));
    assert_eq!(r.env.get("TOKENIZERS_PARALLELISM").map(String::as_str), Some("false"));
    let d = errors(&format!("{MINIMAL}env:\n  A: [1, 2]\n"));
    assert_eq!((d[0].key.as_str(), &d[0].origin), ("env.A", &at(4, 3)));
}

#[test]
fn trl_keys_nibble_does_not_type_are_kept_and_reported() {
    let r = load_yaml(&format!("{MINIMAL}torch_compile: true\nddp_find_unused_parameters: false\n"))
        .expect("loads");
    assert_eq!(r.extra["torch_compile"], serde_json::json!(true));
    assert_eq!(r.sources["torch_compile"], Source::File);
    let w = r.warnings.iter().find(|w| w.message.contains("does not act")).expect("warning");
    assert!(w.key.contains("torch_compile") && w.key.contains("ddp_find_unused_parameters"), "{w:?}");
}

#[test]
fn shipped_recipes_load() {
    for rel in ["recipes/tiny/config_qlora.yaml", "recipes/zephyr-7b-beta/sft/config_qlora.yaml"] {
        let r = Loader::new().file(repo().join(rel)).load();
        assert!(r.is_ok(), "{rel}: {}", r.err().map(|e| e.to_string()).unwrap_or_default());
    }
}

#[test]
fn unreadable_file_is_an_io_error_naming_it() {
    let e = Loader::new().file("/nonexistent/recipe.yaml").load().expect_err("missing file");
    assert!(matches!(e, Error::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/recipe.yaml"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Garbage recipes, and the tiny recipe with a line cut, repeated or mangled, give a recipe
    /// or diagnostics: never a panic (issue 22).
    #[test]
    fn garbage_and_near_miss_recipes_never_panic(
        garbage in "\\PC{0,200}",
        cut in 0usize..400,
        insert in proptest::sample::select(vec!["", ":", "- ", "[", "{", "\t", "&a ", "*a", "!!int ", "1e999", ".nan", "'", "\"", "? "]),
    ) {
        let _ = Loader::new().yaml("g.yaml", garbage).load();
        let tiny = include_str!("../../../recipes/tiny/config_qlora.yaml");
        let at = tiny.char_indices().map(|(i, _)| i).nth(cut % tiny.chars().count()).unwrap_or(0);
        let mangled = format!("{}{insert}{}", &tiny[..at], &tiny[at..]);
        let _ = Loader::new().yaml("m.yaml", mangled).load();
    }
}
