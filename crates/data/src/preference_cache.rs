//! Tokenized preference pairs cached on disk, as SFT's tokenized samples are (`cache.rs`): a
//! second DPO run with the same inputs loads the pairs instead of rendering and tokenizing every
//! row again.
//!
//! The key is a SHA-256 of the rows' fingerprint (a data plan's, with the skip setting), the
//! tokenizer, the chat template source, `max_length` and the truncation mode (which rows are
//! dropped) and [`PREFERENCE_VERSION`]. The file, `<cache_dir>/preferences-<key>.bin`, is written
//! to a temporary name and renamed into place. Layout (little-endian): magic, key, pair count,
//! rows dropped by truncation, rows skipped, then per pair the three lengths (prompt, chosen,
//! rejected) and their ids (u32); last, a SHA-256 of all preceding bytes. A file that fails any
//! check is ignored with a warning and rebuilt; nothing in it is trusted for an allocation beyond
//! the file's own size.

use std::path::{Path, PathBuf};

use config::types::TruncationMode;
use sha2::{Digest, Sha256};

use crate::cache::{CacheOutcome, keyed_file, read_sealed, store, write_sealed};
use crate::mixture::Rows;
use crate::preference::{PreferenceIds, prepare_preference_rows};
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::{Error, PIPELINE_VERSION};

/// Bumped whenever nibble's preference preparation changes, so stale caches are not read.
pub const PREFERENCE_VERSION: &str = "nibble-preferences-1 (trl 1.16.0 DPOTrainer)";

const MAGIC: &[u8; 8] = b"NIBPRF\x00\x01";

/// What one preparation gave: the pairs, the rows truncation dropped and the rows skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedPairs {
    /// The tokenized pairs, in row order.
    pub pairs: Vec<PreferenceIds>,
    /// Rows whose prompt alone filled `max_length` (dropped as TRL drops them).
    pub dropped: usize,
    /// Rows that were not pairs, skipped under `skip_invalid_rows`.
    pub skipped: usize,
}

/// How rows become pairs (everything in the cache key besides the rows and the tokenizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairOptions {
    /// `max_length`.
    pub max_length: Option<usize>,
    /// `truncation_mode`.
    pub mode: TruncationMode,
    /// `skip_invalid_rows`.
    pub skip_invalid: bool,
}

/// The cache key of a set of rows prepared as pairs.
pub fn preference_key(
    fingerprint: &[u8],
    tok: &Tokenizer,
    template_source: Option<&str>,
    opts: PairOptions,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("version", format!("{PREFERENCE_VERSION} / {PIPELINE_VERSION}").as_bytes());
    field("rows", &Sha256::digest(fingerprint));
    field("tokenizer", &tok.fingerprint());
    field("template", template_source.map_or(b"<none>".as_slice(), str::as_bytes));
    let settings =
        format!("max_length={:?} mode={:?} skip={}", opts.max_length, opts.mode, opts.skip_invalid);
    field("options", settings.as_bytes());
    h.finalize().into()
}

/// The cache file of a key.
pub fn preference_path(cache_dir: &Path, key: &[u8; 32]) -> PathBuf {
    keyed_file(cache_dir, "preferences", key)
}

