//! Diagnostics: every problem in a recipe, with the key, where it came from and where it sits.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spans::Position;

/// Which layer of the configuration a value came from (lowest to highest precedence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// nibble's built-in default (TRL's default unless documented otherwise).
    Default,
    /// The recipe YAML file.
    File,
    /// An environment variable with the `NIBBLE_` prefix.
    Env,
    /// A `--key value` command-line flag.
    Cli,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Env => "env",
            Source::Cli => "cli",
        })
    }
}

/// The place a diagnostic points at, so a user can go and fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A key in the recipe file; position when the file spells the key out.
    File {
        /// The recipe file.
        path: PathBuf,
        /// Line and column of the key, when known.
        position: Option<Position>,
    },
    /// An environment variable.
    Env {
        /// The variable's name, e.g. `NIBBLE_LORA_R`.
        var: String,
    },
    /// A command-line argument.
    Cli {
        /// The flag as typed, e.g. `--lora_r`.
        flag: String,
    },
    /// A built-in default (e.g. a required key that nothing set).
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, position: Some(p) } => {
                write!(f, "{}:{}:{}", path.display(), p.line, p.column)
            }
            Origin::File { path, position: None } => write!(f, "{}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Cli { flag } => write!(f, "command line {flag}"),
            Origin::Default => f.write_str("defaults"),
        }
    }
}

/// What kind of problem a diagnostic reports; tests and tools match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The YAML (or a command-line value) does not parse.
    Syntax,
    /// A key nibble and TRL do not know.
    UnknownKey,
    /// A value of the wrong type.
    WrongType,
    /// A value outside its allowed range or set.
    OutOfRange,
    /// Two keys that cannot be set together, or an old and a new spelling that disagree.
    Conflict,
    /// A required key that nothing set.
    Missing,
}

/// One problem with a recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The kind of problem.
    pub kind: Kind,
    /// Dotted key path, as written in the recipe (`lora_r`, `dataset_mixture.datasets.0.id`).
    pub key: String,
    /// Where the offending value came from.
    pub origin: Origin,
    /// What is wrong, and how to fix it when we can tell.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.key, self.message)
    }
}

/// A recipe that could not be turned into a plan: all problems found, in file order.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The recipe file could not be read.
    #[error("cannot read recipe {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The recipe has one or more problems; each names its key and place.
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(diags: &[Diagnostic]) -> String {
    let mut out = format!("recipe has {} problem{}:", diags.len(), if diags.len() == 1 { "" } else { "s" });
    for d in diags {
        out.push_str("\n  ");
        out.push_str(&d.to_string());
    }
    out
}

impl Error {
    /// An invalid recipe with these problems, in the order a user reads them (file order, then
    /// environment, then flags).
    pub fn invalid(mut diags: Vec<Diagnostic>) -> Error {
        diags.sort_by_key(|d| crate::order(&d.origin));
        Error::Invalid(diags)
    }

    /// The diagnostics of an invalid recipe (empty for I/O errors).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Error::Invalid(d) => d,
            Error::Read { .. } => &[],
        }
    }
}
