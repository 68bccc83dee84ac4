//! Errors of the data pipeline after rows are read: tokenizer files, options TRL refuses, and
//! rows that cannot be tokenized, named by file and row.

use std::path::PathBuf;

use super::rows::DataError;

/// Why a dataset could not be tokenized, packed or batched.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// Reading the rows failed.
    #[error(transparent)]
    Rows(#[from] DataError),
    /// Finding or reading a dataset source failed.
    #[error(transparent)]
    Sources(#[from] crate::SourceError),
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
    /// The chat template does not compile.
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    /// A combination of options or data TRL refuses.
    #[error("{0}")]
    Options(String),
    /// One row that cannot be tokenized.
    #[error("{}row {row}: {message}", .file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default())]
    Row {
        /// The data file, when known.
        file: Option<PathBuf>,
        /// 1-based row number among the rows read.
        row: usize,
        /// What is wrong.
        message: String,
    },
}

impl PrepareError {
    /// Attach the data file to a row error.
    pub fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            PrepareError::Row { file: None, row, message } => {
                PrepareError::Row { file: Some(path.to_owned()), row, message }
            }
            e => e,
        }
    }
}
