//! DPO's data for a run: the plan's preference rows tokenized as TRL 1.16's DPOTrainer does
//! (`data::preference`), shuffled and sharded per epoch as SFT's rows are, collated into
//! micro-batches of 2B sequences, and, with `precompute_ref_log_probs`, the reference's
//! log-probs computed once before training and attached to each micro-batch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use config::types::TruncationMode;
use data::preference::{PreferenceIds, collate_preferences};
use data::preference_cache::{PairOptions, load_or_prepare_preferences, preference_key};
use data::{batches_per_epoch, shard_indices};
use model_loader::CausalLm;
use sft::train::dpo::{DpoMicroBatch, Scoring, SequenceLogps, reference_logps};
use sft::train::sampler_order;
use sha2::{Digest, Sha256};
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
    /// What identifies the pairs (their cache key).
    rows_key: [u8; 32],
    reference: Option<Vec<RefPair>>,
    pad_id: i64,
    max_length: Option<usize>,
    mode: TruncationMode,
    pad_to_multiple_of: Option<usize>,
    batch_size: usize,
    drop_last: bool,
    sequential: bool,
    /// `padding_free`: the layers skip each batch's padding ([`DpoBatch::skip_padding`]).
    padding_free: bool,
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
    let prepare = |fingerprint: [u8; 32], eval: bool| -> Result<(Vec<PreferenceIds>, [u8; 32])> {
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
        Ok((p.pairs, preference_key(&fingerprint, tok, template, opts)))
    };
    let pairs = prepare(setup.sources.train_fingerprint(), false)?;
    let data = |(pairs, rows_key), batch_size, drop_last, sequential| PreferenceData {
        pairs,
        rows_key,
        reference: None,
        pad_id: i64::from(pad_id),
        max_length,
        mode,
        pad_to_multiple_of: setup.train.pad_to_multiple_of,
        batch_size,
        drop_last,
        sequential,
        padding_free: setup.train.padding_free,
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

    /// Whether the layers skip each batch's padding (`padding_free`).
    pub fn padding_free(&self) -> bool {
        self.padding_free
    }

    /// Micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        batches_per_epoch(self.pairs.len(), self.batch_size, self.drop_last)
    }

    /// Micro-batches per epoch that each of `world` ranks trains on.
    pub fn batches_per_rank(&self, world: usize) -> usize {
        self.batches_per_epoch().div_ceil(world.max(1))
    }

    /// The pairs of each micro-batch of epoch `epoch`, in order (shuffled as transformers' sampler
    /// shuffles, `sampler_order`, unless sequential).
    fn epoch_batches(&self, epoch: u64, seed: u64) -> Vec<Vec<usize>> {
        let order: Vec<usize> = if self.sequential {
            (0..self.pairs.len()).collect()
        } else {
            sampler_order(self.pairs.len(), seed, epoch)
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
        let mut mb = DpoMicroBatch::from_collated(&collated, self.padding_free)?;
        if let Some(reference) = &self.reference {
            let pick = |f: &dyn Fn(&RefPair) -> [f32; 2]| -> Result<Tensor, tch::TchError> {
                let (c, r): (Vec<f32>, Vec<f32>) =
                    idx.iter().map(|&i| f(&reference[i])).map(|[c, r]| (c, r)).unzip();
                Tensor::f_from_slice(&[c, r].concat())
            };
            mb.reference = Some(SequenceLogps {
                sums: pick(&|p| p.sums)?,
                tokens: pick(&|p| p.tokens)?,
                weights: Some(pick(&|p| p.weights)?),
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
    /// [`reference_logps`]), in batches of `pass.batch_size` pairs in dataset order, as TRL
    /// computes them before training; read from `cache` (a folder and [`reference_key`]) when a
    /// previous run left them there, and written there otherwise.
    pub fn precompute_reference(
        &mut self,
        model: &CausalLm,
        adapters: &lora::Adapters,
        pass: &ReferencePass<'_>,
        cache: Option<(&Path, [u8; 32])>,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        self.reference = None;
        if let Some((dir, key)) = cache {
            let path = reference_path(dir, &key);
            if path.is_file() {
                match read_reference(&path, &key, self.pairs.len()) {
                    Ok(r) => {
                        tracing::info!(
                            "reference log-probs of {} pairs read from {}",
                            r.len(),
                            path.display()
                        );
                        self.reference = Some(r);
                        return Ok(());
                    }
                    Err(why) => {
                        tracing::warn!("ignoring {}: {why}; computing the reference again", path.display())
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(self.pairs.len());
        let all: Vec<usize> = (0..self.pairs.len()).collect();
        for chunk in all.chunks(pass.batch_size.max(1)) {
            let mb = self.micro_batch(chunk)?;
            // The cache keeps the weights too (its format stays the one earlier runs wrote).
            let scoring = Scoring { ld_alpha: pass.ld_alpha, stats: false, weights: true };
            let r = reference_logps(model, adapters, pass.initial, &mb.batch, scoring)
                .context("the reference log-probs")?;
            let v = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(Vec::<f32>::try_from(t.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?)?)
            };
            let (sums, tokens, weights) =
                (v(&r.sums)?, v(&r.tokens)?, v(r.weights.as_ref().context("the reference's weights")?)?);
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
        if let Some((dir, key)) = cache {
            let path = reference_path(dir, &key);
            if let Err(e) = write_reference(&path, &key, &out) {
                tracing::warn!("could not cache the reference log-probs in {}: {e}", path.display());
            }
        }
        self.reference = Some(out);
        Ok(())
    }

    /// What identifies these pairs (their preference cache key).
    pub fn rows_key(&self) -> [u8; 32] {
        self.rows_key
    }
}

/// How the reference pass runs.
pub(crate) struct ReferencePass<'a> {
    /// The adapter the run started from (its frozen values), else the base alone.
    pub initial: Option<&'a [Tensor]>,
    /// LD-DPO's weight.
    pub ld_alpha: Option<f64>,
    /// Pairs per batch.
    pub batch_size: usize,
    /// `padding_free`: the pass skips each batch's padding (rounds its products otherwise).
    pub padding_free: bool,
}

/// The key of a reference pass: the pairs, the base model's files (name, size, modification
/// time) and how it loads, the starting adapter's values, LD-DPO's weight, the batch size and
/// whether the pass skips padding.
pub(crate) fn reference_key(
    rows_key: [u8; 32],
    model_dir: &Path,
    load: &model_loader::LoadOptions,
    pass: &ReferencePass<'_>,
) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"nibble-reference-logps-1\0");
    h.update(rows_key);
    let mut files: Vec<_> = std::fs::read_dir(model_dir)
        .with_context(|| format!("listing {}", model_dir.display()))?
        .filter_map(Result::ok)
        .collect();
    files.sort_by_key(std::fs::DirEntry::file_name);
    for f in files {
        let meta = f.metadata().with_context(|| format!("reading {}", f.path().display()))?;
        let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        h.update(format!("{:?} {} {:?}\n", f.file_name(), meta.len(), modified).as_bytes());
    }
    h.update(format!("{load:?} ld={:?} batch={}", pass.ld_alpha, pass.batch_size).as_bytes());
    if pass.padding_free {
        // Appended only when set, so the keys of earlier (padded) caches stay valid.
        h.update(b" padding_free");
    }
    for t in pass.initial.unwrap_or_default() {
        let v =
            Vec::<f32>::try_from(t.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_flatten(0, -1)?)?;
        h.update(format!("{:?}", t.size()).as_bytes());
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().into())
}

const REF_MAGIC: &[u8; 8] = b"NIBREF\x00\x01";

fn reference_path(dir: &Path, key: &[u8; 32]) -> PathBuf {
    data::keyed_file(dir, "reference", key)
}

/// Magic, key, pair count, six f32 per pair, sealed by a SHA-256 (`data::write_sealed`).
fn write_reference(path: &Path, key: &[u8; 32], pairs: &[RefPair]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(48 + 24 * pairs.len());
    bytes.extend_from_slice(REF_MAGIC);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
    for p in pairs {
        for x in p.sums.iter().chain(&p.tokens).chain(&p.weights) {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    data::write_sealed(path, &bytes)
}

/// The cached pass for `pairs` pairs under `key`, or why not.
fn read_reference(path: &Path, key: &[u8; 32], pairs: usize) -> Result<Vec<RefPair>, String> {
    let want = 48 + 24 * pairs + 32;
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size != want as u64 {
        return Err(format!("{size} bytes where {pairs} pairs take {want}"));
    }
    let body = data::read_sealed(path)?;
    if &body[..8] != REF_MAGIC || &body[8..40] != key {
        return Err("written for other inputs".into());
    }
    if body[40..48] != (pairs as u64).to_le_bytes() {
        return Err("written for another number of pairs".into());
    }
    let f: Vec<f32> =
        body[48..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(f.chunks_exact(6)
        .map(|x| RefPair { sums: [x[0], x[1]], tokens: [x[2], x[3]], weights: [x[4], x[5]] })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_reference_reads_back_and_damage_is_refused() {
        let dir = std::env::temp_dir().join(format!("nibble-refcache-{}", std::process::id()));
        let key = [9u8; 32];
        let pairs: Vec<RefPair> = (0..3)
            .map(|i| RefPair { sums: [-(i as f32), -2.5], tokens: [3.0, 4.0], weights: [0.5, 0.25] })
            .collect();
        let path = reference_path(&dir, &key);
        write_reference(&path, &key, &pairs).expect("write");
        let back = read_reference(&path, &key, 3).expect("read");
        assert_eq!(
            back.iter().map(|p| p.sums).collect::<Vec<_>>(),
            pairs.iter().map(|p| p.sums).collect::<Vec<_>>()
        );
        assert!(read_reference(&path, &[1u8; 32], 3).is_err(), "other inputs");
        assert!(read_reference(&path, &key, 4).is_err(), "another pair count");
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[60] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        assert!(read_reference(&path, &key, 3).expect_err("flipped").contains("checksum"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
