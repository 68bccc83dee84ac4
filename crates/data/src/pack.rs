//! Packing tokenized rows into samples of at most `max_length` tokens, as TRL 1.16's
//! `pack_dataset` does.
//!
//! TRL packs through `datasets.Dataset.map(batched=True)`, so rows are packed 1000 at a time (the
//! default map batch size) and, with `dataset_num_proc = n`, within each of `n` contiguous shards:
//! no pack mixes rows of two such batches, and `wrapped` leaves a short sample at the end of each.
//! nibble reproduces those boundaries.
//!
//! - `bfd` (best-fit decreasing): empty rows dropped, each row cut to `max_length` (its start is
//!   kept, whatever `truncation_mode` says), rows taken longest first (ties in row order), each put
//!   in the open bin with the least room that fits it, else a new bin; bins in creation order,
//!   rows in each bin in insertion order, with `seq_lengths`.
//! - `bfd_split`: as `bfd`, but a long row is split into `max_length` pieces plus a remainder,
//!   each packed as a row of its own.
//! - `wrapped`: all tokens of the batch concatenated and cut every `max_length`; no sequence
//!   boundaries are kept (no `seq_lengths`: a sample is one sequence to the collator).

use std::collections::{BTreeMap, VecDeque};

use config::types::PackingStrategy;

use super::dataset::Sample;

/// Rows `datasets.map(batched=True)` hands to the packing function at once.
pub const MAP_BATCH_SIZE: usize = 1000;

/// Contiguous shard bounds `datasets` uses for `num_proc` workers (`Dataset.shard(contiguous)`).
pub fn shard_bounds(len: usize, num_proc: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let shards = num_proc.unwrap_or(1).min(len).max(1);
    let (div, rem) = (len / shards, len % shards);
    (0..shards)
        .map(|i| {
            let start = div * i + i.min(rem);
            start..start + div + usize::from(i < rem)
        })
        .collect()
}

/// Pack rows (their `input_ids` and `labels`) with a strategy, batch by batch as TRL does.
pub fn pack(
    rows: Vec<Sample>,
    max_length: usize,
    strategy: PackingStrategy,
    num_proc: Option<usize>,
) -> Vec<Sample> {
    assert!(max_length > 0, "max_length must be positive");
    let bounds = shard_bounds(rows.len(), num_proc);
    let mut rows = rows.into_iter();
    let mut out = Vec::new();
    for shard in bounds {
        let mut left = shard.len();
        while left > 0 {
            let take = left.min(MAP_BATCH_SIZE);
            left -= take;
            let batch: Vec<Sample> = rows.by_ref().take(take).collect();
            out.extend(match strategy {
                PackingStrategy::Bfd => pack_bfd(batch, max_length, false),
                PackingStrategy::BfdSplit => pack_bfd(batch, max_length, true),
                PackingStrategy::Wrapped => pack_wrapped(batch, max_length),
            });
        }
    }
    out
}

/// Best-fit decreasing over one batch; `split` cuts long rows into pieces instead of truncating.
pub fn pack_bfd(batch: Vec<Sample>, seq_length: usize, split: bool) -> Vec<Sample> {
    let mut pieces: Vec<(Vec<u32>, Vec<i32>)> = Vec::new();
    for s in batch.into_iter().filter(|s| !s.input_ids.is_empty()) {
        if split {
            for (ids, labels) in s.input_ids.chunks(seq_length).zip(s.labels.chunks(seq_length)) {
                pieces.push((ids.to_vec(), labels.to_vec()));
            }
        } else {
            let n = s.input_ids.len().min(seq_length);
            let (mut ids, mut labels) = (s.input_ids, s.labels);
            ids.truncate(n);
            labels.truncate(n);
            pieces.push((ids, labels));
        }
    }
    // Longest first; a stable sort keeps equal lengths in row order, like Arrow's sort.
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pieces[i].0.len()));

    // Bins as (row indices, length); open bins by remaining room, oldest first within a room.
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for i in order {
        let len = pieces[i].0.len();
        // The smallest room that fits; a fresh bin (room `seq_length`) is always available.
        let fit = by_room.range(len..).next().map(|(&room, _)| room).filter(|&room| room < seq_length);
        let (bin, room) = match fit {
            Some(room) => {
                let queue = by_room.get_mut(&room).expect("room is listed");
                let bin = queue.pop_front().expect("listed rooms have bins");
                if queue.is_empty() {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push((Vec::new(), 0));
                (bins.len() - 1, seq_length)
            }
        };
        bins[bin].0.push(i);
        bins[bin].1 += len;
        let left = room - len;
        if left > 0 {
            by_room.entry(left).or_default().push_back(bin);
        }
    }

    let mut pieces: Vec<Option<(Vec<u32>, Vec<i32>)>> = pieces.into_iter().map(Some).collect();
    bins.into_iter()
        .map(|(members, len)| {
            let mut s = Sample {
                input_ids: Vec::with_capacity(len),
                labels: Vec::with_capacity(len),
                seq_lengths: Some(Vec::with_capacity(members.len())),
            };
            for i in members {
                let (ids, labels) = pieces[i].take().expect("each piece is packed once");
                if let Some(l) = s.seq_lengths.as_mut() {
                    l.push(ids.len() as u32);
                }
                s.input_ids.extend(ids);
                s.labels.extend(labels);
            }
            s
        })
        .collect()
}

