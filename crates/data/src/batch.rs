//! Samples to batches, as TRL 1.16's `DataCollatorForLanguageModeling` builds them, and the
//! seeded epoch order.
//!
//! Padded batches (the default): rows right-padded to the longest (rounded up to
//! `pad_to_multiple_of`) with the pad token id, labels -100 on pads. transformers then gives every
//! row the positions `0..cols` and an attention mask that hides pads.
//!
//! Padding-free batches (`padding_free`, or packing with `bfd` / `bfd_split`): the samples are
//! concatenated into one row; positions restart at 0 at each sequence (each entry of a packed
//! sample's `seq_lengths`, else each sample), pads get position 0, and TRL sets the label of every
//! position-0 token to -100, so no sequence is trained to predict the first token of the next.
//! Sequences attend only within themselves.

use super::dataset::{Dataset, Sample};
use super::nprandom;
use super::tokenize::IGNORE_INDEX;

/// How samples become batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateOptions {
    /// Id written into padding.
    pub pad_token_id: u32,
    /// Flatten each batch into one row.
    pub padding_free: bool,
    /// Round the batch length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
}

/// One batch, row-major `rows x cols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, pads included.
    pub input_ids: Vec<i64>,
    /// Targets, not shifted (the loss shifts them like transformers); -100 where no loss.
    pub labels: Vec<i64>,
    /// Position of each token in its sequence.
    pub position_ids: Vec<i64>,
    /// Index of the sequence each token belongs to within its row, -1 on pads: a token attends
    /// to an earlier-or-same token iff both have the same segment and it is not -1. A pad query
    /// (segment -1) carries no loss; give it some key (itself, say) so its softmax stays finite.
    /// transformers treats padding-free pads as one-token sequences and padded-batch pad
    /// queries as seeing the earlier tokens; neither reaches the loss.
    pub segment_ids: Vec<i64>,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
}

impl Batch {
    /// Tokens that contribute to the loss once labels are shifted: `labels[r][1..] != -100`
    /// summed over rows, which is what transformers counts (`num_items_in_batch`) to normalise
    /// the loss over a gradient-accumulation window.
    pub fn num_loss_tokens(&self) -> usize {
        if self.cols == 0 {
            return 0;
        }
        self.labels
            .chunks(self.cols)
            .map(|row| row[1..].iter().filter(|&&l| l != i64::from(IGNORE_INDEX)).count())
            .sum()
    }

    /// Tokens that are not padding.
    pub fn num_tokens(&self) -> usize {
        self.segment_ids.iter().filter(|&&s| s >= 0).count()
    }

    /// The attention mask a padded batch gives transformers: 1 on tokens, 0 on pads.
    pub fn attention_mask(&self) -> Vec<i64> {
        self.segment_ids.iter().map(|&s| i64::from(s >= 0)).collect()
    }
}

fn round_up(n: usize, multiple: Option<usize>) -> usize {
    match multiple {
        Some(m) if m > 0 && !n.is_multiple_of(m) => n + m - n % m,
        _ => n,
    }
}

