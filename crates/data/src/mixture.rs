//! The training and evaluation rows of a recipe, as the alignment-handbook's `get_dataset` and
//! `datasets` 5.2 make them: `dataset_name` with `dataset_config` and the
//! `dataset_train_split` / `dataset_test_split` splits, or a `dataset_mixture` — each dataset's
//! split loaded, its `columns` kept, a `weight` fraction taken after a seeded shuffle
//! (`shuffle(seed).select(range(int(len * weight)))`), all concatenated and shuffled with the
//! seed, then split by `train_test_split(test_split_size, seed)` when asked. Shuffles are numpy's
//! `default_rng(seed).permutation` ([`nprandom`]), so the rows and their order are `datasets`'.
//!
//! Rows stay JSON values until the end, so column selection and the null-filling of columns that
//! some rows (or datasets) lack behave as in `datasets`; then each row is recognised as one of
//! TRL's formats, an error naming its file and row.
//!
//! [`DataPlan::from_recipe`] finds every file (nothing is read but hashed) and gives the
//! fingerprints that key the tokenization cache; [`DataPlan::load`] reads the rows.

use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use config::Recipe;
use config::types::{DatasetMixture, DatasetSpec, Interval};
use pyfiles::HubCache;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::nprandom;
use super::parquet::read_parquet;
use super::rows::{Example, classify};
use super::source::{DatasetFiles, Format, file_digest, parse_split_spec, resolve_dataset};

/// Bumped whenever the rows nibble loads for a recipe change, so fingerprints change with them.
pub const SOURCES_VERSION: &str = "nibble-sources-1 (datasets 5.2.0, alignment-handbook get_dataset)";

/// Where a row came from: its file and 1-based row (line, for JSON Lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The data file.
    pub file: Arc<PathBuf>,
    /// 1-based row in the file.
    pub row: usize,
}

/// Rows as JSON objects, each with where it came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    /// The rows.
    pub values: Vec<Value>,
    /// Their origins, one per row.
    pub origins: Vec<Origin>,
}

impl Rows {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The rows at `indices`, in that order (`Dataset.select`); rows are moved, not copied,
    /// unless an index repeats.
    pub fn select(self, indices: &[usize]) -> Rows {
        let mut last = vec![usize::MAX; self.values.len()];
        for (pos, &i) in indices.iter().enumerate() {
            last[i] = pos;
        }
        let mut slots: Vec<Option<(Value, Origin)>> =
            self.values.into_iter().zip(self.origins).map(Some).collect();
        let mut out =
            Rows { values: Vec::with_capacity(indices.len()), origins: Vec::with_capacity(indices.len()) };
        for (pos, &i) in indices.iter().enumerate() {
            let (v, o) = if last[i] == pos {
                slots[i].take().expect("each row is moved once, at its last use")
            } else {
                slots[i].clone().expect("not yet moved")
            };
            out.values.push(v);
            out.origins.push(o);
        }
        out
    }

    /// `Dataset.shuffle(seed)`: rows in the order of `default_rng(seed).permutation(len)`.
    pub fn shuffle(self, seed: u64) -> Rows {
        let perm = nprandom::permutation(&[seed], self.len());
        self.select(&perm)
    }

    /// The rows from `at` on, removed from `self`.
    fn split_off(&mut self, at: usize) -> Rows {
        Rows { values: self.values.split_off(at), origins: self.origins.split_off(at) }
    }

    fn append(&mut self, other: Rows) {
        self.values.extend(other.values);
        self.origins.extend(other.origins);
    }