/// Concatenate a batch and cut it every `seq_length` tokens.
pub fn pack_wrapped(batch: Vec<Sample>, seq_length: usize) -> Vec<Sample> {
    let ids: Vec<u32> = batch.iter().flat_map(|s| s.input_ids.iter().copied()).collect();
    let labels: Vec<i32> = batch.iter().flat_map(|s| s.labels.iter().copied()).collect();
    ids.chunks(seq_length)
        .zip(labels.chunks(seq_length))
        .map(|(i, l)| Sample { input_ids: i.to_vec(), labels: l.to_vec(), seq_lengths: None })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(ids: &[u32]) -> Sample {
        Sample { input_ids: ids.to_vec(), labels: ids.iter().map(|&i| i as i32).collect(), seq_lengths: None }
    }

    fn ids(out: &[Sample]) -> Vec<Vec<u32>> {
        out.iter().map(|s| s.input_ids.clone()).collect()
    }

    #[test]
    fn bfd_matches_trls_docstring_example() {
        let rows = vec![row(&[1, 2, 3, 4, 5]), row(&[6, 7]), row(&[8, 9, 10]), row(&[11])];
        let out = pack_bfd(rows.clone(), 4, false);
        assert_eq!(ids(&out), vec![vec![1, 2, 3, 4], vec![8, 9, 10, 11], vec![6, 7]]);
        let seq: Vec<Vec<u32>> = out.iter().map(|s| s.seq_lengths.clone().expect("seq")).collect();
        assert_eq!(seq, vec![vec![4], vec![3, 1], vec![2]]);
        let out = pack_bfd(rows, 4, true);
        assert_eq!(ids(&out), vec![vec![1, 2, 3, 4], vec![8, 9, 10, 5], vec![6, 7, 11]]);
    }

    #[test]
    fn wrapped_cuts_every_max_length() {
        let out = pack_wrapped(vec![row(&[1, 2, 3]), row(&[]), row(&[4, 5, 6, 7])], 3);
        assert_eq!(ids(&out), vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
        assert!(out.iter().all(|s| s.seq_lengths.is_none()));
    }

    #[test]
    fn packs_stay_within_map_batches_and_shards() {
        // 1001 one-token rows: the 1001st is packed alone.
        let rows: Vec<Sample> = (0..1001).map(|i| row(&[i])).collect();
        let out = pack(rows.clone(), 2000, PackingStrategy::Bfd, None);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].input_ids, vec![1000]);
        let out = pack(rows[..10].to_vec(), 100, PackingStrategy::Wrapped, Some(3));
        assert_eq!(ids(&out), vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]);
        assert_eq!(shard_bounds(2, Some(5)), vec![0..1, 1..2]);
        assert_eq!(shard_bounds(0, None), vec![0..0]);
    }

    fn rows_strategy() -> impl Strategy<Value = Vec<Vec<u32>>> {
        prop::collection::vec(prop::collection::vec(0u32..1000, 0..40), 0..60)
    }

    proptest! {
        #[test]
        fn bfd_keeps_every_row_once_and_whole(rows in rows_strategy(), max_length in 1usize..64) {
            let input: Vec<Sample> = rows.iter().map(|r| row(r)).collect();
            let out = pack(input, max_length, PackingStrategy::Bfd, None);
            let mut seen: Vec<Vec<u32>> = Vec::new();
            for s in &out {
                prop_assert!(s.input_ids.len() <= max_length);
                prop_assert_eq!(&s.input_ids.iter().map(|&i| i as i32).collect::<Vec<_>>(), &s.labels);
                let lens = s.seq_lengths.clone().expect("bfd keeps boundaries");
                prop_assert_eq!(lens.iter().sum::<u32>() as usize, s.input_ids.len());
                let mut at = 0;
                for l in lens {
                    prop_assert!(l > 0);
                    seen.push(s.input_ids[at..at + l as usize].to_vec());
                    at += l as usize;
                }
            }
            let mut want: Vec<Vec<u32>> = rows.iter().filter(|r| !r.is_empty())
                .map(|r| r[..r.len().min(max_length)].to_vec()).collect();
            want.sort();
            seen.sort();
            prop_assert_eq!(seen, want);
        }

        #[test]
        fn bfd_split_and_wrapped_lose_no_token(rows in rows_strategy(), max_length in 1usize..64) {
            let all: Vec<u32> = rows.iter().flatten().copied().collect();
            let input: Vec<Sample> = rows.iter().map(|r| row(r)).collect();
            let wrapped = pack(input.clone(), max_length, PackingStrategy::Wrapped, None);
            let flat: Vec<u32> = wrapped.iter().flat_map(|s| s.input_ids.clone()).collect();
            prop_assert_eq!(&flat, &all);
            prop_assert!(wrapped.iter().all(|s| s.input_ids.len() <= max_length && !s.input_ids.is_empty()));
            let split = pack(input, max_length, PackingStrategy::BfdSplit, None);
            let mut a: Vec<u32> = split.iter().flat_map(|s| s.input_ids.clone()).collect();
            let mut b = all.clone();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
            prop_assert!(split.iter().all(|s| s.input_ids.len() <= max_length));
        }
    }
}
