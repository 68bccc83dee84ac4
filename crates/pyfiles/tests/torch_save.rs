//! `torch_save::read` against files the pinned torch wrote (`tests/golden/state.pt` and the same
//! values as JSON, `state.json`, from `scripts/golden_torch_save.py`): an AdamW state dict as a
//! Trainer's `optimizer.pt` holds it, views, shared storages, every int width; and no input,
//! however damaged, panics.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;

use proptest::prelude::*;
use pyfiles::torch_save::{TensorData, Value, parse, read};
use serde_json::{Value as Json, json};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn values(t: &TensorData) -> Vec<f64> {
    let n: usize = t.shape.iter().product();
    let size = t.data.len() / n.max(1);
    (0..n)
        .map(|i| {
            let b = &t.data[i * size..(i + 1) * size];
            match t.dtype {
                "F32" => f64::from(f32::from_le_bytes(b.try_into().unwrap())),
                "BF16" => {
                    f64::from(f32::from_bits(u32::from(u16::from_le_bytes(b.try_into().unwrap())) << 16))
                }
                "F16" => {
                    let h = u16::from_le_bytes(b.try_into().unwrap());
                    let (sign, exp, frac) =
                        ((h >> 15) as i32, ((h >> 10) & 0x1f) as i32, f64::from(h & 0x3ff));
                    let m = if exp == 0 {
                        frac / 1024.0 * 2f64.powi(-14)
                    } else {
                        (1.0 + frac / 1024.0) * 2f64.powi(exp - 15)
                    };
                    if sign == 1 { -m } else { m }
                }
                "I64" => i64::from_le_bytes(b.try_into().unwrap()) as f64,
                "BOOL" => f64::from(b[0]),
                other => panic!("dtype {other}"),
            }
        })
        .collect()
}

/// The value in `scripts/golden_torch_save.py`'s `plain` form.
fn plain(v: &Value) -> Json {
    match v {
        Value::None => Json::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::Bytes(b) => json!({ "bytes": b }),
        Value::List(l) => json!({ "list": l.iter().map(plain).collect::<Vec<_>>() }),
        Value::Tuple(t) => json!({ "tuple": t.iter().map(plain).collect::<Vec<_>>() }),
        Value::Dict(d) => {
            json!({ "dict": d.iter().map(|(k, v)| json!([plain(k), plain(v)])).collect::<Vec<_>>() })
        }
        Value::Tensor(t) => {
            let dtype = match t.dtype {
                "F32" => "torch.float32",
                "BF16" => "torch.bfloat16",
                "F16" => "torch.float16",
                "I64" => "torch.int64",
                "BOOL" => "torch.bool",
                other => other,
            };
            json!({ "dtype": dtype, "shape": t.shape, "values": values(t) })
        }
        Value::Object(name, args) => {
            json!({ "object": name, "args": args.iter().map(plain).collect::<Vec<_>>() })
        }
    }
}

/// Equal trees; numbers within 1e-12 relative (serde_json parses Python's float reprs to the
/// nearest double or one next to it).
fn same(got: &Json, want: &Json, at: &str) {
    match (got, want) {
        (Json::Number(a), Json::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{at}: {a} vs {b}");
        }
        (Json::Array(a), Json::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{at}: lengths");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                same(x, y, &format!("{at}[{i}]"));
            }
        }
        (Json::Object(a), Json::Object(b)) => {
            assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{at}: keys");
            for (k, x) in a {
                same(x, &b[k], &format!("{at}.{k}"));
            }
        }
        _ => assert_eq!(got, want, "{at}"),
    }
}