/// Collate samples into a batch.
pub fn collate(samples: &[&Sample], opts: &CollateOptions) -> Batch {
    let pad = i64::from(opts.pad_token_id);
    if opts.padding_free {
        // TRL reads `seq_lengths` when the first sample has them.
        let packed = samples.first().is_some_and(|s| s.seq_lengths.is_some());
        let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
        let cols = round_up(total, opts.pad_to_multiple_of);
        let mut b = Batch {
            input_ids: Vec::with_capacity(cols),
            labels: Vec::with_capacity(cols),
            position_ids: Vec::with_capacity(cols),
            segment_ids: Vec::with_capacity(cols),
            rows: 1,
            cols,
        };
        let mut segment = -1i64;
        for s in samples {
            let whole = [s.input_ids.len() as u32];
            let lengths: &[u32] = match (&s.seq_lengths, packed) {
                (Some(l), true) => l,
                _ => &whole,
            };
            for &len in lengths {
                segment += 1;
                b.position_ids.extend(0..i64::from(len));
                b.segment_ids.extend(std::iter::repeat_n(segment, len as usize));
            }
            b.input_ids.extend(s.input_ids.iter().map(|&i| i64::from(i)));
            b.labels.extend(s.labels.iter().map(|&l| i64::from(l)));
        }
        b.input_ids.resize(cols, pad);
        b.labels.resize(cols, i64::from(IGNORE_INDEX));
        b.position_ids.resize(cols, 0);
        b.segment_ids.resize(cols, -1);
        for (l, &p) in b.labels.iter_mut().zip(&b.position_ids) {
            if p == 0 {
                *l = i64::from(IGNORE_INDEX);
            }
        }
        return b;
    }
    let longest = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let cols = round_up(longest, opts.pad_to_multiple_of);
    let rows = samples.len();
    let mut b = Batch {
        input_ids: vec![pad; rows * cols],
        labels: vec![i64::from(IGNORE_INDEX); rows * cols],
        position_ids: (0..rows).flat_map(|_| 0..cols as i64).collect(),
        segment_ids: vec![-1; rows * cols],
        rows,
        cols,
    };
    for (r, s) in samples.iter().enumerate() {
        let at = r * cols;
        for (j, (&id, &l)) in s.input_ids.iter().zip(&s.labels).enumerate() {
            b.input_ids[at + j] = i64::from(id);
            b.labels[at + j] = i64::from(l);
            b.segment_ids[at + j] = 0;
        }
    }
    b
}

/// Batches in an epoch: `ceil(len / batch_size)`, or `floor` when dropping the last partial one.
pub fn batches_per_epoch(len: usize, batch_size: usize, drop_last: bool) -> usize {
    if batch_size == 0 {
        return 0;
    }
    if drop_last { len / batch_size } else { len.div_ceil(batch_size) }
}

/// Optimizer steps per epoch with gradient accumulation, as transformers counts them: a partial
/// last window is a step, and an epoch has at least one.
pub fn update_steps_per_epoch(batches: usize, gradient_accumulation_steps: usize) -> usize {
    batches.div_ceil(gradient_accumulation_steps.max(1)).max(1)
}

/// The per-device batches that rank `rank` of `world` trains on in an epoch of `num_batches`,
/// in order, as accelerate's `BatchSamplerShard` (with `even_batches`) deals them: global batch
/// `k` is per-device batches `k*world .. k*world + world`, rank `r` takes `k*world + r`, and an
/// incomplete last global batch is completed from the epoch's first batches, so every rank gets
/// `ceil(num_batches / world)` and all ranks step together. One rank (`world` 1) takes them all.
pub fn shard_indices(num_batches: usize, world: usize, rank: usize) -> Vec<usize> {
    let world = world.max(1);
    if num_batches == 0 || rank >= world {
        return Vec::new();
    }
    (0..num_batches.div_ceil(world)).map(|k| (k * world + rank) % num_batches).collect()
}

/// The order of samples in an epoch: a permutation from numpy's default generator seeded with
/// `[seed, epoch]` (`np.random.default_rng([seed, epoch]).permutation(len)`), the same on every
/// run and machine. It is not the order of transformers' `RandomSampler` (a torch generator,
/// which `sft` draws through libtorch: `sft::train::sampler_order`).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    nprandom::permutation(&[seed, epoch], len)
}

/// An epoch's batches in seeded shuffled order.
pub fn batches(
    dataset: &Dataset,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    drop_last: bool,
) -> impl Iterator<Item = Batch> + '_ {
    let order = epoch_order(dataset.len(), seed, epoch);
    batches_in_order(dataset, order, batch_size, drop_last)
}

/// Batches in dataset order (evaluation).
pub fn sequential_batches(dataset: &Dataset, batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
    batches_in_order(dataset, (0..dataset.len()).collect(), batch_size, false)
}

