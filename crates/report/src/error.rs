//! Why writing a run's logs or its final files failed, naming the file at fault.

use std::path::PathBuf;

/// A failure of the [`Reporter`](super::Reporter) or of the file helpers; every variant names the
/// file so the user knows what to fix (a full disk, a read-only folder, a broken file).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Creating, writing, reading or renaming a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`writing`, `renaming into`, ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file (or a line of `log.jsonl`) could not be read or written.
    #[error("{}{}: {source}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line, for JSON Lines files.
        line: Option<usize>,
        /// What serde_json said.
        source: serde_json::Error,
    },
    /// The loss plot could not be encoded as PNG.
    #[error("encoding {}: {source}", path.display())]
    Png {
        /// The PNG file.
        path: PathBuf,
        /// What the encoder said.
        source: png::EncodingError,
    },
    /// A TensorBoard event file is truncated or fails its CRC checks.
    #[error("{}: corrupt TensorBoard record at byte {offset}: {problem}", path.display())]
    Corrupt {
        /// The event file.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        problem: String,
    },
}

impl ReportError {
    /// An I/O error on `path` while doing `action`.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ReportError::Io { action, path, source }
    }
}
