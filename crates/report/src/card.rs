//! `README.md` for the adapter folder: a model card in the shape PEFT and TRL write (YAML front
//! matter the Hub reads, then description, usage, training procedure, results and versions),
//! filled from the recipe and the run's logs.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use config::Recipe;
use config::types::TargetModules;
use serde::Serialize;

use super::{EvalLog, RunSummary, TrainLog};

/// libtorch version nibble links (tch 0.24 requires PyTorch 2.11.0).
pub const LIBTORCH_VERSION: &str = "2.11.0";
/// PEFT version whose adapter files nibble writes byte for byte.
pub const PEFT_VERSION: &str = "0.21.2";
/// TRL version whose recipes and SFT loss nibble follows.
pub const TRL_VERSION: &str = "1.16.0";
/// Tags every nibble adapter card carries, with the trainer's (`sft` or `dpo`) after `nibble`.
pub const TAGS: [&str; 3] = ["nibble", "lora", "trl-compatible"];

/// A float as Python's `repr` prints it (`2e-05`, `0.9`, `3.0`), so the card reads like one
/// transformers writes.
pub(crate) fn py_float(v: f64) -> String {
    pyfiles::json::py_repr(v)
}

/// The datasets a recipe trains on (`dataset_name`, or each `dataset_mixture` id), for the
/// card's `datasets:` list.
pub fn datasets(recipe: &Recipe) -> Vec<String> {
    let mut out: Vec<String> = recipe.data.dataset_name.iter().cloned().collect();
    if let Some(mix) = &recipe.data.dataset_mixture {
        for d in &mix.datasets {
            if !out.contains(&d.id) {
                out.push(d.id.clone());
            }
        }
    }
    out
}

/// The training hyperparameters of a recipe as the card lists them (transformers' names first:
/// `learning_rate`, `train_batch_size`, ..., then QLoRA and LoRA settings).
pub fn hyperparameters(recipe: &Recipe) -> Vec<(String, String)> {
    let (m, t) = (&recipe.model, &recipe.training);
    let mut h: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| h.push((k.to_owned(), v));
    put("learning_rate", py_float(t.learning_rate));
    put("train_batch_size", t.per_device_train_batch_size.to_string());
    put("eval_batch_size", t.per_device_eval_batch_size.to_string());
    put("seed", t.seed.to_string());
    put("gradient_accumulation_steps", t.gradient_accumulation_steps.to_string());
    put(
        "total_train_batch_size",
        (t.per_device_train_batch_size * t.gradient_accumulation_steps).to_string(),
    );
    put(
        "optimizer",
        format!(
            "Use {} with betas=({},{}) and epsilon={} and weight_decay={}",
            t.optim,
            py_float(t.adam_beta1),
            py_float(t.adam_beta2),
            py_float(t.adam_epsilon),
            py_float(t.weight_decay)
        ),
    );
    put("lr_scheduler_type", t.lr_scheduler_type.to_string());
    if let Some(kw) = t.lr_scheduler_kwargs.as_ref().filter(|k| !k.is_empty()) {
        put("lr_scheduler_kwargs", serde_json::to_string(kw).unwrap_or_default());
    }
    if t.warmup_steps > 0.0 {
        let w =
            if t.warmup_steps < 1.0 { py_float(t.warmup_steps) } else { (t.warmup_steps as u64).to_string() };
        put("lr_scheduler_warmup_steps", w);
    }
    if t.max_steps > 0 {
        put("training_steps", t.max_steps.to_string());
    } else {
        put("num_epochs", py_float(t.num_train_epochs));
    }
    put("max_grad_norm", py_float(t.max_grad_norm));
    if let Some(l) = t.max_length {
        put("max_length", l.to_string());
    }
    if let Some(d) = &recipe.dpo {
        put("beta", py_float(d.beta));
        let losses: Vec<&str> = d.loss_type.iter().map(|l| l.as_str()).collect();
        put("loss_type", losses.join(", "));
        if let Some(w) = &d.loss_weights {
            put("loss_weights", w.iter().map(|x| py_float(*x)).collect::<Vec<_>>().join(", "));
        }
        put("reference", if d.precompute_ref_log_probs { "precomputed".into() } else { "each step".into() });
    } else {
        put("packing", if t.packing { format!("true ({})", t.packing_strategy) } else { "false".into() });
    }
    if t.assistant_only_loss {
        put("assistant_only_loss", "true".into());
    }
    if let Some(c) = t.completion_only_loss {
        put("completion_only_loss", c.to_string());
    }
    put("gradient_checkpointing", t.gradient_checkpointing.to_string());
    put("dtype", m.dtype.to_string());
    if m.load_in_4bit {
        put(
            "quantization",
            format!(
                "4-bit {} (bitsandbytes layout), double quant: {}",
                m.bnb_4bit_quant_type, m.use_bnb_nested_quant
            ),
        );
    }
    put("lora_r", m.lora_r.to_string());
    put("lora_alpha", m.lora_alpha.to_string());
    put("lora_dropout", py_float(m.lora_dropout));
    let targets = match &m.lora_target_modules {
        None => "PEFT's default for the architecture".to_owned(),
        Some(TargetModules::List(l)) => l.join(", "),
        Some(TargetModules::Pattern(p)) => p.clone(),
    };
    put("lora_target_modules", targets);
    if m.use_rslora {
        put("use_rslora", "true".into());
    }
    h
}

