//! YAML as nibble reads and writes it, in one place: a document parsed once (yaml-rust2's event
//! stream) into JSON values *and* the position of every key, scalars resolved by YAML 1.2's
//! core schema (as serde_yaml and PyYAML's safe loader agree on for recipes); and values written
//! back as block YAML that reads back to the same values (`recipe.yaml`, model-card front matter).

use std::collections::HashMap;

use serde_json::{Map, Number, Value as J};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::spans::{Position, SpanIndex};

/// Why a YAML text could not be read, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// What is wrong.
    pub message: String,
    /// Where, when the parser knows.
    pub position: Option<Position>,
}

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.position {
            Some(p) => write!(f, "{} at line {} column {}", self.message, p.line, p.column),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for YamlError {}

fn position(m: Marker) -> Position {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Position { line: m.line(), column: m.col() + 1 }
}

/// Parse one YAML document into JSON values; an empty document is `null`.
pub fn parse(text: &str) -> Result<J, YamlError> {
    parse_with_spans(text).map(|(v, _)| v)
}

/// [`parse`], with the position of every mapping key and sequence item by dotted path.
pub fn parse_with_spans(text: &str) -> Result<(J, SpanIndex), YamlError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        return Err(YamlError { message: e.info().to_owned(), position: Some(position(*e.marker())) });
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    if b.documents > 1 {
        return Err(YamlError { message: "more than one YAML document".into(), position: b.second_document });
    }
    Ok((b.root.unwrap_or(J::Null), SpanIndex::from_positions(b.keys)))
}

/// The value of a plain (unquoted) scalar by YAML 1.2's core schema: null, booleans, integers
/// (decimal, `0o` octal, `0x` hex), floats (`.inf` and `.nan` stay text: JSON has no such number),
/// else the text itself.
pub fn resolve_plain(s: &str) -> J {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return J::Null,
        "true" | "True" | "TRUE" => return J::Bool(true),
        "false" | "False" | "FALSE" => return J::Bool(false),
        _ => {}
    }
    let (sign, digits) = match s.as_bytes().first() {
        Some(b'-') => (-1i128, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    };
    let int = if let Some(oct) = s.strip_prefix("0o") {
        i128::from_str_radix(oct, 8).ok()
    } else if let Some(hex) = s.strip_prefix("0x") {
        i128::from_str_radix(hex, 16).ok()
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        digits.parse::<i128>().ok().map(|v| sign * v)
    } else {
        None
    };
    if let Some(v) = int {
        if let Ok(i) = i64::try_from(v) {
            return J::Number(i.into());
        }
        if let Ok(u) = u64::try_from(v) {
            return J::Number(u.into());
        }
    }
    if is_core_float(s)
        && let Some(n) = s.parse::<f64>().ok().and_then(Number::from_f64)
    {
        return J::Number(n);
    }
    J::String(s.to_owned())
}

/// `[-+]? ( \.[0-9]+ | [0-9]+ ( \.[0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(s: &str) -> bool {
    let b = s.strip_prefix(['-', '+']).unwrap_or(s).as_bytes();
    let digits = |b: &[u8]| b.iter().take_while(|c| c.is_ascii_digit()).count();
    let int = digits(b);
    let mut i = int;
    let mut frac = 0;
    if b.get(i) == Some(&b'.') {
        frac = digits(&b[i + 1..]);
        i += 1 + frac;
    }
    if int == 0 && frac == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let e = digits(&b[i..]);
        if e == 0 {
            return false;
        }
        i += e;
    }
    i == b.len()
}

/// A scalar's value from its style and tag: quoted and block scalars are text, plain ones resolved.
fn scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> J {
    match tag.map(|t| t.suffix.as_str()) {
        Some("str") => return J::String(text.to_owned()),
        Some("int" | "float" | "bool" | "null") => return resolve_plain(text),
        _ => {}
    }
    match style {
        TScalarStyle::Plain => resolve_plain(text),
        _ => J::String(text.to_owned()),
    }
}

enum Frame {
    Map { map: Map<String, J>, key: Option<String>, prefix: String, anchor: usize },
    Seq { items: Vec<J>, prefix: String, anchor: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<J>,
    anchors: HashMap<usize, J>,
    keys: HashMap<String, Position>,
    documents: usize,
    second_document: Option<Position>,
    error: Option<YamlError>,
}

fn join(prefix: &str, item: &str) -> String {
    if prefix.is_empty() { item.to_owned() } else { format!("{prefix}.{item}") }
}

impl Builder {
    fn fail(&mut self, message: impl Into<String>, mark: Marker) {
        if self.error.is_none() {
            self.error = Some(YamlError { message: message.into(), position: Some(position(mark)) });
        }
    }

