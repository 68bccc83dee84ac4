//! A small JSON reader (xtask depends on std and anyhow only): enough for the files the benchmark
//! harness reads back — criterion's `estimates.json`, nibble's `log.jsonl` and the one-line
//! reports of the Python scripts.

use anyhow::{Result, bail};

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null` (also how Python's json writes NaN when asked not to).
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// Any number, as f64.
    Num(f64),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Value>),
    /// An object, keys in file order.
    Obj(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The number at the end of `path` (object keys), if there is one.
    pub fn num(&self, path: &[&str]) -> Option<f64> {
        let mut v = self;
        for key in path {
            v = v.get(key)?;
        }
        match v {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }
}

/// Parses one JSON document (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<Value> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        bail!("trailing characters at byte {} of {:?}", p.i, clip(text));
    }
    Ok(v)
}

/// The first 80 characters of `text`, for error messages.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(u8::is_ascii_whitespace) {
            self.i += 1;
        }
    }

    fn expect(&mut self, word: &str) -> Result<()> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(())
        } else {
            bail!("expected `{word}` at byte {}", self.i)
        }
    }

    fn value(&mut self) -> Result<Value> {
        self.ws();
        match self.s.get(self.i) {
            None => bail!("unexpected end of JSON"),
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Value::Obj(members));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    self.expect(":")?;
                    members.push((key, self.value()?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Value::Obj(members));
                        }
                        _ => bail!("expected `,` or `}}` at byte {}", self.i),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Value::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Value::Arr(items));
                        }
                        _ => bail!("expected `,` or `]` at byte {}", self.i),
                    }
                }
            }
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.expect("true").map(|()| Value::Bool(true)),
            Some(b'f') => self.expect("false").map(|()| Value::Bool(false)),
            Some(b'n') => self.expect("null").map(|()| Value::Null),
            // Python's json writes these for non-finite floats.
            Some(b'N') => self.expect("NaN").map(|()| Value::Num(f64::NAN)),
            Some(b'I') => self.expect("Infinity").map(|()| Value::Num(f64::INFINITY)),
            Some(_) => self.number(),
        }
    }

    fn number(&mut self) -> Result<Value> {
        let start = self.i;
        if self.s[self.i..].starts_with(b"-Infinity") {
            self.i += "-Infinity".len();
            return Ok(Value::Num(f64::NEG_INFINITY));
        }
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c)) {
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.i])?;
        match text.parse() {
            Ok(n) => Ok(Value::Num(n)),
            Err(_) => bail!("bad number {text:?} at byte {start}"),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else { bail!("unterminated string") };
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8(out)?),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else { bail!("unterminated escape") };
                    self.i += 1;
                    let ch = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).unwrap_or_default();
                            self.i += 4;
                            let code = u32::from_str_radix(std::str::from_utf8(hex)?, 16)?;
                            // Surrogate pairs never occur in the files read here; keep a marker.
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => char::from(other),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                other => out.push(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_documents() -> Result<()> {
        let v = parse(
            r#" {"median": {"point_estimate": 1.5e3, "ci": [1, -2.0]}, "s": "a\"\u00e9", "n": null, "b": true} "#,
        )?;
        assert_eq!(v.num(&["median", "point_estimate"]), Some(1500.0));
        assert_eq!(v.get("s"), Some(&Value::Str("a\"é".into())));
        assert_eq!(v.get("n"), Some(&Value::Null));
        assert_eq!(v.get("b"), Some(&Value::Bool(true)));
        let ci = v.get("median").and_then(|m| m.get("ci"));
        assert_eq!(ci, Some(&Value::Arr(vec![Value::Num(1.0), Value::Num(-2.0)])));
        Ok(())
    }

    #[test]
    fn reads_python_non_finite_numbers_and_rejects_junk() -> Result<()> {
        assert!(matches!(parse("NaN")?, Value::Num(n) if n.is_nan()));
        assert_eq!(parse("[-Infinity]")?, Value::Arr(vec![Value::Num(f64::NEG_INFINITY)]));
        assert!(parse("{\"a\": 1} x").is_err());
        assert!(parse("{\"a\" 1}").is_err());
        assert!(parse("[1,").is_err());
        Ok(())
    }
}