    /// Column names in order of first appearance (the schema `datasets` would build).
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        for v in &self.values {
            if let Value::Object(m) = v {
                for k in m.keys() {
                    if !cols.contains(k) {
                        cols.push(k.clone());
                    }
                }
            }
        }
        cols
    }

    /// One schema for all rows, as an Arrow table has: every row gets every column (null where
    /// absent), in schema order; a column holding both integers and floats holds floats.
    fn unify(&mut self) {
        let cols = self.columns();
        let floats: Vec<bool> = cols
            .iter()
            .map(|c| {
                let nums = self.values.iter().filter_map(|v| v.get(c)).filter(|x| x.is_number());
                let (mut int, mut float) = (false, false);
                for x in nums {
                    if x.is_f64() {
                        float = true;
                    } else {
                        int = true;
                    }
                }
                int && float
            })
            .collect();
        let uniform =
            |v: &Value| v.as_object().is_some_and(|m| m.len() == cols.len() && m.keys().eq(cols.iter()));
        if !floats.contains(&true) && self.values.iter().all(uniform) {
            return;
        }
        for v in &mut self.values {
            let Value::Object(m) = v else { continue };
            let mut out = Map::with_capacity(cols.len());
            for (c, &to_float) in cols.iter().zip(&floats) {
                let mut x = m.remove(c).unwrap_or(Value::Null);
                if to_float && let Some(f) = x.as_f64().filter(|_| !x.is_f64()) {
                    x = serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number);
                }
                out.insert(c.clone(), x);
            }
            *m = out;
        }
    }

    /// `Dataset.select_columns`: only these columns, in this order; a missing one is an error.
    pub fn select_columns(&mut self, columns: &[String], id: &str, split: &str) -> Result<(), Error> {
        let have = self.columns();
        let missing: Vec<String> = columns.iter().filter(|c| !have.contains(c)).cloned().collect();
        if !missing.is_empty() {
            return Err(Error::Columns {
                id: id.to_owned(),
                split: split.to_owned(),
                missing,
                available: have,
            });
        }
        for v in &mut self.values {
            if let Value::Object(m) = v {
                let mut out = Map::with_capacity(columns.len());
                for c in columns {
                    out.insert(c.clone(), m.remove(c).unwrap_or(Value::Null));
                }
                *m = out;
            }
        }
        Ok(())
    }

    /// Each row as one of TRL's formats; an error names the row's file and row.
    pub fn into_examples(self, text_field: &str) -> Result<Vec<Example>, Error> {
        self.into_examples_with(text_field, false)
    }

    /// As [`Rows::into_examples`], or with `skip_invalid` dropping rows that fit no format,
    /// counted and named in a warning, instead of failing.
    pub fn into_examples_with(self, text_field: &str, skip_invalid: bool) -> Result<Vec<Example>, Error> {
        let mut out = Vec::with_capacity(self.values.len());
        let mut skipped: Vec<Error> = Vec::new();
        for (v, o) in self.values.iter().zip(&self.origins) {
            match classify(v, text_field) {
                Ok(e) => out.push(e),
                Err(message) => {
                    let err = Error::Row { file: Some(o.file.as_ref().clone()), row: o.row, message };
                    if !skip_invalid {
                        return Err(err);
                    }
                    skipped.push(err);
                }
            }
        }
        if !skipped.is_empty() {
            let first: Vec<String> = skipped.iter().take(3).map(ToString::to_string).collect();
            tracing::warn!(
                "skipped {} of {} rows that fit no TRL format (skip_invalid_rows), e.g. {}",
                skipped.len(),
                self.values.len(),
                first.join("; ")
            );
        }
        Ok(out)
    }
}

// --- reading files -------------------------------------------------------------------------------

/// The rows of a JSON data file as `datasets`' JSON loader reads them: JSON Lines, or a list of
/// rows (a list of strings is rows of `text`). Compressed files are refused.
pub fn read_json(path: &Path) -> Result<Vec<(usize, Value)>, Error> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.ends_with(".json") && !name.ends_with(".jsonl") && !name.ends_with(".ndjson") {
        return Err(Error::Unsupported {
            id: path.display().to_string(),
            what: "a compressed or archived JSON file".into(),
            path: Some(path.to_owned()),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Row {
        file: Some(path.to_owned()),
        row: 1,
        message: format!("not UTF-8: {e}"),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let row_err = |row: usize, message: String| Error::Row { file: Some(path.to_owned()), row, message };
    if text.trim_start().starts_with('[') {
        let list: Vec<Value> = match serde_json::from_str(text) {
            Ok(Value::Array(a)) => a,
            Ok(_) => unreachable!("starts with ["),
            Err(e) => return Err(row_err(e.line(), format!("not valid JSON: {e}"))),
        };
        let strings = list.iter().all(Value::is_string);
        return list
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) if strings => Ok((i + 1, json!({ "text": s }))),
                v @ Value::Object(_) => Ok((i + 1, v)),
                _ => Err(row_err(i + 1, "a row must be a JSON object (or every row a string)".into())),
            })
            .collect();
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| match serde_json::from_str::<Value>(l) {
            Ok(v @ Value::Object(_)) => Ok((i + 1, v)),
            Ok(_) => Err(row_err(i + 1, "a row must be a JSON object".into())),
            Err(e) => Err(row_err(i + 1, format!("not valid JSON: {e}"))),
        })
        .collect()
}

