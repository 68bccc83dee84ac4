//! JSON text exactly as Python's `json.dumps` writes it, so files nibble writes for Python tools
//! (bitsandbytes' quant-state JSON, PEFT's adapter_config.json, transformers' config.json and
//! `*_results.json`) are byte-identical to theirs, and chat templates' `tojson` renders as
//! transformers renders it: Python's float `repr`, `ensure_ascii` escapes, indents, key order.

use serde_json::Value;

/// A float as Python's `repr` / `json.dumps` writes it: the shortest round-trip digits, in fixed
/// notation for decimal exponents -4..16, otherwise `d.ddde+XX`; JSON's `NaN` / `Infinity`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    finite_repr(x)
}

/// A float as Python's `repr(float)` prints it in text (a model card): as [`py_float_repr`] but
/// `nan`, `inf`, `-inf` for the non-finite values.
pub fn py_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    finite_repr(x)
}

fn finite_repr(x: f64) -> String {
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// The arguments of `json.dumps` that change its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dumps {
    /// `indent=`: `None` writes one line with `", "` and `": "` separators; `Some(n)` one item per
    /// line indented by `n` spaces per level (`","` then a newline).
    pub indent: Option<usize>,
    /// `sort_keys=True` (else the object's own order, as the Python dict had it).
    pub sort_keys: bool,
    /// `ensure_ascii=True` (Python's default): every non-ASCII character as `\uXXXX` escapes.
    pub ensure_ascii: bool,
}

impl Dumps {
    /// `json.dumps(value, indent=2, sort_keys=True)`: PEFT's adapter_config.json, transformers'
    /// config.json and index files.
    pub const SORTED_2: Dumps = Dumps { indent: Some(2), sort_keys: true, ensure_ascii: true };
    /// `json.dump(metrics, indent=4, sort_keys=True)`: transformers' `*_results.json`.
    pub const SORTED_4: Dumps = Dumps { indent: Some(4), sort_keys: true, ensure_ascii: true };

    /// The text of `value` as Python writes it with these arguments.
    pub fn dumps(&self, value: &Value) -> String {
        let mut out = String::new();
        self.write(value, 0, &mut out);
        out
    }

    fn write(&self, v: &Value, depth: usize, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => write_string(s, self.ensure_ascii, out),
            Value::Array(a) if a.is_empty() => out.push_str("[]"),
            Value::Object(o) if o.is_empty() => out.push_str("{}"),
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    self.item_break(i, depth + 1, out);
                    self.write(x, depth + 1, out);
                }
                self.close_break(depth, out);
                out.push(']');
            }
            Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    self.item_break(i, depth + 1, out);
                    write_string(k, self.ensure_ascii, out);
                    out.push_str(": ");
                    self.write(&o[k.as_str()], depth + 1, out);
                }
                self.close_break(depth, out);
                out.push('}');
            }
        }
    }

    /// What goes before item `i` of a container at `depth` levels.
    fn item_break(&self, i: usize, depth: usize, out: &mut String) {
        match self.indent {
            Some(n) => {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                out.extend(std::iter::repeat_n(' ', n * depth));
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
    }

    /// What goes before the closing bracket of a non-empty container at `depth`.
    fn close_break(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }
}

/// `json.dumps(value, indent=2, sort_keys=True)` (see [`Dumps::SORTED_2`]).
pub fn dumps_sorted(v: &Value) -> String {
    Dumps::SORTED_2.dumps(v)
}

/// A string as `json.dumps` writes it: `ensure_ascii` escapes every non-ASCII character as
/// UTF-16 `\uXXXX` units; without it only quotes, backslashes and control characters are escaped.
pub fn write_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\0'..='\u{1f}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            ' '..='~' => out.push(c),
            _ if !ensure_ascii => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_escape_as_python_ensure_ascii() {
        let mut s = String::new();
        write_string("a\"b\\c\nd\u{7f}é😀\u{1}", true, &mut s);
        assert_eq!(s, r#""a\"b\\c\nd\u007f\u00e9\ud83d\ude00\u0001""#);
        let mut s = String::new();
        write_string("é😀\u{1}\"", false, &mut s);
        assert_eq!(s, "\"é😀\\u0001\\\"\"");
    }

    #[test]
    fn objects_sort_keys_and_indent_by_two() {
        let v = json!({"b": [1, 2.5, null], "a": {"y": true, "x": "é"}, "c": [], "d": {}});
        let want = "{\n  \"a\": {\n    \"x\": \"\\u00e9\",\n    \"y\": true\n  },\n  \"b\": [\n    1,\n    2.5,\n    null\n  ],\n  \"c\": [],\n  \"d\": {}\n}";
        assert_eq!(dumps_sorted(&v), want);
    }

    #[test]
    fn one_line_keeps_order_and_python_separators() {
        let d = Dumps { indent: None, sort_keys: false, ensure_ascii: false };
        let v = json!({"b": [1, 1e-5, "é"], "a": {}});
        assert_eq!(d.dumps(&v), r#"{"b": [1, 1e-05, "é"], "a": {}}"#);
    }

    #[test]
    fn floats_print_as_python_repr() {
        for (f, want) in [
            (2e-5, "2e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (3.0, "3.0"),
            (-0.5, "-0.5"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(py_float_repr(f), want, "{f}");
            assert_eq!(py_repr(f), want, "{f}");
        }
        assert_eq!(py_float_repr(f64::NAN), "NaN");
        assert_eq!(py_repr(f64::NAN), "nan");
        assert_eq!(py_float_repr(f64::NEG_INFINITY), "-Infinity");
        assert_eq!(py_repr(f64::INFINITY), "inf");
    }
}
