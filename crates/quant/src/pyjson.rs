//! JSON text exactly as Python's `json.dumps` writes it, so files nibble writes for Python tools
//! (bitsandbytes' quant-state JSON, PEFT's adapter_config.json, transformers' config.json) are
//! byte-identical to theirs: Python's float `repr`, `ensure_ascii` escapes, `indent=2`.

use serde_json::Value;

/// A float as Python's `repr` / `json.dumps` writes it: the shortest round-trip digits, in fixed
/// notation for decimal exponents -4..16, otherwise `d.ddde+XX`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
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

/// `json.dumps(value, indent=2, sort_keys=True)` as Python writes it (PEFT's adapter_config.json,
/// transformers' config.json and index files): ASCII only, Python's float repr, keys sorted.
pub fn dumps_sorted(v: &Value) -> String {
    let mut out = String::new();
    write_python_json(v, 0, &mut out);
    out
}

fn write_python_json(v: &Value, depth: usize, out: &mut String) {
    let pad = |n: usize, out: &mut String| out.extend(std::iter::repeat_n("  ", n));
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_string(s, out),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Object(o) if o.is_empty() => out.push_str("{}"),
        Value::Array(a) => {
            out.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                pad(depth + 1, out);
                write_python_json(x, depth + 1, out);
                out.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
            }
            pad(depth, out);
            out.push(']');
        }
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push_str("{\n");
            for (i, k) in keys.iter().enumerate() {
                pad(depth + 1, out);
                write_string(k, out);
                out.push_str(": ");
                write_python_json(&o[k.as_str()], depth + 1, out);
                out.push_str(if i + 1 < keys.len() { ",\n" } else { "\n" });
            }
            pad(depth, out);
            out.push('}');
        }
    }
}

/// A string as `json.dumps` writes it with `ensure_ascii` (the default).
pub fn write_string(s: &str, out: &mut String) {
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
            ' '..='~' => out.push(c),
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

    #[test]
    fn strings_escape_as_python_ensure_ascii() {
        let mut s = String::new();
        write_string("a\"b\\c\nd\u{7f}é😀", &mut s);
        assert_eq!(s, r#""a\"b\\c\nd\u007f\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn objects_sort_keys_and_indent_by_two() {
        let v = serde_json::json!({"b": [1, 2.5, null], "a": {"y": true, "x": "é"}, "c": [], "d": {}});
        let want = "{\n  \"a\": {\n    \"x\": \"\\u00e9\",\n    \"y\": true\n  },\n  \"b\": [\n    1,\n    2.5,\n    null\n  ],\n  \"c\": [],\n  \"d\": {}\n}";
        assert_eq!(dumps_sorted(&v), want);
    }
}
