//! Everything a run needs before training: the model directory, its chat template and tokenizer,
//! and the training set tokenized (through the on-disk cache) and ready to batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use config::Recipe;
use model_loader::{HfConfig, HubCache, resolve_model};
use sft::data::{Batch, Dataset, TokenizeOptions, Tokenizer, load_or_prepare};
use sft::train::{DeviceBatch, EpochBatches};
use tch::Tensor;

/// The template to use: the recipe's, else the model's `chat_template.jinja`, else the one in
/// its `tokenizer_config.json`.
fn chat_template(recipe: &Recipe, model_dir: &Path) -> Result<Option<String>> {
    if let Some(t) = &recipe.training.chat_template {
        return Ok(Some(t.clone()));
    }
    if let Some(p) = &recipe.training.chat_template_path {
        let path = Path::new(p);
        if !(path.is_file() && (p.ends_with(".jinja") || p.ends_with(".j2"))) {
            anyhow::bail!(
                "chat_template_path `{p}`: nibble reads a local .jinja/.j2 file (cloning another \
                 tokenizer's template is not supported)"
            );
        }
        return Ok(Some(std::fs::read_to_string(path).with_context(|| format!("reading {p}"))?));
    }
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(
            std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?,
        ));
    }
    let cfg = model_dir.join("tokenizer_config.json");
    if cfg.is_file() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)
            .with_context(|| format!("{}: not valid JSON", cfg.display()))?;
        return Ok(v.get("chat_template").and_then(|t| t.as_str()).map(str::to_owned));
    }
    Ok(None)
}

/// The recipe's model directory (local, or a hub-cache snapshot) and its config.json.
pub fn model(recipe: &Recipe) -> Result<(PathBuf, HfConfig)> {
    let id = recipe.model.model_name_or_path.as_deref().context("model_name_or_path is not set")?;
    let cache = HubCache::from_env(|k| std::env::var(k).ok());
    let dir = resolve_model(id, &recipe.model.model_revision, &cache)?;
    let cfg = HfConfig::from_dir(&dir)?;
    Ok((dir, cfg))
}

/// Where tokenized datasets are cached: `$NIBBLE_CACHE/tokenized`, else
/// `~/.cache/nibble/tokenized`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("NIBBLE_CACHE") {
        return Some(PathBuf::from(c).join("tokenized"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nibble/tokenized"))
}

/// The recipe's training file: `dataset_name` naming a local JSON/JSONL file.
fn data_file(recipe: &Recipe) -> Result<PathBuf> {
    if recipe.data.dataset_mixture.is_some() {
        anyhow::bail!(
            "dataset_mixture is not supported yet (issue 6): name one local JSON/JSONL file in dataset_name"
        );
    }
    let name = recipe.data.dataset_name.as_deref().context("dataset_name is not set")?;
    let path = PathBuf::from(name);
    if !path.is_file() {
        anyhow::bail!(
            "dataset_name `{name}` is not a local file; hub datasets and Parquet are not supported yet (issue 6)"
        );
    }
    Ok(path)
}

/// The tokenized training set and how the recipe batches it.
pub struct TrainData {
    dataset: Dataset,
    batch_size: usize,
    drop_last: bool,
    sequential: bool,
}

impl TrainData {
    /// Samples (rows, or packed bins).
    pub fn len(&self) -> usize {
        self.dataset.len()
    }

    /// Samples per micro-batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.dataset.batches_per_epoch(self.batch_size, self.drop_last)
    }

    /// Epoch `epoch`'s micro-batches as tensors, with their loss-token counts.
    pub fn epoch(&self, epoch: u64, seed: u64) -> EpochBatches {
        if self.sequential {
            let all = self.dataset.sequential_batches(self.batch_size).map(|b| to_device(&b));
            return all.take(self.batches_per_epoch()).collect();
        }
        self.dataset.batches(self.batch_size, seed, epoch, self.drop_last).map(|b| to_device(&b)).collect()
    }
}

fn to_device(b: &Batch) -> (DeviceBatch, u64) {
    let shape = [b.rows as i64, b.cols as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape);
    // Unpacked rows need only the causal mask (pads come last); packed rows need segments.
    let packed = b.segment_ids.iter().any(|&s| s > 0);
    let batch = DeviceBatch {
        input_ids: t(&b.input_ids),
        labels: t(&b.labels),
        position_ids: t(&b.position_ids),
        segment_ids: packed.then(|| t(&b.segment_ids)),
    };
    (batch, b.num_loss_tokens() as u64)
}

/// Read, tokenize (or load from the cache) and prepare the recipe's training set.
pub fn dataset(recipe: &Recipe, model_dir: &Path) -> Result<TrainData> {
    let sequential = match recipe.training.train_sampling_strategy.as_str() {
        "random" => false,
        "sequential" => true,
        other => anyhow::bail!(
            "train_sampling_strategy `{other}` is not supported yet (supported: random, sequential)"
        ),
    };
    let file = data_file(recipe)?;
    let tok_dir = recipe.model.tokenizer_name_or_path.as_deref().map(PathBuf::from);
    let tok_dir = tok_dir.as_deref().unwrap_or(model_dir);
    let tok = Tokenizer::from_recipe(tok_dir, recipe)?;
    let template = chat_template(recipe, tok_dir)?;
    let opts = TokenizeOptions::from_recipe(recipe);
    let (dataset, outcome) = load_or_prepare(&file, &tok, template.as_deref(), &opts, cache_dir().as_deref())
        .with_context(|| format!("preparing {}", file.display()))?;
    tracing::debug!("tokenization cache: {outcome:?}");
    let batch_size = usize::try_from(recipe.training.per_device_train_batch_size)
        .ok()
        .filter(|&b| b > 0)
        .context("per_device_train_batch_size must be >= 1")?;
    Ok(TrainData { dataset, batch_size, drop_last: recipe.training.dataloader_drop_last, sequential })
}
