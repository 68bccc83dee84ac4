//! Everything a run needs before training: the model directory, its chat template and tokenizer,
//! and the training set tokenized (through the on-disk cache) and ready to batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use config::Recipe;
use model_loader::HubCache;
use sft::data::{
    Batch, DataPlan, Dataset, Example, LoadedData, PrepareError, TokenizeOptions, Tokenizer,
    load_or_prepare_rows, shard_indices,
};
use sft::template::ChatTemplate;
use sft::train::{DeviceBatch, EpochBatches};
use tch::Tensor;

/// The template to use: the recipe's (`chat_template`, `chat_template_path`), else the one the
/// tokenizer's folder ships (`sft::template::find_chat_template`).
fn chat_template(recipe: &Recipe, model_dir: &Path) -> Result<Option<String>> {
    if let Some(t) = &recipe.training.chat_template {
        return Ok(Some(t.clone()));
    }
    if let Some(p) = &recipe.training.chat_template_path {
        // A local .jinja/.j2 file: the plan refused anything else.
        return Ok(Some(std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?));
    }
    Ok(sft::template::find_chat_template(&[model_dir])?)
}

/// Where tokenized datasets are cached: `$NIBBLE_CACHE/tokenized`, else the nibble cache folder
/// by the rule `cargo xtask setup` follows for the venv (`$NIBBLE_HOME`, else
/// `$XDG_CACHE_HOME/nibble` when absolute, else `~/.cache/nibble`) + `/tokenized`.
fn cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = var("NIBBLE_CACHE")
        .or_else(|| var("NIBBLE_HOME"))
        .or_else(|| var("XDG_CACHE_HOME").filter(|p| p.is_absolute()).map(|x| x.join("nibble")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("nibble")))?;
    Some(base.join("tokenized"))
}

/// The tokenized training set and how the recipe batches it.
pub struct TrainData {
    /// The tokenizer the data was prepared with.
    pub tokenizer: Tokenizer,
    /// A prompt from the first training row (rendered for generation), to sample the trained
    /// adapter with.
    pub sample_prompt: Option<String>,
    dataset: Dataset,
    eval: Option<Dataset>,
    eval_batch_size: usize,
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

    /// The eval set's batches (in order), empty when the data has no eval split.
    pub fn eval_batches(&self) -> EpochBatches {
        match &self.eval {
            Some(ds) => ds.sequential_batches(self.eval_batch_size).map(|b| to_device(&b)).collect(),
            None => Vec::new(),
        }
    }

    /// Micro-batches per epoch that each of `world` ranks trains on (see [`shard_indices`]).
    pub fn batches_per_rank(&self, world: usize) -> usize {
        self.batches_per_epoch().div_ceil(world.max(1))
    }

    /// Rank `rank` of `world`'s share of epoch `epoch`'s micro-batches (all of them for `world`
    /// 1; see [`shard_indices`]) as tensors, with their loss-token counts.
    pub fn epoch_shard(&self, epoch: u64, seed: u64, rank: usize, world: usize) -> EpochBatches {
        let all: Vec<Batch> = if self.sequential {
            self.dataset.sequential_batches(self.batch_size).take(self.batches_per_epoch()).collect()
        } else {
            self.dataset.batches(self.batch_size, seed, epoch, self.drop_last).collect()
        };
        shard_indices(all.len(), world, rank).into_iter().map(|i| to_device(&all[i])).collect()
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
        num_tokens: b.num_tokens() as u64,
    };
    (batch, b.num_loss_tokens() as u64)
}

