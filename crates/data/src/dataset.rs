//! The tokenized dataset and the one call that builds it from rows, in TRL 1.16's order:
//! tokenize, build labels, truncate and drop fully masked rows (without packing), shuffle, pack,
//! shuffle.

use config::types::PackingStrategy;

use super::batch::{self, Batch, CollateOptions};
use super::nprandom;
use super::pack;
use super::rows::Example;
use super::tokenize::{IGNORE_INDEX, RowKind, TokenizeOptions, build_labels, tokenize_example, truncate};
use super::tokenizer::Tokenizer;
use crate::Error;
use crate::template::ChatTemplate;

/// One training sample: a tokenized row, or several packed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, -100 where no loss, same length as `input_ids`.
    pub labels: Vec<i32>,
    /// Lengths of the sequences packed in this sample (best-fit packing only).
    pub seq_lengths: Option<Vec<u32>>,
}

/// A tokenized dataset and how to batch it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The samples, in TRL's order.
    pub samples: Vec<Sample>,
    /// Padding and padding-free settings for batches.
    pub collate: CollateOptions,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Batches per epoch (see [`batch::batches_per_epoch`]).
    pub fn batches_per_epoch(&self, batch_size: usize, drop_last: bool) -> usize {
        batch::batches_per_epoch(self.len(), batch_size, drop_last)
    }

    /// One epoch of batches in seeded shuffled order (see [`batch::batches`]).
    pub fn batches(
        &self,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        drop_last: bool,
    ) -> impl Iterator<Item = Batch> + '_ {
        batch::batches(self, batch_size, seed, epoch, drop_last)
    }

    /// One epoch of batches in `order` (a permutation of the samples, e.g. the training loop's
    /// sampler's).
    pub fn batches_in(
        &self,
        order: Vec<usize>,
        batch_size: usize,
        drop_last: bool,
    ) -> impl Iterator<Item = Batch> + '_ {
        batch::batches_in_order(self, order, batch_size, drop_last)
    }

    /// Batches in dataset order.
    pub fn sequential_batches(&self, batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
        batch::sequential_batches(self, batch_size)
    }

    /// Total tokens over all samples.
    pub fn num_tokens(&self) -> usize {
        self.samples.iter().map(|s| s.input_ids.len()).sum()
    }
}

/// The batching settings, refused where TRL refuses them.
pub(crate) fn collate_options(tok: &Tokenizer, opts: &TokenizeOptions) -> Result<CollateOptions, Error> {
    if opts.padding_free && !opts.packing && opts.max_length.is_some() {
        return Err(Error::Options(
            "padding_free without packing does not enforce max_length: enable packing (packing_strategy bfd) or set \
             max_length to null"
                .into(),
        ));
    }
    let pad_token_id = tok
        .pad_token_id()
        .ok_or_else(|| Error::Options("the tokenizer has no pad or eos token; set pad_token".into()))?;
    Ok(CollateOptions {
        pad_token_id,
        padding_free: opts.effective_padding_free(),
        pad_to_multiple_of: opts.pad_to_multiple_of,
    })
}

/// Check the options and data against what TRL accepts; returns the data's kind.
fn check(
    rows: &[Example],
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
) -> Result<RowKind, Error> {
    let Some(first) = rows.first() else {
        return Err(Error::Options("the dataset has no rows".into()));
    };
    let kind = RowKind::of(first);
    if let Some((i, other)) = rows.iter().enumerate().find(|(_, r)| RowKind::of(r) != kind) {
        return Err(Error::Row {
            file: None,
            row: i + 1,
            message: format!(
                "is {:?} but the first row is {kind:?}; a dataset has one format",
                RowKind::of(other)
            ),
        });
    }
    if opts.packing && opts.max_length.is_none() {
        return Err(Error::Options("packing needs max_length".into()));
    }
    if opts.max_length == Some(0) {
        return Err(Error::Options("max_length must be at least 1".into()));
    }
    if opts.assistant_only_loss && !kind.is_conversational() {
        return Err(Error::Options(
            "assistant_only_loss is only supported for conversational datasets (`messages`, or prompt/completion as \
             message lists)"
                .into(),
        ));
    }
    if kind.is_conversational() && template.is_none() {
        return Err(Error::Options(
            "conversational data needs a chat template (the model has none; set chat_template in the recipe)"
                .into(),
        ));
    }
    // TRL swaps in a training template it knows for some models; nibble asks for one instead.
    if opts.assistant_only_loss && template.is_some_and(|t| !t.has_generation()) {
        return Err(Error::NoGenerationBlock);
    }
    Ok(kind)
}

