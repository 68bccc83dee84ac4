//! Older key spellings (alignment-handbook before 2025, TRL < 0.20, transformers 4) mapped to
//! their current meaning, each with a warning; none is dropped silently.

use serde_json::{Value as J, json};

use crate::diag::{Diagnostic, Kind};
use crate::layers::{Layer, Warning};
use crate::types::Trainer;

/// Plain renames: old key, current key.
pub const RENAMES: &[(&str, &str)] = &[
    ("max_seq_length", "max_length"),
    ("torch_dtype", "dtype"),
    ("evaluation_strategy", "eval_strategy"),
    ("preprocessing_num_workers", "dataset_num_proc"),
    ("text_column", "dataset_text_field"),
];

/// Keys older recipes carry that have no effect in current TRL nor in nibble.
pub const OBSOLETE: &[(&str, &str)] = &[
    ("dataset_batch_size", "TRL removed it; tokenization batches are internal"),
    ("max_train_samples", "TRL removed it; use dataset_mixture weights"),
    ("max_eval_samples", "TRL removed it; use dataset_mixture test_split_size"),
    ("auto_insert_empty_system_msg", "the handbook removed it; templates decide"),
    ("model_code_revision", "the handbook removed it; use model_revision"),
    ("base_model_revision", "the handbook removed it; use model_revision"),
    ("hub_model_revision", "nibble does not push to the hub"),
    ("overwrite_hub_revision", "nibble does not push to the hub"),
    ("push_to_hub_revision", "nibble does not push to the hub"),
];

/// DPOConfig keys of older TRL releases that TRL 1.16 removed, and what nibble makes of each.
pub const OBSOLETE_DPO: &[(&str, &str)] = &[
    (
        "max_prompt_length",
        "TRL 1.16 removed it: a pair is truncated only by max_length (prompt and completion together, as truncation_mode says)",
    ),
    ("max_completion_length", "TRL 1.16 removed it: a pair is truncated only by max_length"),
    ("max_target_length", "TRL removed it: a pair is truncated only by max_length"),
    ("is_encoder_decoder", "TRL 1.16 removed it; nibble trains decoder-only models"),
    ("generate_during_eval", "TRL 1.16 removed it; nibble does not generate during evaluation"),
    (
        "force_use_ref_model",
        "TRL 1.16 removed it; the reference is the policy's own base (with the starting adapter frozen, or the adapter off)",
    ),
    ("model_adapter_name", "TRL 1.16 removed it; the reference adapter is a frozen copy of the starting one"),
    ("ref_adapter_name", "TRL 1.16 removed it; the reference adapter is a frozen copy of the starting one"),
    ("ref_model_init_kwargs", "TRL 1.16 removed it; the reference is the policy's own base"),
    ("padding_value", "TRL 1.16 removed it; the pad token pads"),
    ("label_pad_token_id", "TRL 1.16 removed it; prompt and padding never enter the loss"),
    ("use_logits_to_keep", "TRL 1.16 removed it; nibble computes only the completions' logits anyway"),
    ("use_num_logits_to_keep", "TRL removed it; nibble computes only the completions' logits anyway"),
    ("tools", "TRL 1.16 removed it from DPOConfig; put tools in the dataset rows"),
];

/// Every old spelling this module understands (for "did you mean" and docs).
pub fn old_names() -> impl Iterator<Item = &'static str> {
    RENAMES
        .iter()
        .map(|(o, _)| *o)
        .chain(OBSOLETE.iter().map(|(o, _)| *o))
        .chain([
            "dataset_mixer",
            "dataset_splits",
            "dataset_configs",
            "use_flash_attention_2",
            "warmup_ratio",
            "truncation_side",
            "rpo_alpha",
            "reference_free",
        ])
        .chain(OBSOLETE_DPO.iter().map(|(o, _)| *o))
}

struct Tx<'a> {
    layer: &'a mut Layer,
    diags: &'a mut Vec<Diagnostic>,
    warnings: &'a mut Vec<Warning>,
}

impl Tx<'_> {
    fn warn(&mut self, key: &str, message: String) {
        let origin = self.layer.origin_of(key);
        self.warnings.push(Warning { key: key.into(), origin, message });
    }

    fn error(&mut self, kind: Kind, key: &str, message: String) {
        let origin = self.layer.origin_of(key);
        self.diags.push(Diagnostic { kind, key: key.into(), origin, message });
    }

    /// Move `old` to `new` with value `v`, unless the layer also sets `new` to something else.
    fn set_new(&mut self, old: &str, new: &str, v: J) {
        let old_origin = self.layer.origin_of(old);
        if let Some(existing) = self.layer.values.get(new) {
            if *existing != v {
                self.error(
                    Kind::Conflict,
                    old,
                    format!(
                        "older spelling of `{new}`, which is also set, to a different value \
                         ({existing} vs {v}); keep only `{new}`"
                    ),
                );
            }
            self.warn(old, format!("older spelling of `{new}`; `{new}` is also set and wins"));
            return;
        }
        self.warn(old, format!("older spelling, read as `{new}: {v}`"));
        self.layer.origins.insert(new.into(), old_origin);
        self.layer.values.insert(new.into(), v);
    }
}