/// Whether `id` looks like a Hub repository id (`org/name`) rather than a local path, so the card
/// links only what exists on the Hub.
fn is_hub_id(id: &str) -> bool {
    // A data file's name (`data/train.jsonl`) looks like `org/name` but is no hub repository.
    const FILE_TYPES: [&str; 7] = [".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt", ".tsv"];
    !id.is_empty()
        && !id.starts_with(['/', '.', '~'])
        && id.matches('/').count() <= 1
        && !id.contains('\\')
        && !FILE_TYPES.iter().any(|t| id.to_ascii_lowercase().ends_with(t))
        && !std::path::Path::new(id).exists()
}

/// The folder name for the quick start: the path as given when it is relative, else its last
/// component (a card never shows the machine's absolute paths).
fn quick_start_path(output_dir: &str) -> String {
    let p = std::path::Path::new(output_dir);
    if p.is_absolute() {
        p.file_name().map_or_else(|| "path/to/adapter".to_owned(), |n| n.to_string_lossy().into_owned())
    } else {
        output_dir.to_owned()
    }
}

#[derive(Serialize)]
struct FrontMatter<'a> {
    /// Only a hub id (the hub reads it as a repository).
    #[serde(skip_serializing_if = "Option::is_none")]
    base_model: Option<&'a str>,
    library_name: &'a str,
    model_name: &'a str,
    pipeline_tag: &'a str,
    tags: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    datasets: Vec<&'a str>,
}

fn fmt4(v: f64) -> String {
    if v.is_finite() { format!("{v:.4}") } else { "-".into() }
}

/// Everything the card needs beyond the summary.
pub struct CardInput<'a> {
    /// What the run was.
    pub summary: &'a RunSummary,
    /// The folder's path as the user gave it, for the usage snippet.
    pub output_dir: &'a str,
    /// Train logs of the whole run.
    pub train: &'a [TrainLog],
    /// Eval logs of the whole run.
    pub eval: &'a [EvalLog],
    /// Final metrics (`train_loss`, `train_runtime`, ...).
    pub metrics: &'a BTreeMap<String, f64>,
    /// TensorBoard folder, relative to the output folder when inside it.
    pub tensorboard: Option<String>,
}

