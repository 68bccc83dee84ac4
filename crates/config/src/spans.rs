//! Where each key of a YAML recipe sits (line and column), so that every error can point at it.
//! Recorded by the same walk that reads the values (`yaml::parse_with_spans`), under each key's
//! and sequence item's dotted path (`a.b.0.c`).

use std::collections::HashMap;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column number.
    pub column: usize,
}

/// Positions of keys by dotted path, built from a YAML text.
#[derive(Debug, Default, Clone)]
pub struct SpanIndex {
    keys: HashMap<String, Position>,
}

impl SpanIndex {
    /// The index of positions recorded while parsing.
    pub(crate) fn from_positions(keys: HashMap<String, Position>) -> Self {
        SpanIndex { keys }
    }

    /// Position of a dotted key path (`lora_r`, `dataset_mixture.datasets.1.weight`).
    pub fn get(&self, path: &str) -> Option<Position> {
        self.keys.get(path).copied()
    }

    /// Position of the longest recorded prefix of `path` (an error deep inside a value
    /// points at the nearest key that the file spells out).
    pub fn nearest(&self, path: &str) -> Option<Position> {
        let mut p = path;
        loop {
            if let Some(pos) = self.get(p) {
                return Some(pos);
            }
            p = &p[..p.rfind('.')?];
        }
    }
}