fn read_file(path: &Path, format: Format) -> Result<Rows, Error> {
    let file = Arc::new(path.to_owned());
    let numbered: Vec<(usize, Value)> = match format {
        Format::Json => read_json(path)?,
        Format::Parquet => read_parquet(path)?.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
    };
    let (origins, values) =
        numbered.into_iter().map(|(row, v)| (Origin { file: file.clone(), row }, v)).unzip();
    Ok(Rows { values, origins })
}

/// One split of a dataset, read: `spec` is a split name or a `datasets` split spec
/// (`train[:10%]`, `train+test`). Every file of the split is read, in order, as one table.
pub fn load_split(files: &DatasetFiles, spec: &str) -> Result<Rows, Error> {
    let slices = parse_split_spec(spec)?;
    let mut out = Rows::default();
    for slice in slices {
        let split = files.split(&slice.split)?;
        let mut rows = Rows::default();
        for f in &split.files {
            rows.append(read_file(f, files.format)?);
        }
        let range =
            slice.range(rows.len()).map_err(|message| Error::SplitSpec { spec: spec.to_owned(), message })?;
        if range != (0..rows.len()) {
            rows = rows.select(&range.collect::<Vec<_>>());
        }
        out.append(rows);
    }
    out.unify();
    tracing::debug!("{} split `{spec}`: {} rows", files.id, out.len());
    Ok(out)
}

/// `dataset_name` (or a mixture `id`) with its config and a split spec, read.
pub fn load_rows(id: &str, config: Option<&str>, split: &str, hub: &HubCache) -> Result<Rows, Error> {
    let files = resolve_dataset(id, config, hub).map_err(|e| e.for_split(split))?;
    load_split(&files, split)
}

// --- mixtures ------------------------------------------------------------------------------------

/// `Dataset.train_test_split(test_size, seed)`'s indices: `(train, test)`. `test_size` below 1 is a
/// fraction (`ceil(test_size * n)` rows), otherwise a row count.
pub fn train_test_split_indices(
    n: usize,
    test_size: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), Error> {
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let fraction = test_size < 1.0;
    let bad = if fraction { test_size <= 0.0 } else { test_size.fract() != 0.0 || test_size >= n as f64 };
    if bad {
        return Err(Error::Settings(format!(
            "test_split_size={test_size} should be either positive and smaller than the number of rows {n} or a \
             fraction in (0, 1)"
        )));
    }
    let n_test = if fraction { (test_size * n as f64).ceil() as usize } else { test_size as usize };
    let n_train = n - n_test.min(n);
    if n_train == 0 {
        return Err(Error::Settings(format!(
            "with {n} rows and test_split_size={test_size} the training split would be empty"
        )));
    }
    let perm = nprandom::permutation(&[seed], n);
    Ok((perm[n_test..n_test + n_train].to_vec(), perm[..n_test].to_vec()))
}

/// A mixture entry, resolved.
#[derive(Debug, Clone)]
struct Entry {
    spec: DatasetSpec,
    files: DatasetFiles,
}

impl Entry {
    fn resolve(spec: &DatasetSpec, hub: &HubCache) -> Result<Self, Error> {
        let files =
            resolve_dataset(&spec.id, spec.config.as_deref(), hub).map_err(|e| e.for_split(&spec.split))?;
        Ok(Entry { spec: spec.clone(), files })
    }

    /// The split read with its columns kept; `always_shuffle` subsamples through a seeded
    /// shuffle even at weight 1 (the handbook's training datasets).
    fn load(&self, seed: u64, always_shuffle: bool) -> Result<Rows, Error> {
        let mut rows = load_split(&self.files, &self.spec.split)?;
        if let Some(cols) = &self.spec.columns {
            rows.select_columns(cols, &self.spec.id, &self.spec.split)?;
        }
        if always_shuffle || self.spec.weight < 1.0 {
            let n = rows.len();
            let take = ((n as f64 * self.spec.weight) as usize).min(n);
            let perm = nprandom::permutation(&[seed], n);
            rows = rows.select(&perm[..take]);
        }
        tracing::info!(
            "dataset `{}` split `{}`: {} rows (weight {})",
            self.spec.id,
            self.spec.split,
            rows.len(),
            self.spec.weight
        );
        Ok(rows)
    }