/// The card's Markdown.
pub fn render(c: &CardInput<'_>) -> String {
    let s = c.summary;
    let front = FrontMatter {
        base_model: Some(s.base_model.as_str()).filter(|b| is_hub_id(b)),
        library_name: "peft",
        model_name: &s.model_name,
        pipeline_tag: "text-generation",
        tags: [TAGS[0], s.trainer.as_str()].into_iter().chain(TAGS[1..].iter().copied()).collect(),
        datasets: s.datasets.iter().map(String::as_str).filter(|d| is_hub_id(d)).collect(),
    };
    let yaml = serde_json::to_value(&front).map(|v| config::yaml::to_string(&v)).unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "---\n{}---\n", yaml);
    let _ = writeln!(md, "# Model Card for {}\n", s.model_name);

    let base = if is_hub_id(&s.base_model) {
        format!("[{0}](https://huggingface.co/{0})", s.base_model)
    } else {
        format!("`{}`", s.base_model)
    };
    let on = match s.datasets.as_slice() {
        [] => String::new(),
        ds => {
            let names: Vec<String> = ds
                .iter()
                .map(|d| {
                    if is_hub_id(d) {
                        format!("[{0}](https://huggingface.co/datasets/{0})", d)
                    } else {
                        format!("`{d}`")
                    }
                })
                .collect();
            format!(" on {}", names.join(", "))
        }
    };
    let (method, trl_trainer) = match s.trainer {
        config::Trainer::Sft => ("supervised fine-tuning (SFT)", "SFTTrainer"),
        config::Trainer::Dpo => {
            ("Direct Preference Optimization ([DPO](https://huggingface.co/papers/2305.18290))", "DPOTrainer")
        }
    };
    let _ = writeln!(md, "## Model description\n");
    let _ = writeln!(
        md,
        "This is a LoRA adapter for {base}, trained by {method}{on} with \
         [nibble](https://github.com/nibble-rs/nibble), a Rust QLoRA trainer that follows TRL's `{trl_trainer}`. \
         The adapter (`adapter_config.json`, `adapter_model.safetensors`) is in PEFT's format and loads \
         with PEFT like any adapter trained with TRL.\n"
    );
    let _ = writeln!(md, "## Quick start\n");
    let _ = writeln!(
        md,
        "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n\
         model = AutoPeftModelForCausalLM.from_pretrained(\"{0}\")\n\
         tokenizer = AutoTokenizer.from_pretrained(\"{0}\")\n```\n",
        quick_start_path(c.output_dir)
    );
    let _ = writeln!(md, "## Training procedure\n");
    let mut logs = "`log.jsonl` (one JSON object per log)".to_owned();
    if let Some(tb) = &c.tensorboard {
        let _ = write!(logs, ", TensorBoard events in `{tb}`");
    }
    let _ = writeln!(
        md,
        "This model was trained with {}. The resolved recipe is `recipe.yaml` in this folder; the logs are {logs}.\n",
        s.trainer.as_str().to_uppercase()
    );
    let _ = writeln!(md, "![training loss](loss.png)\n");
    if c.train.iter().any(|l| l.metrics.contains_key(crate::MARGIN_METRIC)) {
        let _ = writeln!(md, "![reward margin](rewards.png)\n");
    }
    let _ = writeln!(
        md,
        "### Training hyperparameters\n\nThe following hyperparameters were used during training:"
    );
    for (k, v) in &s.hyperparameters {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "### Training results\n");
    let _ = writeln!(md, "| Training Loss | Epoch | Step | Validation Loss |");
    let _ = writeln!(md, "|:-------------:|:-----:|:----:|:---------------:|");
    for row in result_rows(c.train, c.eval) {
        let _ = writeln!(md, "| {} | {} | {} | {} |", row.0, row.1, row.2, row.3);
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "| Final metric | Value |\n|:--|--:|");
    if let Some(v) = c.metrics.get("train_loss") {
        let _ = writeln!(md, "| train_loss (mean over the run's steps) | {} |", fmt4(*v));
    }
    if let Some(last) = c.train.last() {
        let _ = writeln!(md, "| last logged train loss (step {}) | {} |", last.step, fmt4(last.loss));
    }
    if let Some(last) = c.eval.last() {
        let _ = writeln!(md, "| eval_loss (step {}) | {} |", last.step, fmt4(last.eval_loss));
        if let Some(a) = last.eval_mean_token_accuracy {
            let _ = writeln!(md, "| eval_mean_token_accuracy | {} |", fmt4(a));
        }
    }
    if let Some(a) = c.train.last().and_then(|l| l.mean_token_accuracy) {
        let _ = writeln!(md, "| last train mean_token_accuracy | {} |", fmt4(a));
    }
    if let Some(v) = c.metrics.get("train_runtime") {
        let _ = writeln!(md, "| train_runtime (s) | {} |", py_float(*v));
    }
    if let Some(v) = c.metrics.get("epoch") {
        let _ = writeln!(md, "| epoch | {} |", fmt4(*v));
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "### Framework versions\n");
    let _ = writeln!(md, "- nibble: {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(md, "- libtorch: {LIBTORCH_VERSION}");
    let _ = writeln!(md, "- PEFT (adapter format): {PEFT_VERSION}");
    let _ = writeln!(md, "- TRL (recipe and loss semantics): {TRL_VERSION}");
    md
}

