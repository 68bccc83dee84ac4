//! Everything a run needs before training: the model directory, its chat template and tokenizer,
//! and the training set tokenized (through the on-disk cache) and ready to batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use config::Recipe;
use data::template::ChatTemplate;
use data::{
    Batch, DataPlan, Dataset, Example, LoadedData, TokenizeOptions, Tokenizer, load_or_prepare_rows,
    shard_indices,
};
use pyfiles::HubCache;
use sft::train::{DeviceBatch, EpochBatches};
use tch::Tensor;

/// The template to use: the recipe's (`chat_template`, `chat_template_path`), else the one the
/// tokenizer's folder ships (`data::template::find_chat_template`).
pub(crate) fn chat_template(recipe: &Recipe, tokenizer_dir: &Path) -> Result<Option<String>> {
    if let Some(t) = &recipe.training.chat_template {
        return Ok(Some(t.clone()));
    }
    if let Some(p) = &recipe.training.chat_template_path {
        // A local .jinja/.j2 file: the plan refuses anything else.
        return Ok(Some(std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?));
    }
    Ok(data::template::find_chat_template(&[tokenizer_dir])?)
}

/// The run plan's data section: where the rows come from, the tokenizer and template that turn
/// them into tokens, and how they are batched, all found and checked before any row is read.
pub(crate) struct DataSetup {
    /// Every file of the training (and eval) data, found and fingerprinted.
    pub sources: DataPlan,
    /// `dataset_text_field`.
    pub text_field: String,
    /// `skip_invalid_rows`: drop rows of no TRL format (with a count) instead of failing.
    pub skip_invalid_rows: bool,
    /// The tokenizer's folder (`tokenizer_name_or_path`, else the model's).
    pub tokenizer_dir: PathBuf,
    /// The tokenizer, with the recipe's `eos_token` / `pad_token`.
    pub tokenizer: Tokenizer,
    /// The chat template's source.
    pub chat_template: Option<String>,
    /// How the training set is tokenized, truncated and packed.
    pub train: TokenizeOptions,
    /// The same for the eval set (`eval_packing`).
    pub eval: TokenizeOptions,
    /// `per_device_train_batch_size`.
    pub batch_size: usize,
    /// `per_device_eval_batch_size`.
    pub eval_batch_size: usize,
    /// `dataloader_drop_last`.
    pub drop_last: bool,
    /// `train_sampling_strategy: sequential`.
    pub sequential: bool,
    /// Where tokenized sets are cached (pyfiles' rule); `None`: not cached.
    pub cache_dir: Option<PathBuf>,
}

impl DataSetup {
    /// What the plan reports under each key when it cannot be set up.
    /// `model_dir` is `None` when the model was not found (a problem reported already): the data
    /// files are still checked, the tokenizer only when the recipe names its own.
    pub(crate) fn resolve(
        recipe: &Recipe,
        model_dir: Option<&Path>,
    ) -> Result<DataSetup, Vec<(&'static str, String)>> {
        let t = &recipe.training;
        let mut problems = Vec::new();
        let hub = HubCache::from_process_env();
        let data_key = if recipe.data.dataset_mixture.is_some() { "dataset_mixture" } else { "dataset_name" };
        let sources =
            DataPlan::from_recipe(recipe, &hub).map_err(|e| problems.push((data_key, e.to_string()))).ok();
        let Some(tokenizer_dir) = recipe
            .model
            .tokenizer_name_or_path
            .as_deref()
            .map(PathBuf::from)
            .or(model_dir.map(Path::to_owned))
        else {
            return Err(problems);
        };
        let tokenizer = Tokenizer::from_recipe(&tokenizer_dir, recipe)
            .map_err(|e| {
                let key = match &e {
                    data::Error::UnknownToken { key, .. } => key,
                    _ if recipe.model.tokenizer_name_or_path.is_some() => "tokenizer_name_or_path",
                    _ => "model_name_or_path",
                };
                problems.push((key, e.to_string()));
            })
            .ok();
        let template_key =
            if t.chat_template_path.is_some() { "chat_template_path" } else { "chat_template" };
        // (A `chat_template_path` that is no file is reported by the plan's own check.)
        let unreadable_path = t.chat_template_path.as_deref().is_some_and(|p| !Path::new(p).is_file());
        let chat_template = chat_template(recipe, &tokenizer_dir)
            .map_err(|e| {
                if !unreadable_path {
                    problems.push((template_key, format!("{e:#}")));
                }
            })
            .ok();
        let (Some(sources), Some(tokenizer), Some(chat_template)) = (sources, tokenizer, chat_template)
        else {
            return Err(problems);
        };
        let train = TokenizeOptions::from_recipe(recipe);
        let eval = TokenizeOptions::for_eval(recipe);
        Ok(DataSetup {
            sources,
            text_field: t.dataset_text_field.clone(),
            skip_invalid_rows: t.skip_invalid_rows,
            tokenizer_dir,
            tokenizer,
            chat_template,
            train,
            eval,
            // The plan checks both sizes are positive.
            batch_size: usize::try_from(t.per_device_train_batch_size).unwrap_or(1).max(1),
            eval_batch_size: usize::try_from(t.per_device_eval_batch_size).unwrap_or(1).max(1),
            drop_last: t.dataloader_drop_last,
            sequential: t.train_sampling_strategy == config::types::SamplingStrategy::Sequential,
            cache_dir: pyfiles::cache::tokenized_dir(|k| std::env::var(k).ok()),
        })
    }