    /// The files this entry reads, with their digests, and its settings (for fingerprints).
    fn describe(&self) -> Result<Value, Error> {
        let slices = parse_split_spec(&self.spec.split)?;
        let mut digests = Vec::new();
        for s in &slices {
            for f in &self.files.split(&s.split)?.files {
                digests.push(hex(&file_digest(f)?));
            }
        }
        Ok(json!({
            "split": self.spec.split,
            "columns": self.spec.columns,
            "weight": self.spec.weight,
            "format": format!("{:?}", self.files.format),
            "files": digests,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn concat(parts: Vec<Rows>) -> Rows {
    let mut all = Rows::default();
    for p in parts {
        all.append(p);
    }
    all.unify();
    all
}

/// The splits a mixture makes: `train`, and `test` when `test_split_size` is set or evaluation
/// datasets are listed.
#[derive(Debug, Clone, PartialEq)]
pub struct MixtureRows {
    /// The training rows.
    pub train: Rows,
    /// The held-out rows: the `train_test_split` test part, then the evaluation datasets.
    pub test: Option<Rows>,
}

/// The alignment-handbook's `get_dataset` for a `dataset_mixture`, plus nibble's
/// `eval_datasets` (each split read, columns kept, subsampled only below weight 1, concatenated and
/// shuffled with the seed: the older handbook's test splits).
pub fn load_mixture(mix: &DatasetMixture, hub: &HubCache) -> Result<MixtureRows, Error> {
    let train: Vec<Entry> = mix.datasets.iter().map(|s| Entry::resolve(s, hub)).collect::<Result<_, _>>()?;
    let eval: Vec<Entry> =
        mix.eval_datasets.iter().map(|s| Entry::resolve(s, hub)).collect::<Result<_, _>>()?;
    mixture_rows(mix, &train, &eval, true)
}

fn mixture_rows(
    mix: &DatasetMixture,
    train: &[Entry],
    eval: &[Entry],
    want_test: bool,
) -> Result<MixtureRows, Error> {
    if train.is_empty() {
        return Err(Error::Settings("dataset_mixture lists no datasets".into()));
    }
    let parts = train.iter().map(|e| e.load(mix.seed, true)).collect::<Result<Vec<_>, _>>()?;
    let combined = concat(parts).shuffle(mix.seed);
    let (train_rows, mut test) = match mix.test_split_size {
        Some(size) => {
            let (tr, te) = train_test_split_indices(combined.len(), size, mix.seed)?;
            let mut both = combined.select(&[tr.as_slice(), te.as_slice()].concat());
            let test = both.split_off(tr.len());
            (both, Some(test))
        }
        None => (combined, None),
    };
    if want_test && !eval.is_empty() {
        let parts = eval.iter().map(|e| e.load(mix.seed, false)).collect::<Result<Vec<_>, _>>()?;
        let extra = concat(parts).shuffle(mix.seed);
        test = Some(match test {
            Some(t) => concat(vec![t, extra]),
            None => extra,
        });
    }
    tracing::info!(
        "dataset mixture: {} training rows{}",
        train_rows.len(),
        test.as_ref().map(|t| format!(", {} held-out rows", t.len())).unwrap_or_default()
    );
    Ok(MixtureRows { train: train_rows, test })
}

// --- the recipe ----------------------------------------------------------------------------------

/// The training rows of a recipe and, when it evaluates, the evaluation rows, with the
/// fingerprints that key their tokenization caches.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedData {
    /// Training rows, in the order `datasets` gives them.
    pub train: Vec<Example>,
    /// Evaluation rows (`eval_strategy` other than `no`).
    pub eval: Option<Vec<Example>>,
    /// SHA-256 over the training rows' sources: every file's bytes and the selection settings.
    pub train_fingerprint: [u8; 32],
    /// The same for the evaluation rows.
    pub eval_fingerprint: Option<[u8; 32]>,
}

#[derive(Debug, Clone)]
enum Sources {
    Single { files: DatasetFiles, train_split: String, eval_split: Option<String> },
    Mixture { mix: DatasetMixture, train: Vec<Entry>, eval: Vec<Entry>, want_eval: bool },
}

/// Every file a recipe's data comes from, found (and hashed), not yet read.
#[derive(Debug, Clone)]
pub struct DataPlan {
    sources: Sources,
    train_fingerprint: [u8; 32],
    eval_fingerprint: Option<[u8; 32]>,
}

fn fingerprint(role: &str, description: &Value) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(SOURCES_VERSION.as_bytes());
    h.update([0]);
    h.update(role.as_bytes());
    h.update([0]);
    h.update(description.to_string().as_bytes());
    h.finalize().into()
}

fn split_digests(files: &DatasetFiles, spec: &str) -> Result<Value, Error> {
    let mut digests = Vec::new();
    for s in parse_split_spec(spec)? {
        for f in &files.split(&s.split)?.files {
            digests.push(hex(&file_digest(f)?));
        }
    }
    Ok(json!({"split": spec, "format": format!("{:?}", files.format), "files": digests}))
}

impl DataPlan {
    /// Find the recipe's data: `dataset_name` (+ `dataset_config`, `dataset_train_split`, and
    /// `dataset_test_split` when `eval_strategy` is not `no`) or `dataset_mixture`. Every file is
    /// located and hashed; a dataset, config, split or file that is missing is an error here.
    pub fn from_recipe(recipe: &Recipe, hub: &HubCache) -> Result<Self, Error> {
        let d = &recipe.data;
        let want_eval = recipe.training.eval_strategy != Interval::No;
        match (&d.dataset_mixture, &d.dataset_name) {
            (Some(mix), _) => {
                // The handbook indexes the mixture's DatasetDict with these names.
                if d.dataset_train_split != "train" {
                    return Err(Error::Settings(format!(
                        "dataset_train_split `{}`: a dataset_mixture makes the split `train`",
                        d.dataset_train_split
                    )));
                }
                if want_eval && d.dataset_test_split != "test" {
                    return Err(Error::Settings(format!(
                        "dataset_test_split `{}`: a dataset_mixture makes the split `test`",
                        d.dataset_test_split
                    )));
                }
                if want_eval && mix.test_split_size.is_none() && mix.eval_datasets.is_empty() {
                    return Err(Error::Settings(
                        "evaluation needs held-out data: set dataset_mixture.test_split_size".into(),
                    ));
                }
                let train: Vec<Entry> =
                    mix.datasets.iter().map(|s| Entry::resolve(s, hub)).collect::<Result<_, _>>()?;
                let eval: Vec<Entry> = if want_eval {
                    mix.eval_datasets.iter().map(|s| Entry::resolve(s, hub)).collect::<Result<_, _>>()?
                } else {
                    Vec::new()
                };
                let train_desc: Vec<Value> = train.iter().map(Entry::describe).collect::<Result<_, _>>()?;
                let settings =
                    json!({"seed": mix.seed, "test_split_size": mix.test_split_size, "datasets": train_desc});
                let train_fingerprint = fingerprint("mixture train", &settings);
                let eval_fingerprint = if want_eval {
                    let eval_desc: Vec<Value> = eval.iter().map(Entry::describe).collect::<Result<_, _>>()?;
                    Some(fingerprint(
                        "mixture test",
                        &json!({"mixture": settings, "eval_datasets": eval_desc}),
                    ))
                } else {
                    None
                };
                Ok(DataPlan {
                    sources: Sources::Mixture { mix: mix.clone(), train, eval, want_eval },
                    train_fingerprint,
                    eval_fingerprint,
                })
            }
            (None, Some(name)) => {
                let config = d.dataset_config.as_deref();
                let files =
                    resolve_dataset(name, config, hub).map_err(|e| e.for_split(&d.dataset_train_split))?;
                let train_fingerprint = fingerprint("train", &split_digests(&files, &d.dataset_train_split)?);
                let (eval_split, eval_fingerprint) = if want_eval {
                    let fp = fingerprint("test", &split_digests(&files, &d.dataset_test_split)?);
                    (Some(d.dataset_test_split.clone()), Some(fp))
                } else {
                    (None, None)
                };
                Ok(DataPlan {
                    sources: Sources::Single {
                        files,
                        train_split: d.dataset_train_split.clone(),
                        eval_split,
                    },
                    train_fingerprint,
                    eval_fingerprint,
                })
            }
            (None, None) => Err(Error::Settings("no dataset: set dataset_name or dataset_mixture".into())),
        }
    }

    /// Key of the training rows: changes when any source file's bytes or any selection setting
    /// (splits, columns, weights, seed, test size) changes.
    pub fn train_fingerprint(&self) -> [u8; 32] {
        self.train_fingerprint
    }

    /// Key of the evaluation rows, when the recipe evaluates.
    pub fn eval_fingerprint(&self) -> Option<[u8; 32]> {
        self.eval_fingerprint
    }

    /// The raw rows: training, and evaluation when planned.
    pub fn load_rows(&self) -> Result<(Rows, Option<Rows>), Error> {
        match &self.sources {
            Sources::Single { files, train_split, eval_split } => {
                let train = load_split(files, train_split)?;
                let eval = eval_split.as_deref().map(|s| load_split(files, s)).transpose()?;
                Ok((train, eval))
            }
            Sources::Mixture { mix, train, eval, want_eval } => {
                let m = mixture_rows(mix, train, eval, *want_eval)?;
                Ok((m.train, if *want_eval { m.test } else { None }))
            }
        }
    }

    /// Read every row and recognise its format (`text_field` is `dataset_text_field`).
    pub fn load(&self, text_field: &str) -> Result<LoadedData, Error> {
        self.load_with(text_field, false)
    }

    /// As [`DataPlan::load`], skipping (and counting) rows that fit no format when `skip_invalid`.
    pub fn load_with(&self, text_field: &str, skip_invalid: bool) -> Result<LoadedData, Error> {
        let (train, eval) = self.load_rows()?;
        Ok(LoadedData {
            train: train.into_examples_with(text_field, skip_invalid)?,
            eval: eval.map(|e| e.into_examples_with(text_field, skip_invalid)).transpose()?,
            train_fingerprint: self.train_fingerprint,
            eval_fingerprint: self.eval_fingerprint,
        })
    }
}

/// The recipe's training (and evaluation) rows in one call: [`DataPlan::from_recipe`] then
/// [`DataPlan::load`] with the recipe's `dataset_text_field`.
pub fn load_training_data(recipe: &Recipe, hub: &HubCache) -> Result<LoadedData, Error> {
    DataPlan::from_recipe(recipe, hub)?.load(&recipe.training.dataset_text_field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_follow_datasets() {
        let (tr, te) = train_test_split_indices(10, 0.25, 0).expect("ok");
        assert_eq!((tr.len(), te.len()), (7, 3));
        let (tr, te) = train_test_split_indices(10, 3.0, 0).expect("ok");
        assert_eq!((tr.len(), te.len()), (7, 3));
        let mut all: Vec<usize> = tr.iter().chain(&te).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert!(train_test_split_indices(10, 10.0, 0).is_err());
        assert!(train_test_split_indices(10, 2.5, 0).is_err());
        assert!(train_test_split_indices(1, 0.5, 0).is_err());
        assert_eq!(train_test_split_indices(0, 0.5, 0).expect("empty"), (vec![], vec![]));
    }

    #[test]
    fn unify_fills_missing_columns_and_promotes_ints() {
        let o = Origin { file: Arc::new(PathBuf::from("x")), row: 1 };
        let mut r = Rows {
            values: vec![json!({"a": 1, "b": "x"}), json!({"c": [1], "a": 2.5})],
            origins: vec![o.clone(), o],
        };
        r.unify();
        assert_eq!(
            r.values,
            vec![json!({"a": 1.0, "b": "x", "c": null}), json!({"a": 2.5, "b": null, "c": [1]})]
        );
        assert_eq!(r.columns(), ["a", "b", "c"]);
        let e = r.clone().select_columns(&["b".into(), "z".into()], "d", "train").expect_err("z is missing");
        assert!(e.to_string().contains("[\"z\"]"), "{e}");
        r.select_columns(&["c".into(), "a".into()], "d", "train").expect("ok");
        assert_eq!(r.values[0], json!({"c": null, "a": 1.0}));
        assert_eq!(r.values[0].as_object().expect("obj").keys().collect::<Vec<_>>(), ["c", "a"]);
    }
}
