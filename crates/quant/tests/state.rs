//! bitsandbytes' serialized layout: a property round trip (state -> tensors -> state), and live
//! interop with the pinned bitsandbytes both ways through real .safetensors files.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use quant::QuantType;
use quant::state::{Int8State, QuantState, RawTensor};

fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    quant::file::write(path, tensors, &BTreeMap::new()).expect("write safetensors");
}

fn read_safetensors(path: &Path) -> Vec<RawTensor> {
    quant::file::read(path).expect("read safetensors").0
}

fn python() -> String {
    std::env::var("NIBBLE_PYTHON").unwrap_or_else(|_| {
        panic!("NIBBLE_PYTHON is not set: run `cargo xtask setup` (it installs the pinned Python stack)")
    })
}

fn run_python(script: &str, args: &[&Path]) {
    let out = Command::new(python())
        .env("TORCHDYNAMO_DISABLE", "1")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run NIBBLE_PYTHON (run `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-state-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Deterministic pseudo-normal weights (no rand dependency).
fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            acc
        })
        .collect()
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// f32 values rounded to nearest even into the torch dtype, and back to f32 (exactly).
fn round_to(x: &[f32], dtype: &str) -> Vec<f32> {
    match dtype {
        "float32" => x.to_vec(),
        "float16" => x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
        "bfloat16" => x.iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect(),
        other => panic!("dtype {other}"),
    }
}

const BNB_DEQUANT: &str = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from bitsandbytes.functional import QuantState, dequantize_4bit
sd = load_file(sys.argv[1])
out = {}
for prefix in sorted({k[: k.index(".weight")] for k in sd}):
    qs = {k[len(prefix) + len(".weight."):]: v for k, v in sd.items() if k.startswith(prefix + ".weight.")}
    state = QuantState.from_dict(qs, device=torch.device("cpu"))
    out[prefix] = dequantize_4bit(sd[prefix + ".weight"], state).float().reshape(state.shape).contiguous()
save_file(out, sys.argv[2])
"#;

/// nibble quantizes and writes; bitsandbytes reads with `QuantState.from_dict` and dequantizes.
#[test]
fn bitsandbytes_reads_what_nibble_writes() {
    let dir = temp_dir("n2b");
    // Rows that bnb's native CPU dequantize handles exactly on every CPU (see
    // `common::bnb_native_dequantize_is_exact`).
    let cases = [
        ("m.nf4", QuantType::Nf4, 64, false, vec![24usize, 104]),
        ("m.nf4dq", QuantType::Nf4, 64, true, vec![80, 256]),
        ("m.fp4", QuantType::Fp4, 128, false, vec![10, 200]),
        ("m.fp4dq", QuantType::Fp4, 32, true, vec![40, 224]),
    ];
    let mut tensors = Vec::new();
    let mut states = HashMap::new();
    for (i, (prefix, qt, bs, dq, shape)) in cases.iter().enumerate() {
        assert!(common::bnb_native_dequantize_is_exact(shape[1], *bs), "{prefix}: pick another shape");
        let x = weights(shape.iter().product(), i as u64);
        let s = QuantState::quantize(&x, shape, "float32", *qt, *bs, *dq).expect("quantize");
        tensors.extend(s.to_tensors(prefix));
        states.insert(prefix.to_string(), s);
    }
    let (qfile, dfile) = (dir.join("q.safetensors"), dir.join("d.safetensors"));
    write_safetensors(&qfile, &tensors);
    run_python(BNB_DEQUANT, &[&qfile, &dfile]);
    let back: HashMap<String, RawTensor> =
        read_safetensors(&dfile).into_iter().map(|t| (t.name.clone(), t)).collect();
    for (prefix, s) in &states {
        let ours = f32_bytes(&s.dequantize().expect("dequantize"));
        let theirs = &back[prefix];
        assert_eq!(theirs.shape, s.shape, "{prefix}");
        // Values compared as the format defines them (+0 = -0): bitsandbytes' FP4 zero has the
        // other sign on its AVX-512 kernel.
        if let Some(diff) = common::first_value_difference(&theirs.data, &ours) {
            panic!("{prefix}: bnb vs nibble, {diff}");
        }
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

const BNB_QUANTIZE: &str = r#"
import sys, torch
from safetensors.torch import save_file
import bitsandbytes.functional as F
out = {}
cases = [("a", "nf4", 64, False, torch.float32, (16, 128)), ("b", "nf4", 64, True, torch.bfloat16, (64, 320)),
         ("c", "fp4", 256, False, torch.float16, (6, 300)), ("d", "fp4", 64, True, torch.float32, (33, 512))]
for i, (prefix, qt, bs, dq, dtype, shape) in enumerate(cases):
    g = torch.Generator().manual_seed(i)
    w = torch.randn(*shape, generator=g).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type=qt)
    out[prefix + ".weight"] = packed
    for k, v in state.as_dict(packed=True).items():
        out[prefix + ".weight." + k] = v
    out[prefix + ".dequantized"] = F.dequantize_4bit(packed, state).float().contiguous()
save_file(out, sys.argv[1])
"#;

/// bitsandbytes quantizes and saves its packed state dict; nibble reads and dequantizes it.
#[test]
fn nibble_reads_what_bitsandbytes_writes() {
    let dir = temp_dir("b2n");
    let file = dir.join("bnb.safetensors");
    run_python(BNB_QUANTIZE, &[&file]);
    let tensors = read_safetensors(&file);
    let by_name: HashMap<&str, &RawTensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for prefix in ["a", "b", "c", "d"] {
        let s = QuantState::from_tensors(prefix, &tensors).unwrap_or_else(|e| panic!("{prefix}: {e}"));
        let ours = f32_bytes(&round_to(&s.dequantize().expect("dequantize"), &s.dtype));
        let theirs = by_name[format!("{prefix}.dequantized").as_str()];
        if let Some(diff) = common::first_value_difference(&theirs.data, &ours) {
            panic!("{prefix}: bnb vs nibble, {diff}");
        }
        // Writing it back gives bitsandbytes' own bytes, JSON included.
        for t in s.to_tensors(prefix) {
            let orig = by_name[t.name.as_str()];
            assert_eq!((&t.dtype, &t.shape), (&orig.dtype, &orig.shape), "{}", t.name);
            assert!(t.data == orig.data, "{}: bytes differ", t.name);
        }
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

const BNB_INT8: &str = r#"
import sys, torch, logging
from safetensors.torch import load_file
import bitsandbytes as bnb
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
sd = load_file(sys.argv[1])
prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".SCB")})
assert len(prefixes) == 3, prefixes
for prefix in prefixes:
    w = sd[prefix + ".source"]
    m = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False)
    m.load_state_dict({"weight": w})
    m = m.to("cpu")  # Int8Params quantizes here
    ours = {k: sd[prefix + "." + k] for k in ("weight", "SCB", "weight_format")}
    theirs = m.state_dict()
    assert sorted(theirs) == sorted(ours), (prefix, sorted(theirs))
    for k, v in theirs.items():
        assert v.dtype == ours[k].dtype and v.shape == ours[k].shape, (prefix, k, v.dtype, v.shape, ours[k].dtype, ours[k].shape)
        assert torch.equal(v.view(torch.uint8), ours[k].view(torch.uint8)), (prefix, k)
    # And the module runs on what nibble wrote, loaded back into a quantized layer.
    m.load_state_dict(ours)
    m.eval()
    m(torch.randn(3, w.shape[1]))
"#;

/// nibble quantizes and writes 8-bit weights; bitsandbytes' `Linear8bitLt` quantizes the same
/// weights and its state dict (what transformers saves) is byte-identical, keys and dtypes too.
#[test]
fn bitsandbytes_saves_the_int8_bytes_nibble_writes() {
    let dir = temp_dir("int8");
    let mut tensors = Vec::new();
    for (i, shape) in [[24usize, 96], [7, 33], [64, 16]].iter().enumerate() {
        let prefix = format!("m.layers.{i}.proj");
        let mut x: Vec<f32> = weights(shape[0] * shape[1], 100 + i as u64).iter().map(|v| v * 0.1).collect();
        // A zero row and a large value, so row scales differ widely.
        x[..shape[1]].iter_mut().for_each(|v| *v = 0.0);
        x[shape[1] + 3] = 40.0;
        let s = Int8State::quantize(&x, *shape).expect("quantize");
        tensors.extend(s.to_tensors(&prefix));
        tensors.push(RawTensor {
            name: format!("{prefix}.source"),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            data: f32_bytes(&x),
        });
    }
    let file = dir.join("int8.safetensors");
    write_safetensors(&file, &tensors);
    run_python(BNB_INT8, &[&file]);
    std::fs::remove_dir_all(&dir).expect("clean up");
}

fn arb_state() -> impl Strategy<Value = QuantState> {
    (
        prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)],
        prop::sample::select(quant::codec::BLOCKSIZES.to_vec()),
        prop::sample::select(vec!["float32", "float16", "bfloat16"]),
        prop::collection::vec(1usize..40, 1..4),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(qt, bs, dtype, shape, dq, seed)| {
            let n = shape.iter().product();
            QuantState::quantize(&weights(n, seed), &shape, dtype, qt, bs, dq).expect("quantize")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn state_tensors_state_round_trip(s in arb_state()) {
        let tensors = s.to_tensors("model.layers.0.mlp.up_proj");
        let back = QuantState::from_tensors("model.layers.0.mlp.up_proj", &tensors).expect("read back");
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(back.to_tensors("model.layers.0.mlp.up_proj"), tensors);
    }
}