/// Tokenize rows on all cores, keeping their order.
fn tokenize_all(
    rows: &[Example],
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
    completion_only_loss: bool,
) -> Result<(Vec<Sample>, usize), Error> {
    let work = |i: usize, ex: &Example| -> Result<(Sample, bool), Error> {
        let row_err = |message: String| Error::Row { file: None, row: i + 1, message };
        let enc = tokenize_example(ex, tok, template, opts.assistant_only_loss).map_err(row_err)?;
        if enc.assistant_mask.as_ref().is_some_and(|m| !m.contains(&1)) {
            return Err(row_err(
                "has no assistant tokens for assistant_only_loss (no `{% generation %}` output in the rendered \
                 conversation)"
                    .into(),
            ));
        }
        let labels = build_labels(&enc, completion_only_loss);
        Ok((Sample { input_ids: enc.input_ids, labels, seq_lengths: None }, enc.prompt_not_prefix))
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, 16);
    let chunk = rows.len().div_ceil(threads).max(64);
    let parts: Vec<Result<Vec<(Sample, bool)>, Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = rows
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                s.spawn(move || part.iter().enumerate().map(|(j, ex)| work(c * chunk + j, ex)).collect())
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("tokenizer thread panicked")).collect()
    });
    let mut out = Vec::with_capacity(rows.len());
    let mut not_prefix = 0;
    for part in parts {
        for (s, np) in part? {
            not_prefix += usize::from(np);
            out.push(s);
        }
    }
    Ok((out, not_prefix))
}

fn shuffled(samples: Vec<Sample>, seed: u64) -> Vec<Sample> {
    let order = nprandom::permutation(&[seed], samples.len());
    let mut slots: Vec<Option<Sample>> = samples.into_iter().map(Some).collect();
    order.into_iter().map(|i| slots[i].take().expect("a permutation")).collect()
}

