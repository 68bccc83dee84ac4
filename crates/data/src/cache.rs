//! The tokenized dataset cached on disk, so a second run with the same inputs loads it instead of
//! tokenizing again.
//!
//! The key is a SHA-256 of everything that changes the samples: the data file's bytes, the
//! tokenizer's files and resolved special tokens, the chat template source, every preparation
//! option, and [`PIPELINE_VERSION`]. The file, `<cache_dir>/tokenized-<key>.bin`, is written to a
//! temporary name and renamed into place. Layout (little-endian): magic, key, sample count, a
//! flag for `seq_lengths`, then per sample its length, ids (u32), labels (i32) and, if flagged,
//! its sequence lengths; last, a SHA-256 of all preceding bytes. A file that fails any check is
//! ignored with a warning and rebuilt.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::dataset::{Dataset, Sample, collate_options, prepare_dataset};
use super::rows::{Example, read_rows};
use super::tokenize::TokenizeOptions;
use super::tokenizer::Tokenizer;
use crate::Error;
use crate::template::ChatTemplate;

/// Bumped whenever nibble's tokenization changes, so stale caches are not read.
pub const PIPELINE_VERSION: &str = "nibble-tokenize-1 (trl 1.16.0)";

const MAGIC: &[u8; 8] = b"NIBTOK\x00\x01";

/// What happened to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from this file.
    Hit(PathBuf),
    /// Tokenized and written to this file.
    Written(PathBuf),
    /// Tokenized; the cache could not be written (warned) or no cache directory was given.
    NotCached,
}

/// The cache key of a dataset.
pub fn cache_key(
    data: &[u8],
    tok: &Tokenizer,
    template_source: Option<&str>,
    opts: &TokenizeOptions,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("version", PIPELINE_VERSION.as_bytes());
    field("data", &Sha256::digest(data));
    field("tokenizer", &tok.fingerprint());
    field("template", template_source.map_or(b"<none>".as_slice(), str::as_bytes));
    // Batching settings (padding_free, pad_to_multiple_of) do not change the samples.
    let o = opts;
    let settings = format!(
        "text_field={:?} max_length={:?} truncation={:?} packing={} strategy={:?} completion_only={:?} \
         assistant_only={} shuffle={} seed={} num_proc={:?}",
        o.dataset_text_field,
        o.max_length,
        o.truncation_mode,
        o.packing,
        o.packing_strategy,
        o.completion_only_loss,
        o.assistant_only_loss,
        o.shuffle_dataset,
        o.seed,
        o.num_proc
    );
    field("options", settings.as_bytes());
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache file of a key.
pub fn cache_path(cache_dir: &Path, key: &[u8; 32]) -> PathBuf {
    keyed_file(cache_dir, "tokenized", key)
}

/// Where each of nibble's caches keeps the file of a key: `<cache_dir>/<kind>-<key>.bin` (the
/// key's first 16 bytes in hex).
pub fn keyed_file(cache_dir: &Path, kind: &str, key: &[u8; 32]) -> PathBuf {
    cache_dir.join(format!("{kind}-{}.bin", hex(&key[..16])))
}

/// Write `body` followed by its SHA-256, atomically (temporary file, then rename; the folder is
/// made first): the sealed files of the preference and reference caches.
pub fn write_sealed(path: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let digest = Sha256::digest(body);
    pyfiles::write_atomic_with(path, |f| {
        f.write_all(body)?;
        f.write_all(&digest)
    })
}

/// The body of a file written by [`write_sealed`], once its SHA-256 checks; any damage is an
/// error message.
pub fn read_sealed(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let Some(body_len) = bytes.len().checked_sub(32) else {
        return Err("truncated".into());
    };
    if Sha256::digest(&bytes[..body_len])[..] != bytes[body_len..] {
        return Err("checksum mismatch".into());
    }
    bytes.truncate(body_len);
    Ok(bytes)
}

/// Write a freshly prepared entry to `path` (when caching) and say what happened; a failed write
/// is a warning naming `what`, not an error (the run goes on without the cache).
pub(crate) fn store(
    path: Option<&PathBuf>,
    what: &str,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> CacheOutcome {
    let Some(path) = path else { return CacheOutcome::NotCached };
    match write(path) {
        Ok(()) => CacheOutcome::Written(path.clone()),
        Err(e) => {
            tracing::warn!("could not write the {what} {}: {e}", path.display());
            CacheOutcome::NotCached
        }
    }
}

struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Write samples under a key, atomically (temporary file, then rename).
pub fn write_cache(path: &Path, key: &[u8; 32], samples: &[Sample]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    pyfiles::write_atomic_with(path, |file| {
        let mut w = Hashing { inner: file, hash: Sha256::new() };
        let packed = samples.first().is_some_and(|s| s.seq_lengths.is_some());
        w.write_all(MAGIC)?;
        w.write_all(key)?;
        w.write_all(&(samples.len() as u64).to_le_bytes())?;
        w.write_all(&[u8::from(packed)])?;
        for s in samples {
            w.write_all(&(s.input_ids.len() as u32).to_le_bytes())?;
            for &id in &s.input_ids {
                w.write_all(&id.to_le_bytes())?;
            }
            for &l in &s.labels {
                w.write_all(&l.to_le_bytes())?;
            }
            if packed {
                let lens = s.seq_lengths.as_deref().unwrap_or(&[]);
                w.write_all(&(lens.len() as u32).to_le_bytes())?;
                for &l in lens {
                    w.write_all(&l.to_le_bytes())?;
                }
            }
        }
        let digest = w.hash.clone().finalize();
        w.inner.write_all(&digest)
    })
}

/// Read samples written under `key`; any mismatch or damage is an error message.
pub fn read_cache(path: &Path, key: &[u8; 32]) -> Result<Vec<Sample>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut r = Hashing { inner: BufReader::new(file), hash: Sha256::new() };
    let mut buf4 = [0u8; 4];
    let mut u32_at = |r: &mut Hashing<BufReader<std::fs::File>>| -> Result<u32, String> {
        r.read_exact(&mut buf4).map_err(|e| format!("truncated: {e}"))?;
        Ok(u32::from_le_bytes(buf4))
    };
    let mut head = [0u8; 8 + 32 + 8 + 1];
    r.read_exact(&mut head).map_err(|e| format!("truncated header: {e}"))?;
    if &head[..8] != MAGIC {
        return Err("not a nibble tokenization cache".into());
    }
    if &head[8..40] != key {
        return Err("written for other inputs".into());
    }
    let count = u64::from_le_bytes(head[40..48].try_into().expect("8 bytes"));
    let packed = match head[48] {
        0 => false,
        1 => true,
        b => return Err(format!("bad flag {b}")),
    };
    // Every sample takes at least 4 bytes: a count beyond that is damage, not a reason to allocate.
    if count > size / 4 {
        return Err(format!("sample count {count} does not fit a {size}-byte file"));
    }
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let n = u32_at(&mut r)? as usize;
        if n as u64 * 8 > size {
            return Err(format!("sample length {n} does not fit a {size}-byte file"));
        }
        let mut raw = vec![0u8; n * 8];
        r.read_exact(&mut raw).map_err(|e| format!("truncated: {e}"))?;
        let (ids, labels) = raw.split_at(n * 4);
        let input_ids = ids.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect();
        let labels = labels.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4"))).collect();
        let seq_lengths = if packed {
            let k = u32_at(&mut r)? as usize;
            if k > n {
                return Err(format!("{k} sequences in a {n}-token sample"));
            }
            let lens: Vec<u32> = (0..k).map(|_| u32_at(&mut r)).collect::<Result<_, _>>()?;
            if lens.iter().map(|&l| l as usize).sum::<usize>() != n {
                return Err("sequence lengths do not add up".into());
            }
            Some(lens)
        } else {
            None
        };
        samples.push(Sample { input_ids, labels, seq_lengths });
    }
    let want = r.hash.clone().finalize();
    let mut digest = [0u8; 32];
    r.inner.read_exact(&mut digest).map_err(|e| format!("truncated checksum: {e}"))?;
    if digest[..] != want[..] {
        return Err("checksum mismatch".into());
    }
    let mut rest = [0u8; 1];
    if r.inner.read(&mut rest).map_err(|e| e.to_string())? != 0 {
        return Err("trailing bytes".into());
    }
    Ok(samples)
}

