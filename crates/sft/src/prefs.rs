//! DPO's data for a run: the plan's preference rows tokenized as TRL 1.16's DPOTrainer does
//! (`data::preference`), shuffled and sharded per epoch as SFT's rows are, collated into
//! micro-batches of 2B sequences, and, with `precompute_ref_log_probs`, the reference's
//! log-probs computed once before training and attached to each micro-batch.

use anyhow::{Context, Result, bail};
use config::types::TruncationMode;
use data::preference::{PreferenceIds, collate_preferences};
use data::preference_cache::{PairOptions, load_or_prepare_preferences};
use data::{batches_per_epoch, epoch_order, shard_indices};
use model_loader::CausalLm;
use sft::train::dpo::{DpoMicroBatch, SequenceLogps, reference_logps};
use tch::{Kind, Tensor};

use crate::prepare::DataSetup;

/// The reference's numbers for one pair: chosen, then rejected.
#[derive(Debug, Clone, Copy)]
struct RefPair {
    sums: [f32; 2],
    tokens: [f32; 2],
    weights: [f32; 2],
}

/// The tokenized preference pairs of a run and how they are batched.
pub(crate) struct PreferenceData {
    pairs: Vec<PreferenceIds>,
    reference: Option<Vec<RefPair>>,
    pad_id: i64,
    max_length: Option<usize>,
    mode: TruncationMode,
    pad_to_multiple_of: Option<usize>,
    batch_size: usize,
    drop_last: bool,
    sequential: bool,
}

/// Read the plan's training rows (and eval rows, when the data has an eval split) and tokenize
/// them as preference pairs, through the tokenization cache (rows are read only when it misses);
/// rows that cannot be read as pairs are errors naming their file and row, and a training set
/// left empty by truncation says so.
pub(crate) fn preferences(setup: &DataSetup) -> Result<(PreferenceData, Option<PreferenceData>)> {
    let tok = &setup.tokenizer;
    let template = setup.chat_template.as_deref();
    let (max_length, mode) = (setup.train.max_length, setup.train.truncation_mode);
    let pad_id = tok
        .pad_token_id()
        .or(tok.eos_token_id())
        .context("the tokenizer has neither a pad nor an EOS token to pad preference batches with")?;
    let opts = PairOptions { max_length, mode, skip_invalid: setup.skip_invalid_rows };
    let cache = setup.cache_dir.as_deref();
    // Rows are read at most once, and only when a cache misses.
    let loaded = std::cell::OnceCell::new();
    let load = || -> Result<&(data::Rows, Option<data::Rows>), data::Error> {
        if let Some(l) = loaded.get() {
            return Ok(l);
        }
        let l = setup.sources.load_rows()?;
        Ok(loaded.get_or_init(|| l))
    };
    let prepare = |fingerprint: [u8; 32], eval: bool| -> Result<Vec<PreferenceIds>> {
        let what = if eval { "eval" } else { "training" };
        let (p, outcome) = load_or_prepare_preferences(&fingerprint, tok, template, opts, cache, || {
            let (train, eval_rows) = load()?;
            Ok(if eval { eval_rows.clone().unwrap_or_default() } else { train.clone() })
        })
        .with_context(|| format!("preparing the {what} preference pairs"))?;
        tracing::debug!("preference cache ({what}): {outcome:?}");
        let rows = p.pairs.len() + p.dropped + p.skipped;
        if p.skipped > 0 {
            tracing::warn!(
                "{} of {rows} {what} rows skipped: not preference pairs (skip_invalid_rows)",
                p.skipped
            );
        }
        if p.dropped > 0 {
            tracing::warn!(
                "{} of {rows} {what} pairs dropped: their prompt alone fills max_length ({}), as TRL drops them",
                p.dropped,
                max_length.unwrap_or(0)
            );
        }
        if p.pairs.is_empty() && !eval {
            bail!(
                "no preference pair to train on: {rows} rows read, {} dropped because the prompt alone \
                 fills max_length ({max_length:?}){}; raise max_length or shorten the prompts",
                p.dropped,
                if p.skipped > 0 { format!(", {} skipped as invalid", p.skipped) } else { String::new() }
            );
        }
        Ok(p.pairs)
    };
    let pairs = prepare(setup.sources.train_fingerprint(), false)?;
    let data = |pairs, batch_size, drop_last, sequential| PreferenceData {
        pairs,
        reference: None,
        pad_id: i64::from(pad_id),
        max_length,
        mode,
        pad_to_multiple_of: setup.train.pad_to_multiple_of,
        batch_size,
        drop_last,
        sequential,
    };
    let eval = match setup.sources.eval_fingerprint() {
        Some(fp) => Some(data(prepare(fp, true)?, setup.eval_batch_size, false, true)),
        None => None,
    };
    Ok((data(pairs, setup.batch_size, setup.drop_last, setup.sequential), eval))
}

