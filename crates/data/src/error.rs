//! nibble's data pipeline has one error type: finding and reading sources, rows that fit no
//! format, tokenizer files, chat templates and options TRL refuses, each naming the file, row,
//! key or template at fault.

use std::path::PathBuf;

/// Why data could not be found, read, tokenized, packed or batched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a local file or folder, and not in the hub cache.
    #[error(
        "dataset `{id}`{}: not a local file or folder, and not in the Hugging Face hub cache \
         (looked in {}); nibble never downloads: fetch it first, e.g. `hf download --repo-type dataset {id}`",
        .split.as_ref().map(|s| format!(" (split `{s}`)")).unwrap_or_default(),
        .searched.display()
    )]
    NotInCache {
        /// The dataset id.
        id: String,
        /// The split asked for, when known.
        split: Option<String>,
        /// The hub-cache folder searched.
        searched: PathBuf,
    },
    /// A path-like id that names nothing.
    #[error("dataset `{id}`: no such file or folder ({})", .path.display())]
    NoSuchPath {
        /// The dataset id.
        id: String,
        /// The path tried.
        path: PathBuf,
    },
    /// The split is not among the dataset's splits.
    #[error("dataset `{id}` has no split `{split}` (in {}); its splits: {}", .root.display(), .available.join(", "))]
    NoSplit {
        /// The dataset id.
        id: String,
        /// The split asked for.
        split: String,
        /// The folder or file read.
        root: PathBuf,
        /// The splits it has.
        available: Vec<String>,
    },
    /// A split whose files are not there (a hub dataset partly downloaded, say).
    #[error(
        "dataset `{id}`, split `{split}`: no data files match {patterns:?} in {} (nibble never downloads: \
         fetch the missing files first)",
        .root.display()
    )]
    SplitWithoutFiles {
        /// The dataset id.
        id: String,
        /// The split.
        split: String,
        /// The folder searched.
        root: PathBuf,
        /// The split's file patterns.
        patterns: Vec<String>,
    },
    /// The configuration is not one the dataset declares.
    #[error("dataset `{id}` has no config `{config}`; its configs: {}", .available.join(", "))]
    NoConfig {
        /// The dataset id.
        id: String,
        /// The config asked for.
        config: String,
        /// Those it has.
        available: Vec<String>,
    },
    /// Several configs and none chosen.
    #[error("dataset `{id}` has several configs ({}); choose one with dataset_config (or `config` in dataset_mixture)", .available.join(", "))]
    ConfigMissing {
        /// The dataset id.
        id: String,
        /// Its configs.
        available: Vec<String>,
    },
    /// A folder without data files (or none that its patterns match).
    #[error("dataset `{id}`: {} holds no data files{}", .root.display(),
        if .patterns.is_empty() { String::new() } else {
            format!(" matching {:?} (nibble never downloads: fetch the files first)", .patterns)
        })]
    Empty {
        /// The dataset id.
        id: String,
        /// The folder.
        root: PathBuf,
        /// The patterns searched, when the dataset card names them.
        patterns: Vec<String>,
    },
    /// Data nibble does not read (CSV, Arrow, archives, compressed JSON, ...).
    #[error("dataset `{id}`: {what} is not supported (nibble reads Parquet and JSON/JSONL){}",
        .path.as_ref().map(|p| format!(": {}", p.display())).unwrap_or_default())]
    Unsupported {
        /// The dataset id.
        id: String,
        /// What was found.
        what: String,
        /// The file, when one is at fault.
        path: Option<PathBuf>,
    },
    /// A README `configs:` block or a `data_files` pattern that cannot be used.
    #[error("{}: {message}", .path.display())]
    Card {
        /// The README (or folder).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A split spec (`train[:10%]`) that does not parse or apply.
    #[error("split `{spec}`: {message}")]
    SplitSpec {
        /// The spec.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// A Parquet file that cannot be read.
    #[error("{}{}: {message}", .path.display(), .row.map(|r| format!(": row {r}")).unwrap_or_default())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// 1-based row, when one is at fault.
        row: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A file that cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Columns asked for that the dataset lacks.
    #[error("dataset `{id}` (split `{split}`) has no column(s) {missing:?}; its columns: {available:?}")]
    Columns {
        /// The dataset id.
        id: String,
        /// The split.
        split: String,
        /// Columns asked for and missing.
        missing: Vec<String>,
        /// Columns it has.
        available: Vec<String>,
    },
    /// A mixture or split setting that cannot apply to the data (too large a test split, ...).
    #[error("{0}")]
    Settings(String),
    /// A data file type nibble does not read (by its extension).
    #[error("{}: unsupported data file (expected .jsonl or .json)", .path.display())]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },
    /// One row that does not parse, fits no TRL format or cannot be tokenized.
    #[error("{}row {row}: {message}", .file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Row {
        /// The data file, when known.
        file: Option<PathBuf>,
        /// 1-based row number (the line, for JSONL).
        row: usize,
        /// What is wrong.
        message: String,
    },
    /// A tokenizer file is missing or malformed.
    #[error("{}: {message}", .path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A recipe token (`eos_token`, `pad_token`) that is not in the vocabulary.
    #[error("{key} `{token}` is not in the tokenizer's vocabulary")]
    UnknownToken {
        /// The recipe key.
        key: &'static str,
        /// The token text.
        token: String,
    },
    /// A combination of options or data TRL refuses.
    #[error("{0}")]
    Options(String),
    /// The chat template does not compile.
    #[error("chat template does not compile: {0:#}")]
    TemplateCompile(minijinja::Error),
    /// Rendering failed (including a `raise_exception` from the template itself).
    #[error("chat template failed to render: {0:#}")]
    TemplateRender(minijinja::Error),
    /// `assistant_only_loss` needs `{% generation %}` blocks the template lacks.
    #[error(
        "assistant_only_loss needs a chat template with {{% generation %}} ... {{% endgeneration %}} around \
         assistant replies; this one has none"
    )]
    NoGenerationBlock,
    /// A file that holds (or should hold) a chat template cannot be read.
    #[error("{}: {message}", .path.display())]
    TemplateFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// Attach the data file to a row error that has none.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::Row { file: None, row, message } => {
                Error::Row { file: Some(path.to_owned()), row, message }
            }
            e => e,
        }
    }

    /// Name the split in a not-in-cache error.
    pub fn for_split(self, split: &str) -> Self {
        match self {
            Error::NotInCache { id, split: None, searched } => {
                Error::NotInCache { id, split: Some(split.to_owned()), searched }
            }
            e => e,
        }
    }
}