    /// Where a value starting now lives; `None` when it is a mapping's key.
    fn next_path(&mut self, mark: Marker) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { key: Some(k), prefix, .. }) => Some(join(prefix, k)),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Seq { items, prefix, .. }) => {
                let path = join(prefix, &items.len().to_string());
                self.keys.entry(path.clone()).or_insert(position(mark));
                Some(path)
            }
        }
    }

    /// A finished value goes into its parent (or becomes the document).
    fn finish(&mut self, value: J, anchor: usize, mark: Marker) {
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, key, .. }) => match key.take() {
                Some(k) => {
                    if map.contains_key(&k) {
                        let message = format!("duplicate key `{k}`");
                        self.fail(message, mark);
                    } else {
                        map.insert(k, value);
                    }
                }
                None => self.fail("keys must be strings, found a list or mapping", mark),
            },
        }
    }

    fn on_scalar(
        &mut self,
        text: String,
        style: TScalarStyle,
        anchor: usize,
        tag: Option<&Tag>,
        mark: Marker,
    ) {
        if let Some(Frame::Map { key: key @ None, prefix, .. }) = self.stack.last_mut() {
            let path = join(prefix, &text);
            self.keys.entry(path).or_insert(position(mark));
            *key = Some(text);
            return;
        }
        self.next_path(mark);
        self.finish(scalar(&text, style, tag), anchor, mark);
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents == 2 {
                    self.second_document = Some(position(mark));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.on_scalar(text, style, anchor, tag.as_ref(), mark)
            }
            Event::Alias(id) => {
                let value = self.anchors.get(&id).cloned().unwrap_or(J::Null);
                match (&value, self.stack.last_mut()) {
                    (J::String(s), Some(Frame::Map { key: key @ None, prefix, .. })) => {
                        self.keys.entry(join(prefix, s)).or_insert(position(mark));
                        *key = Some(s.clone());
                    }
                    _ => {
                        self.next_path(mark);
                        self.finish(value, 0, mark);
                    }
                }
            }
            Event::MappingStart(anchor, _) => {
                let prefix = self.next_path(mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Map { map: Map::new(), key: None, prefix, anchor });
            }
            Event::SequenceStart(anchor, _) => {
                let prefix = self.next_path(mark).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { items: Vec::new(), prefix, anchor });
            }
            Event::MappingEnd | Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Map { map, anchor, .. }) => self.finish(J::Object(map), anchor, mark),
                Some(Frame::Seq { items, anchor, .. }) => self.finish(J::Array(items), anchor, mark),
                None => {}
            },
            _ => {}
        }
    }
}