impl PreferenceData {
    /// Pairs to train on.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Pairs per micro-batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        batches_per_epoch(self.pairs.len(), self.batch_size, self.drop_last)
    }

    /// Micro-batches per epoch that each of `world` ranks trains on.
    pub fn batches_per_rank(&self, world: usize) -> usize {
        self.batches_per_epoch().div_ceil(world.max(1))
    }

    /// The pairs of each micro-batch of epoch `epoch`, in order (shuffled by `seed` and the epoch
    /// as SFT's rows are, unless sequential).
    fn epoch_batches(&self, epoch: u64, seed: u64) -> Vec<Vec<usize>> {
        let order: Vec<usize> = if self.sequential {
            (0..self.pairs.len()).collect()
        } else {
            epoch_order(self.pairs.len(), seed, epoch)
        };
        let mut out: Vec<Vec<usize>> = order.chunks(self.batch_size.max(1)).map(<[usize]>::to_vec).collect();
        if self.drop_last && out.last().is_some_and(|b| b.len() < self.batch_size) {
            out.pop();
        }
        out
    }

    /// The micro-batch of these pairs, with their precomputed reference log-probs if any.
    fn micro_batch(&self, idx: &[usize]) -> Result<DpoMicroBatch, tch::TchError> {
        // (Building CPU tensors from slices fails only when memory runs out.)
        let examples: Vec<&PreferenceIds> = idx.iter().map(|&i| &self.pairs[i]).collect();
        let collated =
            collate_preferences(&examples, self.pad_id, self.max_length, self.mode, self.pad_to_multiple_of);
        let mut mb = DpoMicroBatch::from_collated(&collated)?;
        if let Some(reference) = &self.reference {
            let pick = |f: &dyn Fn(&RefPair) -> [f32; 2]| -> Result<Tensor, tch::TchError> {
                let (c, r): (Vec<f32>, Vec<f32>) =
                    idx.iter().map(|&i| f(&reference[i])).map(|[c, r]| (c, r)).unzip();
                Tensor::f_from_slice(&[c, r].concat())
            };
            mb.reference = Some(SequenceLogps {
                sums: pick(&|p| p.sums)?,
                tokens: pick(&|p| p.tokens)?,
                weights: pick(&|p| p.weights)?,
                stats: None,
            });
        }
        Ok(mb)
    }

    /// Rank `rank` of `world`'s micro-batches of epoch `epoch`, each with its pair count.
    pub fn epoch_shard(&self, epoch: u64, seed: u64, rank: usize, world: usize) -> Vec<(DpoMicroBatch, u64)> {
        let all = self.epoch_batches(epoch, seed);
        shard_indices(all.len(), world, rank)
            .into_iter()
            .map(|i| {
                let mb = self
                    .micro_batch(&all[i])
                    .unwrap_or_else(|e| panic!("out of memory building a preference batch: {e}"));
                (mb, all[i].len() as u64)
            })
            .collect()
    }

    /// `precompute_ref_log_probs`: the reference's log-probs of every pair (see
    /// [`reference_logps`]: `initial` is the adapter the run started from), in batches of
    /// `batch_size` pairs in dataset order, as TRL computes them before training.
    pub fn precompute_reference(
        &mut self,
        model: &CausalLm,
        adapters: &lora::Adapters,
        initial: Option<&[Tensor]>,
        ld_alpha: Option<f64>,
        batch_size: usize,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        self.reference = None;
        let mut out = Vec::with_capacity(self.pairs.len());
        let all: Vec<usize> = (0..self.pairs.len()).collect();
        for chunk in all.chunks(batch_size.max(1)) {
            let mb = self.micro_batch(chunk)?;
            let r = reference_logps(model, adapters, initial, &mb.batch, ld_alpha)
                .context("the reference log-probs")?;
            let v = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(Vec::<f32>::try_from(t.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)?)
            };
            let (sums, tokens, weights) = (v(&r.sums)?, v(&r.tokens)?, v(&r.weights)?);
            let b = chunk.len();
            for j in 0..b {
                out.push(RefPair {
                    sums: [sums[j], sums[b + j]],
                    tokens: [tokens[j], tokens[b + j]],
                    weights: [weights[j], weights[b + j]],
                });
            }
            progress(out.len() as u64);
        }
        self.reference = Some(out);
        Ok(())
    }
}
