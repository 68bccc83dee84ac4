//! The `quant` command as a user runs it: quantize the tiny model's weights, dequantize them
//! back, deterministic output, bad input exiting 2 with nothing written, and bitsandbytes
//! reading the output file.

#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use quant::file;
use quant::state::QuantState;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama/model.safetensors")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nibble-quant-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch");
    d
}

fn quant(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quant")).args(args).output().expect("run quant")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn quantize_then_dequantize_the_tiny_model() {
    let dir = scratch("roundtrip");
    let (q, q2, d) = (dir.join("q.safetensors"), dir.join("q2.safetensors"), dir.join("d.safetensors"));
    let out = quant(&["quantize", s(&tiny()), s(&q), "--double-quant", "--compute-dtype", "bf16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        quant(&["quantize", s(&tiny()), s(&q2), "--double-quant", "--compute-dtype", "bf16"])
            .status
            .success()
    );
    assert_eq!(std::fs::read(&q).expect("q"), std::fs::read(&q2).expect("q2"), "deterministic bytes");

    let (orig, _) = file::read(&tiny()).expect("tiny");
    let (quantized, meta) = file::read(&q).expect("quantized");
    assert_eq!(meta.get("bnb_4bit_compute_dtype").map(String::as_str), Some("bfloat16"));
    let find = |v: &[quant::state::RawTensor], n: &str| v.iter().find(|t| t.name == n).cloned();
    // Embeddings, norms and the head are copied unchanged.
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        assert_eq!(find(&quantized, name), find(&orig, name), "{name}");
    }
    // Each linear has bitsandbytes' state, and it matches the codec on the original weights.
    let prefix = "model.layers.0.mlp.down_proj";
    let state = QuantState::from_tensors(prefix, &quantized).expect("state");
    assert_eq!(state.shape, vec![64, 160]);
    let w = find(&orig, "model.layers.0.mlp.down_proj.weight").expect("orig");
    let values: Vec<f32> =
        w.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let want =
        QuantState::quantize(&values, &[64, 160], "float32", quant::QuantType::Nf4, 64, true).expect("q");
    assert_eq!(state, want);
    let linears = quantized.iter().filter(|t| t.name.ends_with(".quant_state.bitsandbytes__nf4")).count();
    assert_eq!(linears, 14, "7 linears x 2 layers");

    let out = quant(&["dequantize", s(&q), s(&d)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (deq, meta) = file::read(&d).expect("dequantized");
    assert!(!meta.contains_key("bnb_4bit_compute_dtype"));
    let back = find(&deq, "model.layers.0.mlp.down_proj.weight").expect("weight");
    let expect: Vec<u8> = want.dequantize().expect("deq").iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!((back.dtype.as_str(), back.shape.clone(), back.data), ("F32", vec![64, 160], expect));
    assert_eq!(deq.len(), orig.len(), "same tensor names back");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let dir = scratch("bad");
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a safetensors file at all").expect("junk");
    let truncated = dir.join("trunc.safetensors");
    let bytes = std::fs::read(tiny()).expect("tiny");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("truncated");
    let out = dir.join("out.safetensors");
    let model = tiny();
    let absent = dir.join("absent.safetensors");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["quantize", s(&junk), s(&out)], "junk.safetensors"),
        (vec!["quantize", s(&truncated), s(&out)], "trunc.safetensors"),
        (vec!["quantize", s(&model), s(&out), "--only", "model\\.norm\\.weight"], "model.norm.weight"),
        (vec!["quantize", s(&model), s(&out), "--blocksize", "48"], "blocksize 48"),
        (vec!["quantize", s(&model), s(&out), "--quant-type", "int4"], "int4"),
        (vec!["frobnicate", s(&model), s(&out)], "frobnicate"),
        (vec!["dequantize", s(&absent), s(&out)], "absent.safetensors"),
    ];
    for (args, names) in cases {
        let o = quant(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: `{names}` not in {stderr}");
        assert!(!out.exists(), "{args:?} left an output file");
    }
    let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("e").file_name()).collect();
    assert_eq!(left.len(), 2, "no temp files left: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--help` on stdout with exit 0 for the tool and each command, and the spellings `sft quantize`
/// takes (`--blocksize=128`, `--quant_type`).
#[test]
fn help_goes_to_stdout_and_flags_take_both_spellings() {
    for args in [&["--help"][..], &["quantize", "--help"], &["dequantize", "--help"], &["--version"]] {
        let o = quant(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(!o.stdout.is_empty() && o.stderr.is_empty(), "{args:?}: help belongs on stdout");
    }
    let none = quant(&[]);
    assert_eq!(none.status.code(), Some(2), "no command: the help, exit 2");
    let dir = scratch("spellings");
    let out = dir.join("q.safetensors");
    let o =
        quant(&["quantize", s(&tiny()), s(&out), "--blocksize=128", "--quant_type", "fp4", "--double_quant"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (tensors, _) = file::read(&out).expect("output");
    let state = QuantState::from_tensors("model.layers.0.mlp.down_proj", &tensors).expect("state");
    assert_eq!((state.blocksize, state.quant_type), (128, quant::QuantType::Fp4));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bitsandbytes_reads_the_cli_output() {
    let python = std::env::var("NIBBLE_PYTHON")
        .expect("NIBBLE_PYTHON is unset: run `cargo xtask setup` (it installs bitsandbytes and sets it)");
    let dir = scratch("bnb");
    let (q, r) = (dir.join("q.safetensors"), dir.join("bnb.safetensors"));
    let model = tiny();
    for extra in [&["--double-quant"][..], &["--quant-type", "fp4"][..]] {
        let mut args = vec!["quantize", s(&model), s(&q)];
        args.extend_from_slice(extra);
        assert!(quant(&args).status.success());
        // bitsandbytes' own loader and dequantizer on every quantized weight of the file.
        let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
from bitsandbytes.functional import QuantState, dequantize_4bit
sd = load_file(sys.argv[1])
out = {}
for key in sd:
    if ".weight.quant_state.bitsandbytes__" not in key:
        continue
    prefix = key.split(".weight.quant_state.")[0] + ".weight"
    qs = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    state = QuantState.from_dict(qs, device=torch.device("cpu"))
    out[prefix] = dequantize_4bit(sd[prefix], state).float().contiguous()
save_file(out, sys.argv[2])
"#;
        let o = Command::new(&python).args(["-c", script, s(&q), s(&r)]).output().expect("python");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (ours, _) = file::read(&q).expect("ours");
        let (theirs, _) = file::read(&r).expect("theirs");
        assert_eq!(theirs.len(), 14);
        for t in &theirs {
            let prefix = t.name.strip_suffix(".weight").expect("weight");
            let state = QuantState::from_tensors(prefix, &ours).expect("state");
            // Compare where bitsandbytes is right on every CPU (here not the rows of 160).
            if !common::bnb_native_dequantize_is_exact(state.shape[1], state.blocksize) {
                continue;
            }
            let want: Vec<u8> =
                state.dequantize().expect("deq").iter().flat_map(|v| v.to_le_bytes()).collect();
            // As values (+0 = -0): bitsandbytes' FP4 zero has the other sign on its AVX-512 kernel.
            if let Some(diff) = common::first_value_difference(&t.data, &want) {
                panic!("{} ({extra:?}): {diff}", t.name);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
