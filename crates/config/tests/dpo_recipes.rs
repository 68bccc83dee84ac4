//! DPO recipes: the handbook's DPO QLoRA recipe with DPOConfig's meaning, DPO's own keys and
//! defaults, older DPO spellings, and each trainer refusing the other's keys.

use std::path::Path;

use config::types::*;
use config::{Diagnostic, Kind, Loader, Recipe, Source, Trainer};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).expect("repo root")
}

fn dpo(text: &str) -> Result<Recipe, config::Error> {
    Loader::new().trainer(Trainer::Dpo).yaml("dpo.yaml", text).load()
}

fn dpo_errors(text: &str) -> Vec<Diagnostic> {
    match dpo(text) {
        Ok(_) => panic!("expected the DPO recipe to be rejected:\n{text}"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

const MINIMAL: &str = "model_name_or_path: m\ndataset_name: d\nuse_peft: true\n";

#[test]
fn handbook_dpo_qlora_recipe_resolves_with_dpoconfig_meaning() {
    let path = repo().join("recipes/zephyr-7b-beta/dpo/config_qlora.yaml");
    let r = Loader::new().trainer(Trainer::Dpo).file(&path).load().expect("handbook DPO recipe loads");
    assert_eq!(r.trainer, Trainer::Dpo);
    let d = r.dpo.as_ref().expect("a DPO recipe has DPO keys");
    assert_eq!(d.beta, 0.01);
    assert_eq!(d.loss_type, vec![DpoLoss::Sigmoid], "DPOConfig's default loss");
    assert!(d.disable_dropout, "DPOConfig's default");
    assert!(!d.precompute_ref_log_probs);
    let (m, t) = (&r.model, &r.training);
    assert_eq!(m.model_name_or_path.as_deref(), Some("alignment-handbook/zephyr-7b-sft-qlora"));
    assert_eq!(m.dtype, Dtype::Float16);
    assert!(m.load_in_4bit && m.use_peft);
    assert_eq!((m.lora_r, m.lora_alpha), (16, 16));
    assert_eq!(t.learning_rate, 5.0e-6);
    assert_eq!(t.optim, Optim::PagedAdamw32bit);
    assert_eq!(t.max_length, Some(1024));
    assert_eq!(t.warmup_steps, 0.1);
    assert_eq!(t.eval_strategy, Interval::Steps);
    assert_eq!(t.dataset_num_proc, Some(12));
    let mix = r.data.dataset_mixture.as_ref().expect("dataset_mixer becomes a mixture");
    assert_eq!(mix.datasets[0].id, "HuggingFaceH4/ultrafeedback_binarized");
    assert_eq!(mix.datasets[0].split, "train_prefs");
    assert_eq!(mix.eval_datasets[0].split, "test_prefs");
    assert_eq!(r.sources["beta"], Source::File);
    assert_eq!(r.sources["loss_type"], Source::Default);
    // TRL 1.16 removed max_prompt_length: announced, never silently dropped.
    let w = r.warnings.iter().find(|w| w.key == "max_prompt_length").expect("max_prompt_length warning");
    assert!(w.message.contains("max_length"), "{w}");
    // The plan shows DPO's keys and none of SFT's own.
    let j = r.to_json();
    assert_eq!(j["trainer"], "dpo");
    assert_eq!(j["dpo"]["beta"], 0.01);
    assert!(j["training"].get("packing").is_none() && j["training"].get("loss_type").is_none());
}

#[test]
fn dpo_defaults_are_dpoconfig_defaults() {
    let r = dpo(MINIMAL).expect("loads");
    assert_eq!(r.training.learning_rate, 1e-6, "DPOConfig lowers the learning rate");
    let sft = Loader::new().yaml("s.yaml", MINIMAL).load().expect("loads");
    assert_eq!(sft.training.learning_rate, 2e-5);
    assert!(sft.dpo.is_none());
    // A DPO recipe's learning_rate still wins over DPO's default.
    let r = dpo(&format!("{MINIMAL}learning_rate: 5.0e-7\n")).expect("loads");
    assert_eq!(r.training.learning_rate, 5.0e-7);
}

#[test]
fn loss_type_is_a_list_for_dpo_a_name_for_sft() {
    let r = dpo(&format!("{MINIMAL}loss_type: ipo\n")).expect("a single name is a list of one");
    assert_eq!(r.dpo.expect("DPO keys").loss_type, vec![DpoLoss::Ipo]);
    let r = dpo(&format!("{MINIMAL}loss_type: [sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1.0]\n"))
        .expect("MPO's combination");
    let d = r.dpo.expect("DPO keys");
    assert_eq!(d.loss_type, vec![DpoLoss::Sigmoid, DpoLoss::BcoPair, DpoLoss::Sft]);
    assert_eq!(d.loss_weights, Some(vec![0.8, 0.2, 1.0]));
    // From the command line: comma lists, numbers as numbers.
    let pairs = config::split_flags(&[
        "--loss_type".into(),
        "sigmoid,sft".into(),
        "--loss_weights".into(),
        "1,0.5".into(),
    ])
    .expect("flags");
    let r = Loader::new().trainer(Trainer::Dpo).yaml("dpo.yaml", MINIMAL).cli(pairs).load().expect("loads");
    let d = r.dpo.expect("DPO keys");
    assert_eq!(d.loss_type, vec![DpoLoss::Sigmoid, DpoLoss::Sft]);
    assert_eq!(d.loss_weights, Some(vec![1.0, 0.5]));
    // An unknown loss names the nearest one and the supported set.
    let e = dpo_errors(&format!("{MINIMAL}loss_type: [sigmod]\n"));
    assert!(e[0].key.starts_with("loss_type") && e[0].message.contains("sigmoid"), "{e:?}");
    assert!(e[0].message.contains("apo_zero") && e[0].message.contains("sigmoid_norm"), "{e:?}");
    // SFT's loss_type keeps its meaning.
    let sft = Loader::new().yaml("s.yaml", format!("{MINIMAL}loss_type: dft\n")).load().expect("loads");
    assert_eq!(sft.training.loss_type, LossType::Dft);
}

#[test]
fn rpo_alpha_reads_as_the_sft_loss() {
    let r = dpo(&format!("{MINIMAL}rpo_alpha: 0.5\n")).expect("older RPO spelling");
    let d = r.dpo.expect("DPO keys");
    assert_eq!(d.loss_type, vec![DpoLoss::Sigmoid, DpoLoss::Sft]);
    assert_eq!(d.loss_weights, Some(vec![1.0, 0.5]));
    assert!(r.warnings.iter().any(|w| w.key == "rpo_alpha"));
    let e = dpo_errors(&format!("{MINIMAL}rpo_alpha: 0.5\nloss_type: [sigmoid, sft]\n"));
    assert_eq!(e[0].key, "rpo_alpha");
    // Across layers: the merged loss_type gets the sft term, whichever layer set which.
    let flags = |f: &[&str]| {
        config::split_flags(&f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).expect("flags")
    };
    let load = |yaml: String, f: &[&str]| {
        Loader::new().trainer(Trainer::Dpo).yaml("dpo.yaml", yaml).cli(flags(f)).load().expect("loads")
    };
    let d = load(format!("{MINIMAL}loss_type: ipo\n"), &["--rpo_alpha", "0.5"]).dpo.expect("DPO keys");
    assert_eq!(d.loss_type, vec![DpoLoss::Ipo, DpoLoss::Sft]);
    assert_eq!(d.loss_weights, Some(vec![1.0, 0.5]));
    let d = load(format!("{MINIMAL}rpo_alpha: 0.5\n"), &["--loss_type", "ipo"]).dpo.expect("DPO keys");
    assert_eq!(d.loss_type, vec![DpoLoss::Ipo, DpoLoss::Sft]);
    assert_eq!(d.loss_weights, Some(vec![1.0, 0.5]));
    // A single weight on the command line is a list of one.
    let d = load(MINIMAL.to_owned(), &["--loss_weights", "0.8"]).dpo.expect("DPO keys");
    assert_eq!(d.loss_weights, Some(vec![0.8]));
}

#[test]
fn dpo_range_and_conflict_rules_name_their_keys() {
    let cases = [
        ("beta: 0", "beta"),
        ("beta: -1", "beta"),
        ("loss_type: []", "loss_type"),
        ("loss_type: [sigmoid, ipo]\nloss_weights: [1.0]", "loss_weights"),
        ("label_smoothing: 0.5", "label_smoothing"),
        ("ld_alpha: 1.5", "ld_alpha"),
        ("precompute_ref_batch_size: 0", "precompute_ref_batch_size"),
        ("sync_ref_model: true", "sync_ref_model"),
        ("reference_free: true", "reference_free"),
        ("f_divergence_type: kl", "f_divergence_type"),
    ];
    for (line, key) in cases {
        let e = dpo_errors(&format!("{MINIMAL}{line}\n"));
        assert!(e.iter().any(|d| d.key == key), "`{line}`: expected a problem on {key}, got {e:?}");
    }
    let e = dpo_errors("model_name_or_path: m\ndataset_name: d\n");
    assert!(e.iter().any(|d| d.key == "use_peft" && d.kind == Kind::Conflict), "{e:?}");
}

#[test]
fn each_trainer_refuses_the_other_trainers_keys() {
    let e = dpo_errors(&format!("{MINIMAL}packing: true\ncompletion_only_loss: false\n"));
    for key in ["packing", "completion_only_loss"] {
        let d = e.iter().find(|d| d.key == key).unwrap_or_else(|| panic!("{key}: {e:?}"));
        assert!(d.message.contains("SFTConfig") && d.message.contains("sft train"), "{d}");
    }
    let sft = Loader::new().yaml("s.yaml", format!("{MINIMAL}beta: 0.1\nsync_ref_model: false\n")).load();
    let e = sft.expect_err("beta is DPO's").diagnostics().to_vec();
    for key in ["beta", "sync_ref_model"] {
        let d = e.iter().find(|d| d.key == key).unwrap_or_else(|| panic!("{key}: {e:?}"));
        assert!(d.message.contains("DPOConfig") && d.message.contains("sft dpo"), "{d}");
    }
}

#[test]
fn a_dpo_plan_writes_back_as_a_recipe_that_loads_the_same() {
    let text = format!(
        "{MINIMAL}beta: 0.2\nloss_type: [ipo]\nprecompute_ref_log_probs: true\nlearning_rate: 3.0e-6\n"
    );
    let r = dpo(&text).expect("loads");
    let back = dpo(&r.to_yaml()).expect("its YAML loads");
    assert_eq!((back.model, back.data, back.training, back.dpo), (r.model, r.data, r.training, r.dpo));
}
