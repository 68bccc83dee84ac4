//! Range and consistency checks over a typed recipe; every failure becomes one diagnostic.

use crate::diag::Kind;
use crate::fields::{DataArgs, DpoArgs, ModelArgs, TrainingArgs};
use crate::types::{Interval, PadTo, ReportTo, SaveStrategy};

/// Receives problems found by [`check`]: kind, dotted key path, message.
pub(crate) trait Report {
    fn report(&mut self, kind: Kind, key: &str, message: String);
}

fn range(r: &mut impl Report, key: &str, ok: bool, what: &str, got: impl std::fmt::Display) {
    if !ok {
        r.report(Kind::OutOfRange, key, format!("must be {what}, got {got}"));
    }
}

/// Check everything; `r` collects the problems.
pub(crate) fn check(m: &ModelArgs, d: &DataArgs, t: &TrainingArgs, r: &mut impl Report) {
    // Model and adapter.
    match &m.model_name_or_path {
        None => r.report(
            Kind::Missing,
            "model_name_or_path",
            "required: a local model directory or a hub id".into(),
        ),
        Some(p) if p.trim().is_empty() => {
            r.report(Kind::OutOfRange, "model_name_or_path", "must not be empty".into())
        }
        Some(_) => {}
    }
    range(r, "lora_r", m.lora_r >= 1, "at least 1", m.lora_r);
    range(r, "lora_alpha", m.lora_alpha > 0, "greater than 0", m.lora_alpha);
    range(r, "lora_dropout", (0.0..1.0).contains(&m.lora_dropout), "in [0, 1)", m.lora_dropout);
    if m.load_in_4bit && m.load_in_8bit {
        r.report(
            Kind::Conflict,
            "load_in_8bit",
            "load_in_4bit and load_in_8bit cannot both be true; pick one".into(),
        );
    }
    if (m.load_in_4bit || m.load_in_8bit) && !m.use_peft {
        let key = if m.load_in_4bit { "load_in_4bit" } else { "load_in_8bit" };
        r.report(
            Kind::Conflict,
            key,
            "quantized weights cannot be trained; set use_peft: true to train a LoRA adapter on them".into(),
        );
    }
    if let Some(crate::types::TargetModules::List(l)) = &m.lora_target_modules
        && l.is_empty()
    {
        r.report(
            Kind::OutOfRange,
            "lora_target_modules",
            "must name at least one module (or be `all-linear`)".into(),
        );
    }

    // Data.
    match (&d.dataset_name, &d.dataset_mixture) {
        (None, None) => {
            r.report(Kind::Missing, "dataset_name", "no dataset: set dataset_name or dataset_mixture".into())
        }
        (Some(_), Some(_)) => r.report(
            Kind::Conflict,
            "dataset_mixture",
            "set either dataset_name or dataset_mixture, not both".into(),
        ),
        _ => {}
    }
    if let Some(mix) = &d.dataset_mixture {
        check_mixture(mix, r);
    }
    // Optimisation.
    range(
        r,
        "learning_rate",
        t.learning_rate >= 0.0 && t.learning_rate.is_finite(),
        "a finite number >= 0",
        t.learning_rate,
    );
    range(r, "weight_decay", t.weight_decay >= 0.0, ">= 0", t.weight_decay);
    range(r, "adam_beta1", (0.0..1.0).contains(&t.adam_beta1), "in [0, 1)", t.adam_beta1);
    range(r, "adam_beta2", (0.0..1.0).contains(&t.adam_beta2), "in [0, 1)", t.adam_beta2);
    range(r, "adam_epsilon", t.adam_epsilon > 0.0, "greater than 0", t.adam_epsilon);
    range(r, "max_grad_norm", t.max_grad_norm >= 0.0, ">= 0 (0 disables clipping)", t.max_grad_norm);
    range(
        r,
        "warmup_steps",
        t.warmup_steps >= 0.0 && (t.warmup_steps < 1.0 || t.warmup_steps.fract() == 0.0),
        "a ratio in [0, 1) or a whole step count",
        t.warmup_steps,
    );
    range(
        r,
        "per_device_train_batch_size",
        t.per_device_train_batch_size >= 1,
        "at least 1",
        t.per_device_train_batch_size,
    );
    range(
        r,
        "per_device_eval_batch_size",
        t.per_device_eval_batch_size >= 1,
        "at least 1",
        t.per_device_eval_batch_size,
    );
    range(
        r,
        "gradient_accumulation_steps",
        t.gradient_accumulation_steps >= 1,
        "at least 1",
        t.gradient_accumulation_steps,
    );
    range(
        r,
        "max_steps",
        t.max_steps == -1 || t.max_steps >= 1,
        "-1 (use num_train_epochs) or at least 1",
        t.max_steps,
    );
    if t.max_steps == -1 {
        range(
            r,
            "num_train_epochs",
            t.num_train_epochs > 0.0,
            "greater than 0 when max_steps is -1",
            t.num_train_epochs,
        );
    }
    if t.bf16 == Some(true) && t.fp16 {
        r.report(Kind::Conflict, "fp16", "bf16 and fp16 cannot both be true".into());
    }
    if let Some(n) = t.max_length {
        range(r, "max_length", n >= 1, "at least 1", n);
    }
    if let Some(n) = t.dataset_num_proc {
        range(r, "dataset_num_proc", n >= 1, "at least 1", n);
    }
    if let Some(PadTo::Word(w)) = &t.pad_to_multiple_of
        && w != "auto"
    {
        r.report(Kind::OutOfRange, "pad_to_multiple_of", format!("must be a number or `auto`, got `{w}`"));
    }
    if let Some(PadTo::Multiple(0)) = &t.pad_to_multiple_of {
        r.report(Kind::OutOfRange, "pad_to_multiple_of", "must be at least 1".into());
    }

    // Logging, evaluation, checkpoints.
    if t.logging_strategy == Interval::Steps {
        range(r, "logging_steps", t.logging_steps > 0.0, "greater than 0", t.logging_steps);
    }
    if t.save_strategy == SaveStrategy::Steps {
        range(r, "save_steps", t.save_steps > 0.0, "greater than 0", t.save_steps);
    }
    if let Some(n) = t.save_total_limit {
        range(r, "save_total_limit", n >= 1, "at least 1", n);
    }
    if let Some(s) = t.eval_steps {
        range(r, "eval_steps", s > 0.0, "greater than 0", s);
    }
    if t.eval_strategy != Interval::No {
        let has_eval = d.dataset_name.is_some()
            || d.dataset_mixture
                .as_ref()
                .is_some_and(|m| m.test_split_size.is_some() || !m.eval_datasets.is_empty());
        if !has_eval {
            r.report(
                Kind::Conflict,
                "eval_strategy",
                "evaluation needs held-out data: set dataset_mixture.test_split_size".into(),
            );
        }
    }
    if t.save_strategy == SaveStrategy::Best && t.eval_strategy == Interval::No {
        r.report(Kind::Conflict, "save_strategy", "`best` needs evaluation; set eval_strategy".into());
    }
    if let ReportTo::Many(v) = &t.report_to
        && v.iter().any(|s| s == "none")
        && v.len() > 1
    {
        r.report(Kind::Conflict, "report_to", "`none` cannot be combined with other integrations".into());
    }
    if t.output_dir.as_deref().is_some_and(|o| o.trim().is_empty()) {
        r.report(Kind::OutOfRange, "output_dir", "must not be empty".into());
    }
}