/// Find, read, tokenize (or load from the cache) and prepare the recipe's training set and, when
/// the data has one, its eval set.
pub fn dataset(recipe: &Recipe, model_dir: &Path) -> Result<TrainData> {
    // Other strategies are refused when the run is planned.
    let sequential = recipe.training.train_sampling_strategy == config::types::SamplingStrategy::Sequential;
    let hub = HubCache::from_env(|k| std::env::var(k).ok());
    let plan = DataPlan::from_recipe(recipe, &hub)?;
    let skip = recipe.training.skip_invalid_rows;
    // Skipping changes which rows are trained on, so it is part of the cache key.
    let keyed = |fp: [u8; 32]| [&fp[..], &[u8::from(skip)]].concat();
    let tok_dir = recipe.model.tokenizer_name_or_path.as_deref().map(PathBuf::from);
    let tok_dir = tok_dir.as_deref().unwrap_or(model_dir);
    let tok = Tokenizer::from_recipe(tok_dir, recipe)?;
    let template = chat_template(recipe, tok_dir)?;
    let opts = TokenizeOptions::from_recipe(recipe);
    // Rows are read at most once, and only when a cache misses.
    let loaded = std::cell::OnceCell::new();
    let load = || -> Result<&LoadedData, PrepareError> {
        if let Some(l) = loaded.get() {
            return Ok(l);
        }
        let l = plan.load_with(&recipe.training.dataset_text_field, skip)?;
        Ok(loaded.get_or_init(|| l))
    };
    let cache = cache_dir();
    let (dataset, outcome) = load_or_prepare_rows(
        &keyed(plan.train_fingerprint()),
        &tok,
        template.as_deref(),
        &opts,
        cache.as_deref(),
        || Ok((load()?.train.clone(), None)),
    )
    .context("preparing the training set")?;
    tracing::debug!("tokenization cache (train): {outcome:?}");
    let eval = match plan.eval_fingerprint() {
        Some(fp) => {
            let eval_opts = TokenizeOptions::for_eval(recipe);
            let (ds, outcome) = load_or_prepare_rows(
                &keyed(fp),
                &tok,
                template.as_deref(),
                &eval_opts,
                cache.as_deref(),
                || Ok((load()?.eval.clone().unwrap_or_default(), None)),
            )
            .context("preparing the eval set")?;
            tracing::debug!("tokenization cache (eval): {outcome:?}");
            Some(ds)
        }
        None => None,
    };
    let batch_size = usize::try_from(recipe.training.per_device_train_batch_size)
        .ok()
        .filter(|&b| b > 0)
        .context("per_device_train_batch_size must be >= 1")?;
    let eval_batch_size = usize::try_from(recipe.training.per_device_eval_batch_size).unwrap_or(1).max(1);
    let first = match loaded.get() {
        Some(l) => l.train.first().cloned(),
        None => plan
            .load_with(&recipe.training.dataset_text_field, skip)
            .ok()
            .and_then(|l| l.train.into_iter().next()),
    };
    let sample_prompt = first.and_then(|row| sample_prompt(row, template.as_deref()));
    Ok(TrainData {
        tokenizer: tok,
        sample_prompt,
        dataset,
        eval,
        eval_batch_size,
        batch_size,
        drop_last: recipe.training.dataloader_drop_last,
        sequential,
    })
}

/// The first row's prompt as the model sees it before its answer: a conversation up to its last
/// assistant turn rendered with `add_generation_prompt`, or a prompt/completion row's prompt.
fn sample_prompt(row: Example, template: Option<&str>) -> Option<String> {
    let render = |messages: &[sft::data::Message]| -> Option<String> {
        let t = ChatTemplate::new(template?).ok()?;
        let ctx = serde_json::json!({"messages": messages, "add_generation_prompt": true});
        Some(t.render(&ctx).ok()?.text)
    };
    match row {
        Example::Conversation { messages, .. } => {
            let last_assistant = messages.iter().rposition(|m| m.role == "assistant")?;
            render(&messages[..last_assistant])
        }
        Example::ConversationalPromptCompletion { prompt, .. } => render(&prompt),
        Example::PromptCompletion { prompt, .. } => Some(prompt),
        Example::Text(_) => None,
    }
}