/// Rewrite a layer's old keys in place.
/// Returns the layer's `rpo_alpha` (DPO), for [`apply_rpo_alpha`] once the layers are merged.
pub(crate) fn translate(
    layer: &mut Layer,
    trainer: Trainer,
    diags: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Warning>,
) -> Option<(f64, crate::diag::Origin)> {
    let mut tx = Tx { layer, diags, warnings };
    let rpo_alpha = if trainer == Trainer::Dpo { translate_dpo(&mut tx) } else { None };

    for (old, new) in RENAMES {
        if let Some(v) = tx.layer.values.remove(*old) {
            tx.set_new(old, new, v);
        }
    }
    for (old, why) in OBSOLETE {
        if tx.layer.values.remove(*old).is_some() {
            tx.warn(old, format!("ignored: {why}"));
        }
    }

    if let Some(v) = tx.layer.values.remove("use_flash_attention_2") {
        match v {
            J::Bool(true) => {
                tx.set_new("use_flash_attention_2", "attn_implementation", json!("flash_attention_2"))
            }
            J::Bool(false) => tx.warn(
                "use_flash_attention_2",
                "older spelling; false leaves attn_implementation unset".into(),
            ),
            other => tx.error(
                Kind::WrongType,
                "use_flash_attention_2",
                format!("expected a boolean, found {other}"),
            ),
        }
    }

    if let Some(v) = tx.layer.values.remove("warmup_ratio") {
        match v.as_f64() {
            Some(r) if (0.0..1.0).contains(&r) => tx.set_new("warmup_ratio", "warmup_steps", v),
            Some(r) => tx.error(
                Kind::OutOfRange,
                "warmup_ratio",
                format!(
                    "must be in [0, 1), got {r} (transformers 5 reads warmup_steps below 1 as this \
                     ratio; for a whole-run warmup give warmup_steps as a step count)"
                ),
            ),
            None => tx.error(Kind::WrongType, "warmup_ratio", format!("expected a number, found {v}")),
        }
    }

    if let Some(v) = tx.layer.values.remove("truncation_side") {
        match v.as_str() {
            Some("right") => tx.set_new("truncation_side", "truncation_mode", json!("keep_start")),
            Some("left") => tx.set_new("truncation_side", "truncation_mode", json!("keep_end")),
            _ => tx.error(
                Kind::OutOfRange,
                "truncation_side",
                format!("expected `left` or `right`, found {v}"),
            ),
        }
    }

    if tx.layer.values.get("packing_strategy") == Some(&json!("ffd")) {
        tx.warn("packing_strategy", "`ffd` is the older name of `bfd`; read as `bfd`".into());
        tx.layer.values.insert("packing_strategy".into(), json!("bfd"));
    }

    translate_mixer(&mut tx);
    rpo_alpha
}

/// DPOConfig's older keys: a single `loss_type` (or `loss_weights`) is a list of one (as
/// DPOConfig reads it), removed keys are announced, `reference_free: true` is refused, and
/// `rpo_alpha` is taken out to be applied after merging ([`apply_rpo_alpha`]).
fn translate_dpo(tx: &mut Tx<'_>) -> Option<(f64, crate::diag::Origin)> {
    if let Some(J::String(one)) = tx.layer.values.get("loss_type") {
        let list = json!([one]);
        tx.layer.values.insert("loss_type".into(), list);
    }
    for (old, why) in OBSOLETE_DPO {
        if tx.layer.values.remove(*old).is_some() {
            tx.warn(old, format!("ignored: {why}"));
        }
    }
    match tx.layer.values.remove("reference_free") {
        None | Some(J::Null) | Some(J::Bool(false)) => {}
        Some(J::Bool(true)) => tx.error(
            Kind::Conflict,
            "reference_free",
            "TRL 1.16 removed reference-free DPO and nibble does not train it: the reference is the \
             policy's own base (with the starting adapter frozen, or the adapter off)"
                .into(),
        ),
        Some(other) => {
            tx.error(Kind::WrongType, "reference_free", format!("expected a boolean, found {other}"))
        }
    }
    if let Some(w @ J::Number(_)) = tx.layer.values.get("loss_weights") {
        // One weight for one loss, as TRL's command line reads a single value.
        let list = json!([w]);
        tx.layer.values.insert("loss_weights".into(), list);
    }
    let alpha = tx.layer.values.remove("rpo_alpha")?;
    match alpha {
        J::Null => None,
        J::Number(n) => Some((n.as_f64().unwrap_or(f64::NAN), tx.layer.origin_of("rpo_alpha"))),
        other => {
            tx.error(Kind::WrongType, "rpo_alpha", format!("expected a number, found {other}"));
            None
        }
    }
}