/// Rows of the results table: one per evaluation (with the train loss logged last before it), or
/// without evaluations up to 20 train logs spread over the run (the last included).
fn result_rows(train: &[TrainLog], eval: &[EvalLog]) -> Vec<(String, String, String, String)> {
    if !eval.is_empty() {
        return eval
            .iter()
            .map(|e| {
                let tl = train
                    .iter()
                    .rev()
                    .find(|t| t.step <= e.step)
                    .map_or("No log".to_owned(), |t| fmt4(t.loss));
                (tl, format!("{:.4}", e.epoch), e.step.to_string(), fmt4(e.eval_loss))
            })
            .collect();
    }
    let n = train.len();
    let keep: Vec<usize> =
        if n <= 20 { (0..n).collect() } else { (1..=20).map(|i| i * n / 20 - 1).collect() };
    keep.into_iter()
        .map(|i| &train[i])
        .map(|t| (fmt4(t.loss), format!("{:.4}", t.epoch), t.step.to_string(), "No log".to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_repr() {
        assert_eq!(py_float(2e-5), "2e-05");
        assert_eq!(py_float(0.0002), "0.0002");
        assert_eq!(py_float(1e-8), "1e-08");
        assert_eq!(py_float(0.9), "0.9");
        assert_eq!(py_float(3.0), "3.0");
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(1.5e-4), "0.00015");
        assert_eq!(py_float(2.5e-5), "2.5e-05");
        assert_eq!(py_float(1e20), "1e+20");
    }

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(is_hub_id("Qwen/Qwen2.5-0.5B"));
        assert!(is_hub_id("gpt2"));
        assert!(!is_hub_id("/models/qwen"));
        assert!(!is_hub_id("./data/train.jsonl"));
        assert!(!is_hub_id("a/b/c"));
        // A local data file or folder is not a hub repository, however it is spelled.
        assert!(!is_hub_id("data/tiny-prefs.jsonl"));
        assert!(!is_hub_id("corpus/train.parquet"));
        assert_eq!(quick_start_path("/home/me/runs/qwen-sft"), "qwen-sft");
        assert_eq!(quick_start_path("runs/qwen-sft"), "runs/qwen-sft");
    }

    #[test]
    fn results_rows_are_bounded() {
        let t: Vec<TrainLog> =
            (1..=100).map(|s| TrainLog { step: s, loss: s as f64, ..TrainLog::default() }).collect();
        let rows = result_rows(&t, &[]);
        assert_eq!(rows.len(), 20);
        assert_eq!(rows.last().map(|r| r.2.as_str()), Some("100"));
        let e = [EvalLog { step: 50, eval_loss: 0.5, ..EvalLog::default() }];
        let rows = result_rows(&t, &e);
        assert_eq!(rows, vec![("50.0000".into(), "0.0000".into(), "50".into(), "0.5000".into())]);
    }
}