    /// The plan's data section as `--print-config` shows it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tokenizer": self.tokenizer_dir,
            "chat_template": self.chat_template.is_some(),
            "text_field": self.text_field,
            "max_length": self.train.max_length,
            "packing": self.train.packing,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "eval_set": self.sources.eval_fingerprint().is_some(),
            "sampling": if self.sequential { "sequential" } else { "random" },
            "cache_dir": self.cache_dir,
        })
    }
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
            let order = sft::train::sampler_order(self.dataset.len(), seed, epoch);
            self.dataset.batches_in(order, self.batch_size, self.drop_last).collect()
        };
        shard_indices(all.len(), world, rank).into_iter().map(|i| to_device(&all[i])).collect()
    }
}

fn to_device(b: &Batch) -> (DeviceBatch, u64) {
    let shape = [b.rows as i64, b.cols as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape);
    // Packed rows need segments. Padded rows would need only the causal mask (pads come last),
    // but transformers masks the pads of a padded batch, which makes its grouped-query attention
    // repeat keys and values (and round their gradients) as nibble then does too; a batch
    // without padding or packing is plain causal in both.
    let masked = b.segment_ids.iter().any(|&s| s != 0);
    let batch = DeviceBatch {
        input_ids: t(&b.input_ids),
        labels: t(&b.labels),
        position_ids: t(&b.position_ids),
        segment_ids: masked.then(|| t(&b.segment_ids)),
        num_tokens: b.num_tokens() as u64,
    };
    (batch, b.num_loss_tokens() as u64)
}

/// Read, tokenize (or load from the cache) and prepare the plan's training set and, when the
/// data has one, its eval set.
pub(crate) fn dataset(setup: &DataSetup) -> Result<TrainData> {
    let skip = setup.skip_invalid_rows;
    // Skipping changes which rows are trained on, so it is part of the cache key.
    let keyed = |fp: [u8; 32]| [&fp[..], &[u8::from(skip)]].concat();
    let (tok, template) = (&setup.tokenizer, setup.chat_template.as_deref());
    // Rows are read at most once, and only when a cache misses.
    let loaded = std::cell::OnceCell::new();
    let load = || -> Result<&LoadedData, data::Error> {
        if let Some(l) = loaded.get() {
            return Ok(l);
        }
        let l = setup.sources.load_with(&setup.text_field, skip)?;
        Ok(loaded.get_or_init(|| l))
    };
    let cache = setup.cache_dir.as_deref();
    let (dataset, outcome) = load_or_prepare_rows(
        &keyed(setup.sources.train_fingerprint()),
        tok,
        template,
        &setup.train,
        cache,
        || Ok((load()?.train.clone(), None)),
    )
    .context("preparing the training set")?;
    tracing::debug!("tokenization cache (train): {outcome:?}");
    let eval = match setup.sources.eval_fingerprint() {
        Some(fp) => {
            let (ds, outcome) = load_or_prepare_rows(&keyed(fp), tok, template, &setup.eval, cache, || {
                Ok((load()?.eval.clone().unwrap_or_default(), None))
            })
            .context("preparing the eval set")?;
            tracing::debug!("tokenization cache (eval): {outcome:?}");
            Some(ds)
        }
        None => None,
    };
    let first = match loaded.get() {
        Some(l) => l.train.first().cloned(),
        None => {
            setup.sources.load_with(&setup.text_field, skip).ok().and_then(|l| l.train.into_iter().next())
        }
    };
    let sample_prompt = first.and_then(|row| sample_prompt(row, template));
    Ok(TrainData {
        tokenizer: tok.clone(),
        sample_prompt,
        dataset,
        eval,
        eval_batch_size: setup.eval_batch_size,
        batch_size: setup.batch_size,
        drop_last: setup.drop_last,
        sequential: setup.sequential,
    })
}

/// The first row's prompt as the model sees it before its answer: a conversation up to its last
/// assistant turn rendered with `add_generation_prompt`, or a prompt/completion row's prompt.
fn sample_prompt(row: Example, template: Option<&str>) -> Option<String> {
    let render = |messages: &[data::Message]| -> Option<String> {
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