/// Write prepared pairs under a key, atomically and sealed ([`write_sealed`]).
pub fn write_preferences(path: &Path, key: &[u8; 32], p: &PreparedPairs) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(key);
    for n in [p.pairs.len(), p.dropped, p.skipped] {
        bytes.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for pair in &p.pairs {
        let parts = [&pair.prompt, &pair.chosen, &pair.rejected];
        for part in parts {
            bytes.extend_from_slice(&(part.len() as u32).to_le_bytes());
        }
        for part in parts {
            for id in part {
                bytes.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    write_sealed(path, &bytes)
}

/// Read pairs written under `key`; any mismatch or damage is an error message.
pub fn read_preferences(path: &Path, key: &[u8; 32]) -> Result<PreparedPairs, String> {
    // The whole file is read once (it is what the cache saves), bounded by its real size.
    let body = read_sealed(path)?;
    let size = body.len() as u64 + 32;
    let mut c = Cursor { body: &body, at: 0 };
    if c.take(8)? != MAGIC {
        return Err("not a nibble preference cache".into());
    }
    if c.take(32)? != key {
        return Err("written for other inputs".into());
    }
    let (count, dropped, skipped) = (c.u64()?, c.u64()?, c.u64()?);
    // Every pair takes at least 12 bytes: a count beyond that is damage, not a reason to allocate.
    if count > size / 12 {
        return Err(format!("pair count {count} does not fit a {size}-byte file"));
    }
    let mut pairs = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let lens = c.u32s(3)?;
        let (prompt, chosen, rejected) =
            (c.u32s(lens[0] as usize)?, c.u32s(lens[1] as usize)?, c.u32s(lens[2] as usize)?);
        pairs.push(PreferenceIds { prompt, chosen, rejected });
    }
    if c.at != body.len() {
        return Err("trailing bytes".into());
    }
    let n = |v: u64| usize::try_from(v).map_err(|_| "count overflow".to_owned());
    Ok(PreparedPairs { pairs, dropped: n(dropped)?, skipped: n(skipped)? })
}

/// Reads a checked file's body front to back, never past its end.
struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.body.len()).ok_or("truncated")?;
        let s = &self.body[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
    }

    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, String> {
        let raw = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
        Ok(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// Prepare `rows()` as pairs (see [`prepare_preference_rows`]), through the cache in `cache_dir`
/// when one is given; `rows()` is only called on a cache miss. `fingerprint` covers the rows
/// (e.g. a data plan's fingerprint).
pub fn load_or_prepare_preferences(
    fingerprint: &[u8],
    tok: &Tokenizer,
    template_source: Option<&str>,
    opts: PairOptions,
    cache_dir: Option<&Path>,
    rows: impl FnOnce() -> Result<Rows, Error>,
) -> Result<(PreparedPairs, CacheOutcome), Error> {
    let key = preference_key(fingerprint, tok, template_source, opts);
    let path = cache_dir.map(|d| preference_path(d, &key));
    if let Some(path) = path.as_ref().filter(|p| p.is_file()) {
        match read_preferences(path, &key) {
            Ok(p) => {
                tracing::info!("loaded {} tokenized preference pairs from {}", p.pairs.len(), path.display());
                return Ok((p, CacheOutcome::Hit(path.clone())));
            }
            Err(why) => tracing::warn!("ignoring preference cache {}: {why}; rebuilding it", path.display()),
        }
    }
    let template = template_source.map(ChatTemplate::new).transpose()?;
    let rows = rows()?;
    let (pairs, dropped, skipped) = prepare_preference_rows(
        &rows,
        tok,
        template.as_ref(),
        opts.max_length,
        opts.mode,
        opts.skip_invalid,
    )?;
    let prepared = PreparedPairs { pairs, dropped, skipped };
    let outcome = store(path.as_ref(), "preference cache", |p| write_preferences(p, &key, &prepared));
    Ok((prepared, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nibble-prefcache-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn ids() -> impl Strategy<Value = Vec<u32>> {
        prop::collection::vec(any::<u32>(), 0..8)
    }

    #[test]
    fn a_second_preparation_reads_the_cache_not_the_rows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
        let cache = scratch("hit");
        let rows = || {
            Ok(Rows {
                values: vec![
                    serde_json::json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
                    serde_json::json!({"prompt": "r", "chosen": "c"}),
                ],
                origins: Vec::new(),
            })
        };
        let opts = PairOptions { max_length: Some(64), mode: TruncationMode::KeepStart, skip_invalid: true };
        let (first, outcome) =
            load_or_prepare_preferences(b"rows-v1", &tok, None, opts, Some(&cache), rows).expect("prepared");
        assert!(matches!(outcome, CacheOutcome::Written(_)), "{outcome:?}");
        assert_eq!((first.pairs.len(), first.dropped, first.skipped), (1, 0, 1));
        let unread = || -> Result<Rows, Error> { panic!("the rows are read on a cache hit") };
        let (second, outcome) =
            load_or_prepare_preferences(b"rows-v1", &tok, None, opts, Some(&cache), unread).expect("cached");
        assert!(matches!(outcome, CacheOutcome::Hit(_)), "{outcome:?}");
        assert_eq!(second, first);
        // Other rows, or another max_length, are another key.
        let (_, outcome) =
            load_or_prepare_preferences(b"rows-v2", &tok, None, opts, Some(&cache), rows).expect("miss");
        assert!(matches!(outcome, CacheOutcome::Written(_)));
        let longer = PairOptions { max_length: Some(128), ..opts };
        let (_, outcome) =
            load_or_prepare_preferences(b"rows-v1", &tok, None, longer, Some(&cache), rows).expect("miss");
        assert!(matches!(outcome, CacheOutcome::Written(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Intact, a cache file reads back; damaged (a flipped byte, a cut, a byte appended,
        /// noise, a huge count), it is an error, never a panic or a huge allocation.
        #[test]
        fn a_damaged_preference_cache_is_an_error(
            pairs in prop::collection::vec((ids(), ids(), ids()), 0..5),
            dropped in 0usize..4,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
            cut in any::<prop::sample::Index>(),
            noise in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let d = scratch("prop");
            let p = d.join(format!("{}.bin", std::thread::current().name().unwrap_or("t").replace("::", "-")));
            let key = [5u8; 32];
            let prepared = PreparedPairs {
                pairs: pairs.into_iter().map(|(prompt, chosen, rejected)| PreferenceIds { prompt, chosen, rejected }).collect(),
                dropped,
                skipped: 1,
            };
            write_preferences(&p, &key, &prepared).expect("write");
            prop_assert_eq!(read_preferences(&p, &key).expect("intact"), prepared);
            prop_assert!(read_preferences(&p, &[6u8; 32]).expect_err("other key").contains("other inputs"));
            let good = std::fs::read(&p).expect("read");
            let mut flipped = good.clone();
            let i = at.index(flipped.len());
            flipped[i] ^= flip;
            let mut longer = good.clone();
            longer.push(0);
            let mut huge = good[..40].to_vec();
            huge.extend_from_slice(&u64::MAX.to_le_bytes());
            huge.extend_from_slice(&[0; 16]);
            let digest = Sha256::digest(&huge);
            huge.extend_from_slice(&digest);
            for bad in [flipped, good[..cut.index(good.len())].to_vec(), longer, noise.clone(), huge] {
                std::fs::write(&p, &bad).expect("write");
                prop_assert!(read_preferences(&p, &key).is_err());
            }
        }
    }
}
