//! nibble's typed keys against the pinned TRL: same defaults, same closed sets, and the embedded
//! dump (`src/trl_fields.json`) still what `scripts/dump_trl_fields.py` prints.

use std::collections::BTreeSet;
use std::path::Path;

use config::types::*;
use config::{DataArgs, ModelArgs, TrainingArgs, trl_fields};

/// Typed keys whose default deliberately differs from TRL's, with the reason.
const DIFFERENT_ON_PURPOSE: &[(&str, &str)] = &[];

/// Typed keys that are not TRL fields (handbook, older transformers, nibble extensions).
const NOT_IN_TRL: &[&str] = &[
    "tokenizer_name_or_path",
    "dataset_mixture",
    "overwrite_output_dir",
    "chat_template",
    "lora_init_adapter",
    "skip_invalid_rows",
    "cpu_matmul",
    "lora_dtype",
];

fn typed_defaults() -> serde_json::Map<String, serde_json::Value> {
    let mut all = serde_json::Map::new();
    for v in [
        serde_json::to_value(ModelArgs::default()),
        serde_json::to_value(DataArgs::default()),
        serde_json::to_value(TrainingArgs::default()),
    ] {
        if let Ok(serde_json::Value::Object(m)) = v {
            all.extend(m);
        }
    }
    all
}

#[test]
fn typed_defaults_equal_trl_defaults() {
    let trl = trl_fields();
    let mut checked = 0;
    for (name, ours) in typed_defaults() {
        if NOT_IN_TRL.contains(&name.as_str()) || DIFFERENT_ON_PURPOSE.iter().any(|(k, _)| *k == name) {
            continue;
        }
        let field =
            trl.get(&name).unwrap_or_else(|| panic!("typed key `{name}` is not a TRL {} field", trl.trl));
        let same = match (&ours, &field.default) {
            (serde_json::Value::Number(a), serde_json::Value::Number(b)) => a.as_f64() == b.as_f64(),
            (a, b) => a == b,
        };
        assert!(same, "default of `{name}`: nibble {ours}, TRL {}", field.default);
        checked += 1;
    }
    assert!(checked > 80, "only {checked} keys compared");
}

#[test]
fn typed_sections_mirror_trl_groups() {
    let trl = trl_fields();
    let group = |g: &str| -> BTreeSet<&str> { trl.groups[g].iter().map(|f| f.name.as_str()).collect() };
    for f in ModelArgs::FIELDS {
        assert!(
            NOT_IN_TRL.contains(&f.name) || group("model").contains(f.name),
            "{} is not in ModelConfig",
            f.name
        );
    }
    for f in DataArgs::FIELDS {
        assert!(
            NOT_IN_TRL.contains(&f.name) || group("data").contains(f.name),
            "{} is not in ScriptArguments",
            f.name
        );
    }
    for f in TrainingArgs::FIELDS {
        assert!(
            NOT_IN_TRL.contains(&f.name) || group("training").contains(f.name),
            "{} is not in SFTConfig",
            f.name
        );
    }
    // Every ModelConfig and ScriptArguments key is typed.
    for g in ["model", "data"] {
        for name in group(g) {
            assert!(
                config::Loader::new()
                    .yaml("r.yaml", format!("{name}: null\n"))
                    .load()
                    .err()
                    .is_none_or(|e| { !e.diagnostics().iter().any(|d| d.kind == config::Kind::UnknownKey) })
            );
        }
    }
}

#[test]
fn closed_sets_equal_trl_choices() {
    let trl = trl_fields();
    let check = |key: &str, ours: &[&str]| {
        let theirs: BTreeSet<&str> = trl
            .get(key)
            .and_then(|f| f.choices.as_ref())
            .expect("choices")
            .iter()
            .map(String::as_str)
            .collect();
        let ours: BTreeSet<&str> = ours.iter().copied().collect();
        assert_eq!(ours, theirs, "choices of `{key}`");
    };
    check("dtype", Dtype::ALL);
    check("bnb_4bit_quant_type", QuantType::ALL);
    check("lr_scheduler_type", Scheduler::ALL);
    check("eval_strategy", Interval::ALL);
    check("logging_strategy", Interval::ALL);
    check("save_strategy", SaveStrategy::ALL);
    check("packing_strategy", PackingStrategy::ALL);
    check("truncation_mode", TruncationMode::ALL);
    check("loss_type", LossType::ALL);
    check("log_level", LogLevel::ALL);
    check("optim", Optim::ALL);
}

#[test]
fn embedded_dump_matches_the_installed_trl() {
    let python = std::env::var("NIBBLE_PYTHON")
        .expect("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs the pinned TRL and sets it)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dump_trl_fields.py");
    let out = std::process::Command::new(&python).arg(&script).output().expect("run the dump script");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let live: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dump is JSON");
    let embedded: serde_json::Value =
        serde_json::from_str(include_str!("../src/trl_fields.json")).expect("embedded dump is JSON");
    assert!(
        live == embedded,
        "crates/config/src/trl_fields.json is stale; regenerate with\n  \"$NIBBLE_PYTHON\" scripts/dump_trl_fields.py > crates/config/src/trl_fields.json"
    );
}

#[test]
fn dpo_keys_and_defaults_equal_dpoconfig() {
    use config::{DpoArgs, Trainer};
    let trl = trl_fields();
    let dpo: BTreeSet<&str> = trl.groups["dpo"].iter().map(|f| f.name.as_str()).collect();
    let mut defaults = match serde_json::to_value(TrainingArgs::defaults_for(Trainer::Dpo)) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => unreachable!("a section serializes to an object"),
    };
    defaults.retain(|k, _| dpo.contains(k.as_str()) && k != "loss_type");
    if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(DpoArgs::default()) {
        defaults.extend(m);
    }
    for f in DpoArgs::FIELDS {
        assert!(dpo.contains(f.name), "{} is not in DPOConfig", f.name);
    }
    let mut checked = 0;
    for (name, ours) in &defaults {
        let field =
            trl.get_for(Trainer::Dpo, name).unwrap_or_else(|| panic!("`{name}` is not a DPOConfig field"));
        let same = match (ours, &field.default) {
            (serde_json::Value::Number(a), serde_json::Value::Number(b)) => a.as_f64() == b.as_f64(),
            (a, b) => a == b,
        };
        assert!(same, "DPO default of `{name}`: nibble {ours}, TRL {}", field.default);
        checked += 1;
    }
    assert!(checked > 70, "only {checked} keys compared");
    // Every DPOConfig key reads in a DPO recipe (typed, or accepted and reported).
    for name in dpo {
        let r = config::Loader::new()
            .trainer(Trainer::Dpo)
            .yaml("r.yaml", format!("model_name_or_path: m\ndataset_name: d\nuse_peft: true\n{name}: null\n"))
            .load();
        assert!(
            r.err().is_none_or(|e| !e.diagnostics().iter().any(|d| d.kind == config::Kind::UnknownKey)),
            "DPOConfig's `{name}` is refused in a DPO recipe"
        );
    }
}
