//! Where each key of a YAML recipe sits (line and column), so that every error can point at it.
//!
//! serde_yaml forgets positions; this walks yaml-rust2's event stream once and records the
//! position of every mapping key and sequence item under its dotted path (`a.b.0.c`).

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column number.
    pub column: usize,
}

impl Position {
    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Position { line: m.line(), column: m.col() + 1 }
    }
}

/// Positions of keys by dotted path, built from a YAML text.
#[derive(Debug, Default, Clone)]
pub struct SpanIndex {
    keys: HashMap<String, Position>,
}

impl SpanIndex {
    /// Index a YAML document; a document that does not parse yields an empty index (the
    /// caller reports the parse error itself, from serde_yaml, with its own position).
    pub fn from_yaml(text: &str) -> Self {
        let mut recv = Receiver::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut recv, false).is_err() {
            return SpanIndex::default();
        }
        SpanIndex { keys: recv.keys }
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

enum Frame {
    /// Inside a mapping: `Some(key)` once the key scalar of the current entry was read.
    Map { prefix: String, key: Option<String> },
    /// Inside a sequence: index of the next item.
    Seq { prefix: String, next: usize },
}

#[derive(Default)]
struct Receiver {
    stack: Vec<Frame>,
    keys: HashMap<String, Position>,
}

fn join(prefix: &str, item: &str) -> String {
    if prefix.is_empty() { item.to_owned() } else { format!("{prefix}.{item}") }
}

impl Receiver {
    /// Called when a value (scalar or collection start) begins; returns the path it lives at.
    fn value_path(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { prefix, key }) => match key.take() {
                Some(k) => Some(join(prefix, &k)),
                None => {
                    // This value is a key of the mapping.
                    let k = scalar.unwrap_or("").to_owned();
                    let path = join(prefix, &k);
                    self.keys.entry(path).or_insert(Position::from_marker(mark));
                    *key = Some(k);
                    None
                }
            },
            Some(Frame::Seq { prefix, next }) => {
                let path = join(prefix, &next.to_string());
                *next += 1;
                self.keys.entry(path.clone()).or_insert(Position::from_marker(mark));
                Some(path)
            }
        }
    }
}

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(ref s, ..) => {
                self.value_path(mark, Some(s));
            }
            Event::Alias(_) => {
                self.value_path(mark, None);
            }
            Event::MappingStart(..) => {
                if let Some(prefix) = self.value_path(mark, None) {
                    self.stack.push(Frame::Map { prefix, key: None });
                } else {
                    // A complex (mapping) key: track it as an anonymous mapping.
                    self.stack.push(Frame::Map { prefix: "?".into(), key: None });
                }
            }
            Event::SequenceStart(..) => {
                let prefix = self.value_path(mark, None).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { prefix, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_nested_keys_and_items() {
        let text = "a: 1\nb:\n  c: x\n  d:\n    - e: 1\n      f: 2\n    - g\nlist: [1, 2]\n";
        let idx = SpanIndex::from_yaml(text);
        assert_eq!(idx.get("a"), Some(Position { line: 1, column: 1 }));
        assert_eq!(idx.get("b.c"), Some(Position { line: 3, column: 3 }));
        assert_eq!(idx.get("b.d.0.f"), Some(Position { line: 6, column: 7 }));
        assert_eq!(idx.get("b.d.1"), Some(Position { line: 7, column: 7 }));
        assert_eq!(idx.get("list.1"), Some(Position { line: 8, column: 11 }));
        assert_eq!(idx.nearest("b.d.0.f.zzz"), idx.get("b.d.0.f"));
        assert_eq!(idx.nearest("nope"), None);
    }

    #[test]
    fn broken_yaml_gives_empty_index() {
        assert_eq!(SpanIndex::from_yaml("a: [1, 2").get("a"), None);
    }
}