fn check_mixture(mix: &crate::types::DatasetMixture, r: &mut impl Report) {
    if mix.datasets.is_empty() {
        r.report(Kind::OutOfRange, "dataset_mixture.datasets", "must list at least one dataset".into());
    }
    for (i, ds) in mix.datasets.iter().chain(&mix.eval_datasets).enumerate() {
        let key = if i < mix.datasets.len() {
            format!("dataset_mixture.datasets.{i}")
        } else {
            format!("dataset_mixture.eval_datasets.{}", i - mix.datasets.len())
        };
        if ds.id.trim().is_empty() {
            r.report(Kind::OutOfRange, &format!("{key}.id"), "must not be empty".into());
        }
        range(
            r,
            &format!("{key}.weight"),
            ds.weight > 0.0 && ds.weight <= 1.0,
            "in (0, 1] (the fraction kept)",
            ds.weight,
        );
    }
    let sets: Vec<_> = mix
        .datasets
        .iter()
        .filter_map(|ds| ds.columns.as_ref())
        .map(|c| {
            let mut c = c.clone();
            c.sort();
            c
        })
        .collect();
    if sets.windows(2).any(|w| w[0] != w[1]) {
        r.report(
            Kind::Conflict,
            "dataset_mixture.datasets",
            format!("every dataset must keep the same columns, found {sets:?}"),
        );
    }
    if let Some(s) = mix.test_split_size {
        let ok = s > 0.0 && (s < 1.0 || s.fract() == 0.0);
        range(r, "dataset_mixture.test_split_size", ok, "a fraction in (0, 1) or a whole row count", s);
    }
}

/// DPOConfig's own keys; how the losses combine is checked where the objective is built.
pub(crate) fn check_dpo(m: &ModelArgs, d: &DpoArgs, r: &mut impl Report) {
    range(r, "beta", d.beta.is_finite() && d.beta > 0.0, "a finite number greater than 0", d.beta);
    if d.loss_type.is_empty() {
        r.report(Kind::OutOfRange, "loss_type", "must name at least one loss".into());
    }
    if let Some(w) = &d.loss_weights {
        if w.len() != d.loss_type.len() {
            r.report(
                Kind::Conflict,
                "loss_weights",
                format!(
                    "has {} weights for {} loss types; give one per loss_type entry",
                    w.len(),
                    d.loss_type.len()
                ),
            );
        }
        if let Some(bad) = w.iter().find(|x| !x.is_finite()) {
            r.report(Kind::OutOfRange, "loss_weights", format!("must be finite numbers, got {bad}"));
        }
    }
    let ls = d.label_smoothing;
    range(r, "label_smoothing", (0.0..0.5).contains(&ls), "in [0, 0.5)", ls);
    if let Some(a) = d.ld_alpha {
        range(r, "ld_alpha", (0.0..=1.0).contains(&a), "in [0, 1]", a);
    }
    let c = d.f_alpha_divergence_coef;
    range(r, "f_alpha_divergence_coef", c.is_finite(), "a finite number", c);
    range(
        r,
        "discopop_tau",
        d.discopop_tau.is_finite() && d.discopop_tau > 0.0,
        "greater than 0",
        d.discopop_tau,
    );
    if let Some(b) = d.precompute_ref_batch_size {
        range(r, "precompute_ref_batch_size", b >= 1, "at least 1", b);
    }
    if d.sync_ref_model {
        r.report(
            Kind::Conflict,
            "sync_ref_model",
            "TR-DPO moves a separate reference model; with a LoRA adapter the reference is the base with \
             the adapter off (TRL refuses it with PEFT too); set sync_ref_model: false"
                .into(),
        );
    }
    if !m.use_peft {
        r.report(
            Kind::Conflict,
            "use_peft",
            "DPO in nibble trains a LoRA adapter (the reference is the base with the adapter off, no \
             second copy of the model); set use_peft: true"
                .into(),
        );
    }
}