/// Block YAML for `value` (a mapping at the top for a file), in the style serde_yaml and PyYAML
/// write: `key: value`, lists as `- item` under their key, strings plain where they read back as
/// the same string and double-quoted (JSON escapes) otherwise. Reads back with [`parse`] (and any
/// YAML 1.2 reader) to `value`.
pub fn to_string(value: &J) -> String {
    let mut out = String::new();
    match value {
        J::Object(m) if !m.is_empty() => write_map(m, 0, &mut out),
        J::Array(a) if !a.is_empty() => write_seq(a, 0, &mut out),
        other => {
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
    out
}

/// A scalar or empty collection on one line.
fn inline(v: &J) -> String {
    match v {
        J::Null => "null".into(),
        J::Bool(b) => b.to_string(),
        J::Number(n) => n.to_string(),
        J::String(s) => string(s),
        J::Array(a) if a.is_empty() => "[]".into(),
        J::Object(m) if m.is_empty() => "{}".into(),
        // Non-empty collections are written as blocks by the callers.
        other => other.to_string(),
    }
}

fn is_block(v: &J) -> bool {
    matches!(v, J::Array(a) if !a.is_empty()) || matches!(v, J::Object(m) if !m.is_empty())
}

/// Plain strings that YAML 1.1 readers (PyYAML, which Python tools load recipes and cards with)
/// would take for something else: booleans, infinities, numbers and dates.
fn yaml11_special(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    matches!(lower.as_str(), "yes" | "no" | "on" | "off" | ".inf" | "-.inf" | "+.inf" | ".nan")
        || s.trim_start_matches(['-', '+', '.']).starts_with(|c: char| c.is_ascii_digit())
}

/// A string plain when that reads back as the same string, else double-quoted.
fn string(s: &str) -> String {
    let plain_safe = !s.is_empty()
        && !yaml11_special(s)
        && s.trim() == s
        && !s.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@`".contains(c))
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.ends_with(':')
        && s.chars().all(|c| !c.is_control())
        && resolve_plain(s) == J::String(s.to_owned());
    if plain_safe { s.to_owned() } else { serde_json::to_string(s).unwrap_or_default() }
}

fn key(k: &str) -> String {
    string(k)
}

fn write_map(m: &Map<String, J>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in m {
        out.push_str(&pad);
        out.push_str(&key(k));
        out.push(':');
        match v {
            J::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(inner, indent + 2, out);
            }
            J::Array(items) if !items.is_empty() => {
                out.push('\n');
                write_seq(items, indent, out);
            }
            other => {
                out.push(' ');
                out.push_str(&inline(other));
                out.push('\n');
            }
        }
    }
}

fn write_seq(items: &[J], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for v in items {
        out.push_str(&pad);
        out.push('-');
        if is_block(v) {
            // The item's block starts on the dash's line, indented under it.
            let mut inner = String::new();
            match v {
                J::Object(m) => write_map(m, indent + 2, &mut inner),
                J::Array(a) => write_seq(a, indent + 2, &mut inner),
                _ => {}
            }
            out.push(' ');
            out.push_str(inner.trim_start_matches(' '));
        } else {
            out.push(' ');
            out.push_str(&inline(v));
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn scalars_resolve_by_the_core_schema() {
        for (text, want) in [
            ("~", J::Null),
            ("", J::Null),
            ("True", json!(true)),
            ("false", json!(false)),
            ("yes", json!("yes")),
            ("12", json!(12)),
            ("-3", json!(-3)),
            ("0x1f", json!(31)),
            ("0o17", json!(15)),
            ("2e-5", json!(2e-5)),
            ("1.5", json!(1.5)),
            (".5", json!(0.5)),
            ("1.", json!(1.0)),
            ("1e", json!("1e")),
            (".inf", json!(".inf")),
            ("1_000", json!("1_000")),
            ("q_proj", json!("q_proj")),
            ("18446744073709551615", json!(u64::MAX)),
        ] {
            assert_eq!(resolve_plain(text), want, "{text:?}");
        }
    }

    #[test]
    fn a_document_parses_with_key_positions() {
        let text = "a: 1\nb:\n  c: 'x'\n  d:\n    - e: 1\n      f: 2\n    - g\nlist: [1, \"2\"]\nanchored: &x {k: v}\nalias: *x\n";
        let (v, spans) = parse_with_spans(text).expect("parses");
        assert_eq!(
            v,
            json!({"a": 1, "b": {"c": "x", "d": [{"e": 1, "f": 2}, "g"]}, "list": [1, "2"],
                   "anchored": {"k": "v"}, "alias": {"k": "v"}})
        );
        assert_eq!(spans.get("a"), Some(Position { line: 1, column: 1 }));
        assert_eq!(spans.get("b.c"), Some(Position { line: 3, column: 3 }));
        assert_eq!(spans.get("b.d.0.f"), Some(Position { line: 6, column: 7 }));
        assert_eq!(spans.get("b.d.1"), Some(Position { line: 7, column: 7 }));
        assert_eq!(spans.get("list.1"), Some(Position { line: 8, column: 11 }));
        assert_eq!(spans.nearest("b.d.0.f.zzz"), spans.get("b.d.0.f"));
        assert_eq!(parse("").expect("empty"), J::Null);
    }

    #[test]
    fn bad_documents_are_errors_with_a_place() {
        let e = parse("a: [1, 2").expect_err("unclosed");
        assert!(e.position.is_some(), "{e}");
        let e = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(e.position.map(|p| p.line), Some(3), "{e}");
        assert!(e.message.contains("duplicate key `a`"), "{e}");
        assert!(parse("a: 1\n---\nb: 2\n").expect_err("two documents").message.contains("more than one"));
        assert!(parse("? [a, b]\n: 1\n").is_err(), "a list as a key");
    }

    #[test]
    fn written_yaml_looks_like_serde_yaml_s() {
        let v = json!({"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "tags": ["nibble", "sft"], "n": 3,
                       "lr": 2e-4, "empty": [], "none": null, "odd": "yes", "colon": "a: b", "mix": [{"id": "x", "w": 0.5}]});
        assert_eq!(
            to_string(&v),
            "base_model: Qwen/Qwen2.5-0.5B-Instruct\ntags:\n- nibble\n- sft\nn: 3\nlr: 0.0002\nempty: []\nnone: null\n\
             odd: \"yes\"\ncolon: \"a: b\"\nmix:\n- id: x\n  w: 0.5\n"
        );
    }

    fn json_value() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            Just(J::Null),
            any::<bool>().prop_map(J::Bool),
            any::<i64>().prop_map(|i| J::Number(i.into())),
            (-1e12f64..1e12).prop_map(|f| Number::from_f64(f).map_or(J::Null, J::Number)),
            "\\PC{0,12}".prop_map(J::String),
            prop::sample::select(vec!["true", "~", "1e5", "- x", "#", "a: b", " pad", "null", "0x10", ""])
                .prop_map(|s| J::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| J::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn written_yaml_reads_back_to_the_same_values(v in json_value()) {
            let text = to_string(&v);
            let back = parse(&text);
            prop_assert!(back.is_ok(), "{:?}\n{}", back, text);
            prop_assert_eq!(back.unwrap_or_default(), v, "{}", text);
        }

        #[test]
        fn garbage_is_an_error_or_a_value_never_a_panic(text in "\\PC{0,64}") {
            let _ = parse(&text);
        }
    }
}