pub(crate) fn batches_in_order(
    dataset: &Dataset,
    order: Vec<usize>,
    batch_size: usize,
    drop_last: bool,
) -> impl Iterator<Item = Batch> + '_ {
    let n = batches_per_epoch(order.len(), batch_size, drop_last);
    (0..n).map(move |b| {
        let idx = &order[b * batch_size..((b + 1) * batch_size).min(order.len())];
        let samples: Vec<&Sample> = idx.iter().map(|&i| &dataset.samples[i]).collect();
        collate(&samples, &dataset.collate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(ids: &[u32], labels: &[i32], seq: Option<&[u32]>) -> Sample {
        Sample { input_ids: ids.to_vec(), labels: labels.to_vec(), seq_lengths: seq.map(<[u32]>::to_vec) }
    }

    fn opts(padding_free: bool, multiple: Option<usize>) -> CollateOptions {
        CollateOptions { pad_token_id: 0, padding_free, pad_to_multiple_of: multiple }
    }

    #[test]
    fn padded_batches_match_trls_docstring() {
        let a = sample(&[1, 2, 3], &[-100, 2, 3], None);
        let b = sample(&[4, 5], &[-100, 5], None);
        let batch = collate(&[&a, &b], &opts(false, None));
        assert_eq!((batch.rows, batch.cols), (2, 3));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 5, 0]);
        assert_eq!(batch.labels, vec![-100, 2, 3, -100, 5, -100]);
        assert_eq!(batch.attention_mask(), vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(batch.segment_ids, vec![0, 0, 0, 0, 0, -1]);
        assert_eq!(batch.num_loss_tokens(), 3);
        let batch = collate(&[&a, &b], &opts(false, Some(4)));
        assert_eq!(batch.cols, 4);
        assert_eq!(batch.position_ids, vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn padding_free_masks_sequence_starts() {
        let a = sample(&[1, 2, 3], &[1, 2, 3], None);
        let b = sample(&[4, 5], &[4, 5], None);
        let batch = collate(&[&a, &b], &opts(true, None));
        assert_eq!((batch.rows, batch.cols), (1, 5));
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 1]);
        assert_eq!(batch.labels, vec![-100, 2, 3, -100, 5]);
        assert_eq!(batch.segment_ids, vec![0, 0, 0, 1, 1]);
        let packed = sample(&[1, 2, 3, 4, 5], &[1, 2, 3, 4, 5], Some(&[2, 3]));
        let batch = collate(&[&packed], &opts(true, Some(8)));
        assert_eq!(batch.position_ids, vec![0, 1, 0, 1, 2, 0, 0, 0]);
        assert_eq!(batch.segment_ids, vec![0, 0, 1, 1, 1, -1, -1, -1]);
        assert_eq!(batch.labels, vec![-100, 2, -100, 4, 5, -100, -100, -100]);
        assert_eq!(batch.num_tokens(), 5);
    }

    #[test]
    fn epochs_have_counts_and_orders() {
        assert_eq!(batches_per_epoch(10, 3, false), 4);
        assert_eq!(batches_per_epoch(10, 3, true), 3);
        assert_eq!(update_steps_per_epoch(10, 4), 3);
        assert_eq!(update_steps_per_epoch(0, 4), 1);
        assert_eq!(epoch_order(20, 1, 0), epoch_order(20, 1, 0));
        assert_ne!(epoch_order(20, 1, 0), epoch_order(20, 1, 1));
    }

    #[test]
    fn shards_deal_each_global_batch_across_the_ranks() {
        assert_eq!(shard_indices(5, 1, 0), [0, 1, 2, 3, 4]);
        assert_eq!(shard_indices(6, 2, 0), [0, 2, 4]);
        assert_eq!(shard_indices(6, 2, 1), [1, 3, 5]);
        // 7 batches on 3 ranks: the last global batch (6, 7, 8) is completed with 0 and 1.
        assert_eq!(shard_indices(7, 3, 0), [0, 3, 6]);
        assert_eq!(shard_indices(7, 3, 1), [1, 4, 0]);
        assert_eq!(shard_indices(7, 3, 2), [2, 5, 1]);
        assert!(shard_indices(0, 2, 0).is_empty());
        assert!(shard_indices(4, 2, 2).is_empty());
    }

    proptest! {
        #[test]
        fn shards_are_disjoint_and_cover_every_batch(n in 0usize..60, world in 1usize..9) {
            let shards: Vec<Vec<usize>> = (0..world).map(|r| shard_indices(n, world, r)).collect();
            for s in &shards {
                prop_assert_eq!(s.len(), n.div_ceil(world));
            }
            // Step k of rank r is global position k*world + r: interleaving the shards gives the
            // one-process order (then the wrap-around that completes the last global batch).
            let mut all = Vec::new();
            for k in 0..n.div_ceil(world) {
                for s in &shards {
                    all.push(s[k]);
                }
            }
            let expect: Vec<usize> = (0..all.len()).map(|i| i % n.max(1)).collect();
            prop_assert_eq!(&all, &expect);
            // Within one global batch no batch is taken twice unless the epoch has fewer batches than ranks.
            if n >= world {
                for k in 0..n.div_ceil(world) {
                    let mut g: Vec<usize> = shards.iter().map(|s| s[k]).collect();
                    g.sort_unstable();
                    g.dedup();
                    prop_assert_eq!(g.len(), world);
                }
            }
        }
    }

    fn samples_strategy() -> impl Strategy<Value = Vec<(Vec<u32>, bool)>> {
        prop::collection::vec((prop::collection::vec(1u32..500, 1..30), any::<bool>()), 1..8)
    }

    proptest! {
        #[test]
        fn batches_keep_every_token_in_place(raw in samples_strategy(), free in any::<bool>(), m in prop::option::of(1usize..16)) {
            let samples: Vec<Sample> = raw.iter().map(|(ids, masked)| {
                let labels = ids.iter().map(|&i| if *masked { -100 } else { i as i32 }).collect::<Vec<_>>();
                sample(ids, &labels, None)
            }).collect();
            let refs: Vec<&Sample> = samples.iter().collect();
            let b = collate(&refs, &opts(free, m));
            prop_assert_eq!(b.input_ids.len(), b.rows * b.cols);
            prop_assert_eq!(b.labels.len(), b.rows * b.cols);
            prop_assert_eq!(b.position_ids.len(), b.rows * b.cols);
            prop_assert_eq!(b.segment_ids.len(), b.rows * b.cols);
            if let Some(m) = m { prop_assert_eq!(b.cols % m, 0); }
            let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
            prop_assert_eq!(b.num_tokens(), total);
            // Tokens in order, pads carry the pad id and no label.
            let real: Vec<i64> = b.input_ids.iter().zip(&b.segment_ids).filter(|(_, s)| **s >= 0).map(|(i, _)| *i).collect();
            let want: Vec<i64> = samples.iter().flat_map(|s| s.input_ids.iter().map(|&i| i64::from(i))).collect();
            prop_assert_eq!(real, want);
            for ((&i, &l), &s) in b.input_ids.iter().zip(&b.labels).zip(&b.segment_ids) {
                if s < 0 { prop_assert_eq!(i, 0); prop_assert_eq!(l, -100); }
                else { prop_assert!(l == -100 || l == i); }
            }
            // Positions count up within a segment and restart with each.
            for r in 0..b.rows {
                for c in 0..b.cols {
                    let k = r * b.cols + c;
                    if b.segment_ids[k] >= 0 {
                        let start = c == 0 || b.segment_ids[k - 1] != b.segment_ids[k];
                        prop_assert_eq!(b.position_ids[k] == 0, start);
                        if !start { prop_assert_eq!(b.position_ids[k], b.position_ids[k - 1] + 1); }
                    }
                }
            }
            // Loss tokens never exceed trained labels.
            let trained = b.labels.iter().filter(|&&l| l != -100).count();
            prop_assert!(b.num_loss_tokens() <= trained);
        }
    }
}