/// `rpo_alpha: a` (the highest layer's), applied once the layers are merged: the `sft` loss
/// added to the winning `loss_type` with weight `a` beside the winning `loss_weights`.
pub(crate) fn apply_rpo_alpha(
    dpo: &mut crate::fields::DpoArgs,
    (alpha, origin): (f64, crate::diag::Origin),
    diags: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Warning>,
) {
    use crate::types::DpoLoss;
    if dpo.loss_type.contains(&DpoLoss::Sft) {
        diags.push(Diagnostic {
            kind: Kind::Conflict,
            key: "rpo_alpha".into(),
            origin,
            message: "older spelling of the `sft` loss, which loss_type already has; keep only loss_type"
                .into(),
        });
        return;
    }
    let mut weights = dpo.loss_weights.clone().unwrap_or_else(|| vec![1.0; dpo.loss_type.len()]);
    dpo.loss_type.push(DpoLoss::Sft);
    weights.push(alpha);
    let names: Vec<&str> = dpo.loss_type.iter().map(|l| l.as_str()).collect();
    warnings.push(Warning {
        key: "rpo_alpha".into(),
        origin,
        message: format!(
            "older spelling of RPO, read as `loss_type: {names:?}` with `loss_weights: {weights:?}`"
        ),
    });
    dpo.loss_weights = Some(weights);
}

/// `dataset_mixer: {id: fraction}` + `dataset_splits` + `dataset_configs` (handbook < 2025) to
/// `dataset_mixture`. Train splits (names containing "train") are subsampled by the fraction;
/// test splits are kept whole as evaluation data, and the shuffle seed is 42, as the old
/// handbook did.
fn translate_mixer(tx: &mut Tx<'_>) {
    let mixer = tx.layer.values.remove("dataset_mixer");
    let splits = tx.layer.values.remove("dataset_splits");
    let configs = tx.layer.values.remove("dataset_configs");
    let Some(mixer) = mixer else {
        for (k, v) in [("dataset_splits", &splits), ("dataset_configs", &configs)] {
            if v.is_some() {
                tx.error(Kind::Conflict, k, "only has a meaning together with dataset_mixer (older handbook key); use dataset_mixture".into());
            }
        }
        return;
    };
    let entries: Vec<(String, J)> = match mixer {
        J::Object(m) => m.into_iter().collect(),
        J::String(s) => {
            tx.set_new("dataset_mixer", "dataset_name", J::String(s));
            return;
        }
        other => {
            tx.error(
                Kind::WrongType,
                "dataset_mixer",
                format!("expected a mapping of dataset ids to fractions, found {other}"),
            );
            return;
        }
    };
    let splits: Vec<String> = match splits {
        None => vec!["train".into(), "test".into()],
        Some(J::Array(a)) if a.iter().all(J::is_string) => {
            a.into_iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()
        }
        Some(J::String(s)) => vec![s],
        Some(other) => {
            tx.error(
                Kind::WrongType,
                "dataset_splits",
                format!("expected a list of split names, found {other}"),
            );
            return;
        }
    };
    let configs: Vec<Option<String>> = match configs {
        None => vec![None; entries.len()],
        Some(J::Array(a)) if a.len() == entries.len() => {
            a.into_iter().map(|c| c.as_str().map(str::to_owned)).collect()
        }
        Some(other) => {
            tx.error(
                Kind::Conflict,
                "dataset_configs",
                format!(
                    "expected a list with one config per dataset_mixer entry ({}), found {other}",
                    entries.len()
                ),
            );
            return;
        }
    };
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for ((id, frac), config) in entries.into_iter().zip(configs) {
        let Some(weight) = frac.as_f64() else {
            tx.error(
                Kind::WrongType,
                &format!("dataset_mixer.{id}"),
                format!("expected a fraction, found {frac}"),
            );
            continue;
        };
        for split in &splits {
            let spec = json!({"id": id, "config": config, "split": split, "weight": 1.0});
            if split.contains("train") {
                let mut spec = spec;
                spec["weight"] = json!(weight);
                train.push(spec);
            } else {
                eval.push(spec);
            }
        }
    }
    let mixture = json!({"datasets": train, "seed": 42, "eval_datasets": eval});
    tx.set_new("dataset_mixer", "dataset_mixture", mixture);
}
