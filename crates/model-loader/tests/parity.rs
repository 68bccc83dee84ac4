//! Logits of nibble's model code against transformers' on small random models of each family
//! (goldens made by `scripts/golden_models.py`), plus the packing and padding invariants the
//! training loop relies on.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::path::{Path, PathBuf};

use model_loader::{CausalLm, LoadOptions};
use quant::QuantType;
use quant::ops::QuantizeOptions;
use tch::{Kind, Tensor};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

fn expected(dir: &Path) -> (Tensor, Tensor, Tensor) {
    let t = Tensor::read_safetensors(dir.join("expected.safetensors")).expect("expected.safetensors");
    let get = |k: &str| t.iter().find(|(n, _)| n == k).map(|(_, v)| v.shallow_clone()).expect(k);
    (get("input_ids"), get("position_ids"), get("logits"))
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[]).max(1e-12)
}

fn load(dir: &Path, opts: LoadOptions) -> CausalLm {
    CausalLm::load(dir, &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[test]
fn every_family_matches_transformers_in_fp32() {
    for name in ["llama", "mistral", "qwen2", "qwen3"] {
        let dir = golden(name);
        let model = load(&dir, LoadOptions::default());
        let (ids, pos, want) = expected(&dir);
        let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
        assert_eq!(got.size(), want.size(), "{name}: logits shape");
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-5, "{name}: logits differ from transformers by {err:e} (relative to max)");
    }
}

#[test]
fn quantized_while_loading_matches_bitsandbytes() {
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }),
        ..LoadOptions::default()
    };
    let model = load(&golden("llama"), opts);
    let (ids, pos, want) = expected(&golden("llama-4bit-saved"));
    let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-5, "4-bit logits differ from transformers + bitsandbytes by {err:e}");
    // And quantization really happened: the full-precision model gives different logits.
    let (_, _, fp32) = expected(&golden("llama"));
    assert!(max_rel_err(&got, &fp32) > 1e-3, "4-bit logits equal the fp32 ones");
}

#[test]
fn prequantized_checkpoint_loads_without_requantizing() {
    let dir = golden("llama-4bit-saved");
    let model = load(&dir, LoadOptions::default());
    assert!(model.config().prequantized);
    let (ids, pos, want) = expected(&dir);
    let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-5, "pre-quantized logits differ from transformers by {err:e}");
}

#[test]
fn packed_sequences_do_not_see_each_other() {
    let model = load(&golden("llama"), LoadOptions::default());
    let a = Tensor::from_slice(&[5i64, 9, 14, 3, 77, 20]).view([1, 6]);
    let b = Tensor::from_slice(&[40i64, 41, 8, 60]).view([1, 4]);
    let packed = Tensor::cat(&[&a, &b], 1);
    let pos = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 5, 0, 1, 2, 3]).view([1, 10]);
    let seg = Tensor::from_slice(&[0i64, 0, 0, 0, 0, 0, 1, 1, 1, 1]).view([1, 10]);
    tch::no_grad(|| {
        let together = model.forward(&packed, Some(&pos), Some(&seg)).unwrap();
        let alone_a = model.forward(&a, None, None).unwrap();
        let alone_b = model.forward(&b, None, None).unwrap();
        let err_a = max_rel_err(&together.narrow(1, 0, 6), &alone_a);
        let err_b = max_rel_err(&together.narrow(1, 6, 4), &alone_b);
        assert!(err_a < 1e-5 && err_b < 1e-5, "packed logits differ: {err_a:e} {err_b:e}");
        // Without segment ids the second sequence attends to the first and changes.
        let leaky = model.forward(&packed, Some(&pos), None).unwrap();
        assert!(max_rel_err(&leaky.narrow(1, 6, 4), &alone_b) > 1e-4);
    });
}

#[test]
fn sliding_window_limits_attention() {
    // Mistral's window is 5: with 12 tokens, the last position ignores the first ones.
    let model = load(&golden("mistral"), LoadOptions::default());
    let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]).view([1, 12]);
    let changed = ids.copy();
    let _ = changed.narrow(1, 0, 2).fill_(50);
    tch::no_grad(|| {
        let x = model.forward(&ids, None, None).unwrap();
        let y = model.forward(&changed, None, None).unwrap();
        // Two layers of window 5 see at most 8 positions back: position 11 sees 3.., not 0 or 1.
        assert!(max_rel_err(&x.narrow(1, 11, 1), &y.narrow(1, 11, 1)) < 1e-6);
        assert!(max_rel_err(&x.narrow(1, 2, 1), &y.narrow(1, 2, 1)) > 1e-4);
    });
}

#[test]
fn linears_are_offered_by_transformers_name() {
    let mut model = load(&golden("qwen3"), LoadOptions::default());
    let names: Vec<String> = model.linears_mut().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 14);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
    assert_eq!(names[13], "model.layers.1.mlp.down_proj");
    // Parameter count as PEFT would report it for the unquantized model.
    let ck = safetensors_numel(&golden("qwen3").join("model.safetensors"));
    assert_eq!(model.num_parameters(), ck);
}

fn safetensors_numel(path: &Path) -> u64 {
    let t = Tensor::read_safetensors(path).unwrap();
    t.iter().map(|(_, v)| v.numel() as u64).sum()
}

#[test]
fn bf16_model_stays_close() {
    let dir = golden("qwen2");
    let opts = LoadOptions { dtype: Kind::BFloat16, compute_dtype: Kind::BFloat16, ..LoadOptions::default() };
    let model = load(&dir, opts);
    let (ids, pos, want) = expected(&dir);
    let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    let err = max_rel_err(&got.to_kind(Kind::Float), &want);
    assert!(err < 5e-2, "bf16 logits off by {err:e}");
}

#[test]
fn greedy_generation_follows_the_argmax_and_stops() {
    let model = load(&golden("qwen2"), LoadOptions::default());
    let prompt = [5i64, 9, 14];
    let out = model.generate_greedy(&prompt, 6, &[]).unwrap();
    assert_eq!(out.len(), 6);
    // Each token is the argmax of the logits of the sequence so far.
    let mut ids = prompt.to_vec();
    for &t in &out {
        let x = Tensor::from_slice(&ids).view([1, ids.len() as i64]);
        let logits = tch::no_grad(|| model.forward(&x, None, None)).unwrap();
        assert_eq!(logits.get(0).get(ids.len() as i64 - 1).argmax(-1, false).int64_value(&[]), t);
        ids.push(t);
    }
    // A stop id ends it at its first occurrence, and is returned.
    let stop = out[out.len() - 1];
    let first = out.iter().position(|&t| t == stop).unwrap();
    let stopped = model.generate_greedy(&prompt, 6, &[stop]).unwrap();
    assert_eq!(stopped, out[..=first].to_vec());
    assert!(model.generate_greedy(&[], 3, &[]).is_err());
}