#[test]
fn reads_what_torch_saved() {
    let got = read(&golden("state.pt")).unwrap();
    let want: Json = serde_json::from_str(&std::fs::read_to_string(golden("state.json")).unwrap()).unwrap();
    same(&plain(&got), &want, "state");
    // The optimizer state as a resume reads it: per-parameter moments and the step.
    let state = got.get_str("optimizer").and_then(|o| o.get_str("state")).unwrap();
    let first = state.get(&Value::Int(1)).unwrap();
    match (first.get_str("exp_avg"), first.get_str("step")) {
        (Some(Value::Tensor(m)), Some(Value::Tensor(step))) => {
            assert_eq!((m.dtype, m.shape.as_slice()), ("BF16", &[6, 4][..]));
            assert_eq!((step.shape.len(), values(step)), (0, vec![2.0]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("nibble-torch-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("optimizer.pt");
    std::fs::write(&path, b"not a zip").unwrap();
    let e = read(&path).unwrap_err().to_string();
    assert!(e.contains("optimizer.pt") && e.contains("zip"), "{e}");
    let bytes = std::fs::read(golden("state.pt")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(read(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Flipped, cut or appended bytes give a value or an error, never a panic or a hang.
    #[test]
    fn damaged_files_never_panic(at in 0usize..4896, byte in any::<u8>(), cut in 0usize..4896, extra in prop::collection::vec(any::<u8>(), 0..16)) {
        let good = std::fs::read(golden("state.pt")).unwrap();
        let mut flipped = good.clone();
        let i = at % flipped.len();
        flipped[i] ^= byte.max(1);
        let _ = parse(&flipped);
        let _ = parse(&good[..cut % good.len()]);
        let mut longer = good.clone();
        longer.extend(&extra);
        let _ = parse(&longer);
    }

    /// Random bytes in `data.pkl`'s place: an error or a value, never a panic.
    #[test]
    fn random_bytes_never_panic(noise in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&noise);
    }
}

/// What `Writer` writes, `read` and torch's own `torch.load(weights_only=True)` read back the same:
/// an optimizer-like state dict with f32 and bf16 tensors, int keys, tuples, None and bools.
#[test]
fn torch_loads_what_the_writer_wrote() {
    use pyfiles::torch_save::Writer;
    let dir = std::env::temp_dir().join(format!("nibble-torch-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("optimizer.pt");
    let mut w = Writer::create(&path).unwrap();
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 3.0, 5.5, -0.125].iter().flat_map(|x| x.to_le_bytes()).collect();
    let bf16s: Vec<u8> = [0x3f80u16, 0xc000, 0x3e80].iter().flat_map(|x| x.to_le_bytes()).collect();
    let step: Vec<u8> = 7.0f32.to_le_bytes().to_vec();
    let a = w.tensor("F32", &[2, 3], &f32s).unwrap();
    let b = w.tensor("BF16", &[3], &bf16s).unwrap();
    let s = w.tensor("F32", &[], &step).unwrap();
    let str_ = |x: &str| Value::Str(x.into());
    let state = Value::Dict(vec![
        (
            str_("state"),
            Value::Dict(vec![(
                Value::Int(0),
                Value::Dict(vec![(str_("step"), s), (str_("exp_avg"), a), (str_("exp_avg_sq"), b)]),
            )]),
        ),
        (
            str_("param_groups"),
            Value::List(vec![Value::Dict(vec![
                (str_("lr"), Value::Float(2e-3)),
                (str_("betas"), Value::Tuple(vec![Value::Float(0.9), Value::Float(0.999)])),
                (str_("foreach"), Value::None),
                (str_("fused"), Value::Bool(true)),
                (str_("big"), Value::Int(-(1i64 << 40))),
                (str_("params"), Value::List(vec![Value::Int(0), Value::Int(300), Value::Int(70_000)])),
            ])]),
        ),
    ]);
    w.finish(&state).unwrap();
    let back = plain(&read(&path).unwrap());
    let want = json!({"dict": [
        ["state", {"dict": [[0, {"dict": [
            ["step", {"dtype": "torch.float32", "shape": [], "values": [7.0]}],
            ["exp_avg", {"dtype": "torch.float32", "shape": [2, 3], "values": [1.5, -2.0, 0.25, 3.0, 5.5, -0.125]}],
            ["exp_avg_sq", {"dtype": "torch.bfloat16", "shape": [3], "values": [1.0, -2.0, 0.25]}]
        ]}]]}],
        ["param_groups", {"list": [{"dict": [
            ["lr", 2e-3], ["betas", {"tuple": [0.9, 0.999]}], ["foreach", null], ["fused", true],
            ["big", -1_099_511_627_776i64], ["params", {"list": [0, 300, 70000]}]
        ]}]}]
    ]});
    same(&back, &want, "round trip");
    let Ok(python) = std::env::var("NIBBLE_PYTHON") else {
        eprintln!("skipped torch's half: NIBBLE_PYTHON is not set (run `cargo xtask setup`)");
        return;
    };
    let script = format!(
        "import json, sys, torch\nsys.path.insert(0, {:?})\nfrom golden_torch_save import plain\n\
         print(json.dumps(plain(torch.load(sys.argv[1], weights_only=True))))",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts")
    );
    let o = std::process::Command::new(python).args(["-c", &script]).arg(&path).output().unwrap();
    assert!(o.status.success(), "torch.load refused the file:\n{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Json = serde_json::from_slice(&o.stdout).unwrap();
    same(&theirs, &want, "torch.load");
    std::fs::remove_dir_all(&dir).unwrap();
}