/// Read a data file's rows and prepare them (see [`prepare_dataset`]), through the cache in
/// `cache_dir` when one is given. `template_source` is the chat template's Jinja source.
pub fn load_or_prepare(
    data_file: &Path,
    tok: &Tokenizer,
    template_source: Option<&str>,
    opts: &TokenizeOptions,
    cache_dir: Option<&Path>,
) -> Result<(Dataset, CacheOutcome), Error> {
    let bytes =
        std::fs::read(data_file).map_err(|source| Error::Io { path: data_file.to_owned(), source })?;
    load_or_prepare_rows(&bytes, tok, template_source, opts, cache_dir, || {
        let rows = read_rows(data_file, &opts.dataset_text_field)?;
        Ok((rows, Some(data_file.to_owned())))
    })
}

/// Prepare rows that `rows()` loads (only on a cache miss), keyed by `fingerprint` (the bytes of
/// every source and the settings that selected the rows, e.g. a data plan's fingerprint).
/// `rows()` may name the file its rows came from, for errors.
pub fn load_or_prepare_rows(
    fingerprint: &[u8],
    tok: &Tokenizer,
    template_source: Option<&str>,
    opts: &TokenizeOptions,
    cache_dir: Option<&Path>,
    rows: impl FnOnce() -> Result<(Vec<Example>, Option<PathBuf>), Error>,
) -> Result<(Dataset, CacheOutcome), Error> {
    let key = cache_key(fingerprint, tok, template_source, opts);
    let path = cache_dir.map(|d| cache_path(d, &key));
    let template = template_source.map(ChatTemplate::new).transpose()?;
    if let Some(path) = &path
        && path.is_file()
    {
        match read_cache(path, &key) {
            Ok(samples) => {
                tracing::info!("loaded {} tokenized samples from {}", samples.len(), path.display());
                // The batching settings are not part of the key: check and apply them.
                let collate = collate_options(tok, opts)?;
                return Ok((Dataset { samples, collate }, CacheOutcome::Hit(path.clone())));
            }
            Err(why) => {
                tracing::warn!("ignoring tokenization cache {}: {why}; rebuilding it", path.display())
            }
        }
    }
    let (rows, file) = rows()?;
    let dataset = prepare_dataset(&rows, tok, template.as_ref(), opts).map_err(|e| match &file {
        Some(f) => e.in_file(f),
        None => e,
    })?;
    let outcome = store(path.as_ref(), "tokenization cache", |p| write_cache(p, &key, &dataset.samples));
    if let CacheOutcome::Written(path) = &outcome {
        tracing::info!("cached {} tokenized samples in {}", dataset.len(), path.display());
    }
    Ok((dataset, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nibble-cache-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn samples() -> Vec<Sample> {
        vec![
            Sample { input_ids: vec![1, 2, 3], labels: vec![-100, 2, 3], seq_lengths: Some(vec![1, 2]) },
            Sample { input_ids: vec![], labels: vec![], seq_lengths: Some(vec![]) },
            Sample { input_ids: vec![u32::MAX], labels: vec![i32::MIN], seq_lengths: Some(vec![1]) },
        ]
    }

    mod garbage {
        use super::*;
        use proptest::prelude::*;

        fn sample() -> impl Strategy<Value = Sample> {
            prop::collection::vec((any::<u32>(), any::<i32>()), 0..12).prop_flat_map(|tokens| {
                let n = tokens.len();
                let (input_ids, labels): (Vec<u32>, Vec<i32>) = tokens.into_iter().unzip();
                // A packed sample's sequence lengths add up to its length.
                prop::collection::vec(1u32..4, 0..4).prop_map(move |mut lens| {
                    let mut left = n as u32;
                    lens.retain_mut(|l| {
                        *l = (*l).min(left);
                        left -= *l;
                        *l > 0
                    });
                    if left > 0 {
                        lens.push(left);
                    }
                    Sample { input_ids: input_ids.clone(), labels: labels.clone(), seq_lengths: Some(lens) }
                })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

            /// Whatever happens to a cache file (a flipped byte, a cut, bytes appended, or noise
            /// instead), reading it is an error, never a panic or a huge allocation; intact, it
            /// reads back.
            #[test]
            fn a_damaged_cache_file_is_an_error(
                samples in prop::collection::vec(sample(), 0..5),
                at in any::<prop::sample::Index>(),
                flip in 1u8..=255,
                cut in any::<prop::sample::Index>(),
                noise in prop::collection::vec(any::<u8>(), 0..256),
            ) {
                let d = scratch("prop");
                let p = d.join(format!("{}.bin", std::thread::current().name().unwrap_or("t").replace("::", "-")));
                let key = [3u8; 32];
                write_cache(&p, &key, &samples).expect("write");
                let good = std::fs::read(&p).expect("read");
                prop_assert_eq!(read_cache(&p, &key).expect("intact"), samples);
                let mut flipped = good.clone();
                let i = at.index(flipped.len());
                flipped[i] ^= flip;
                let cut_at = cut.index(good.len());
                let mut longer = good.clone();
                longer.push(0);
                // A huge sample count or length in an otherwise valid header.
                let mut huge = good[..48].to_vec();
                huge[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
                huge.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
                for bad in [flipped, good[..cut_at].to_vec(), longer, noise.clone(), huge] {
                    std::fs::write(&p, &bad).expect("write");
                    prop_assert!(read_cache(&p, &key).is_err());
                }
            }
        }
    }

    #[test]
    fn round_trip() {
        let d = scratch("rt");
        let p = d.join("x.bin");
        let key = [7u8; 32];
        write_cache(&p, &key, &samples()).expect("write");
        assert_eq!(read_cache(&p, &key).expect("read"), samples());
        assert!(read_cache(&p, &[8u8; 32]).expect_err("other key").contains("other inputs"));
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(&d).expect("ls").count(), 1);
    }

    #[test]
    fn damage_is_detected() {
        let d = scratch("damage");
        let p = d.join("x.bin");
        let key = [1u8; 32];
        write_cache(&p, &key, &samples()).expect("write");
        let good = std::fs::read(&p).expect("read");
        for at in [0, 45, 52, good.len() - 40, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x55;
            std::fs::write(&p, &bad).expect("write");
            assert!(read_cache(&p, &key).is_err(), "flipping byte {at} went unnoticed");
        }
        for cut in [0, 10, 49, good.len() - 1] {
            std::fs::write(&p, &good[..cut]).expect("write");
            assert!(read_cache(&p, &key).is_err(), "cutting at {cut} went unnoticed");
        }
        let mut long = good.clone();
        long.push(0);
        std::fs::write(&p, &long).expect("write");
        assert!(read_cache(&p, &key).is_err());
    }
}