/// Tokenize, label, truncate or pack `rows` exactly as TRL 1.16's SFTTrainer prepares a dataset,
/// ready for [`Dataset::batches`]. `template` renders conversational rows.
pub fn prepare_dataset(
    rows: &[Example],
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    opts: &TokenizeOptions,
) -> Result<Dataset, Error> {
    let collate = collate_options(tok, opts)?;
    let kind = check(rows, template, opts)?;
    let completion_only_loss = opts.completion_only_loss.unwrap_or(kind.is_prompt_completion());
    let (mut samples, not_prefix) = tokenize_all(rows, tok, template, opts, completion_only_loss)?;
    if not_prefix > 0 {
        tracing::warn!(
            "{not_prefix} row(s): the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens \
             merge across the boundary, or the template renders the prompt alone differently); the completion \
             starts where they diverge, as in TRL"
        );
    }
    let tokens: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    tracing::info!(
        "tokenized {} {kind:?} rows: {tokens} tokens (completion_only_loss {completion_only_loss}, \
         assistant_only_loss {})",
        samples.len(),
        opts.assistant_only_loss
    );
    if let (Some(max), false) = (opts.max_length, opts.packing) {
        let long = samples.iter().filter(|s| s.input_ids.len() > max).count();
        for s in &mut samples {
            s.input_ids = truncate(&s.input_ids, max, opts.truncation_mode);
            s.labels = truncate(&s.labels, max, opts.truncation_mode);
        }
        let before = samples.len();
        samples.retain(|s| s.labels.iter().any(|&l| l != IGNORE_INDEX));
        if samples.is_empty() && before > 0 {
            return Err(Error::Options(format!(
                "max_length {max} leaves no row anything to train on: truncating with {} cut the trained \
                 tokens of all {before} row(s) ({long} longer than {max} tokens); raise max_length, \
                 shorten the prompts, or use truncation_mode keep_end",
                opts.truncation_mode
            )));
        }
        tracing::info!(
            "truncated {long} row(s) to {max} tokens ({:?}); dropped {} row(s) left without trained tokens",
            opts.truncation_mode,
            before - samples.len()
        );
    }
    if opts.packing {
        let max = opts.max_length.expect("checked: packing needs max_length");
        if opts.shuffle_dataset {
            samples = shuffled(samples, opts.seed);
        }
        let n = samples.len();
        samples = pack::pack(samples, max, opts.packing_strategy, opts.num_proc);
        let kept: usize = samples.iter().map(|s| s.input_ids.len()).sum();
        tracing::info!(
            "packed {n} rows into {} samples of at most {max} tokens ({}; {kept} of {tokens} tokens kept)",
            samples.len(),
            match opts.packing_strategy {
                PackingStrategy::Bfd => "bfd",
                PackingStrategy::BfdSplit => "bfd_split",
                PackingStrategy::Wrapped => "wrapped",
            }
        );
    }
    if opts.shuffle_dataset {
        samples = shuffled(samples, opts.seed);
    }
    Ok(Dataset { samples, collate })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn tiny() -> Tokenizer {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama"))
            .expect("tok")
    }

    fn chat(user: &str, reply: &str) -> Example {
        Example::Conversation {
            messages: serde_json::from_value(
                json!([{"role": "user", "content": user}, {"role": "assistant", "content": reply}]),
            )
            .expect("messages"),
            tools: None,
            kwargs: None,
        }
    }

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}";

    #[test]
    fn mixed_formats_are_refused_by_row() {
        let t = ChatTemplate::new(CHATML).expect("compiles");
        let rows = vec![chat("a", "b"), Example::Text("x".into())];
        let e = prepare_dataset(&rows, &tiny(), Some(&t), &TokenizeOptions::default()).expect_err("mixed");
        assert!(e.to_string().starts_with("row 2:"), "{e}");
    }

    #[test]
    fn assistant_only_loss_needs_generation_blocks() {
        let t = ChatTemplate::new(CHATML).expect("compiles");
        let opts = TokenizeOptions { assistant_only_loss: true, ..TokenizeOptions::default() };
        let e = prepare_dataset(&[chat("a", "b")], &tiny(), Some(&t), &opts).expect_err("no generation");
        assert!(e.to_string().contains("generation"), "{e}");
    }

    #[test]
    fn truncation_drops_rows_without_trained_tokens() {
        let rows = vec![
            Example::PromptCompletion { prompt: "a long prompt here".into(), completion: " x".into() },
            Example::PromptCompletion { prompt: "q".into(), completion: " y".into() },
        ];
        let opts = TokenizeOptions { max_length: Some(3), ..TokenizeOptions::default() };
        let d = prepare_dataset(&rows, &tiny(), None, &opts).expect("ok");
        assert_eq!(d.len(), 1);
        assert!(d.samples.iter().all(|s| s.input_ids.len() <= 3));
        // Every row cut down to its prompt: said as such, with the numbers, not as an empty set.
        let e = prepare_dataset(&rows[..1], &tiny(), None, &opts).expect_err("nothing left").to_string();
        assert!(
            e.contains("max_length 3 leaves no row anything to train on") && e.contains("all 1 row(s)"),
            "{e}"
        );
    }

    #[test]
    fn packing_implies_padding_free_for_bfd_only() {
        let rows: Vec<Example> = (0..5).map(|i| Example::Text(format!("row {i}"))).collect();
        let mut opts = TokenizeOptions { packing: true, max_length: Some(16), ..TokenizeOptions::default() };
        let d = prepare_dataset(&rows, &tiny(), None, &opts).expect("ok");
        assert!(d.collate.padding_free);
        assert!(d.samples.iter().all(|s| s.input_ids.len() <= 16 && s.seq_lengths.is_some()));
        opts.packing_strategy = PackingStrategy::Wrapped;
        let d = prepare_dataset(&rows, &tiny(), None, &opts).expect("ok");
        assert!(!d.collate.padding_free);
        let b: Vec<Batch> = d.batches(2, 1, 0, false).collect();
        assert_eq!(b.len(), d.batches_per_epoch(2, false));
    }

    #[test]
    fn refused_combinations() {
        let rows = vec![Example::Text("a".into())];
        let o = TokenizeOptions { padding_free: true, ..TokenizeOptions::default() };
        assert!(prepare_dataset(&rows, &tiny(), None, &o).is_err());
        let o = TokenizeOptions { packing: true, max_length: None, ..TokenizeOptions::default() };
        assert!(prepare_dataset(&rows, &tiny(), None, &o).is_err());
        let o = TokenizeOptions { assistant_only_loss: true, ..TokenizeOptions::default() };
        assert!(prepare_dataset(&rows, &tiny(), None, &o).is_err());
        assert!(prepare_dataset(&[], &tiny(), None, &TokenizeOptions::default()).is_err());
        assert!(prepare_dataset(&[chat("a", "b")], &tiny(), None, &TokenizeOptions::default()).is_err());
    }
}
