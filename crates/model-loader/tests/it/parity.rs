//! Logits of nibble's model code against transformers' on small random models of each family
//! (goldens made by `scripts/golden_models.py`), plus the packing and padding invariants the
//! training loop relies on.
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests")]

use std::path::{Path, PathBuf};

use model_loader::{CausalLm, Error, LoadOptions, Prequantized};
use quant::QuantType;
use quant::linear::{Int8Matmul, Int8Options};
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
    for name in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe"] {
        let dir = golden(name);
        let model = load(&dir, LoadOptions::default());
        let (ids, pos, want) = expected(&dir);
        let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
        assert_eq!(got.size(), want.size(), "{name}: logits shape");
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-5, "{name}: logits differ from transformers by {err:e} (relative to max)");
    }
}

/// A tensor of a golden's expected.safetensors by key.
fn expected_key(dir: &Path, key: &str) -> Tensor {
    let t = Tensor::read_safetensors(dir.join("expected.safetensors")).expect("expected.safetensors");
    t.into_iter().find(|(n, _)| n == key).map(|(_, v)| v).unwrap_or_else(|| panic!("{key}"))
}

const NF4: QuantizeOptions =
    QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true };

/// The families past Llama's layout.
const NEWER: [&str; 5] = ["gemma2", "gemma3", "phi3", "mixtral", "qwen3moe"];

/// Gemma 2 and 3, Phi-3 and the mixtures of experts quantized while loading give transformers'
/// fp32 forward on bitsandbytes' codes dequantized (so the codes are bitsandbytes' and the rest of
/// the 4-bit forward is the fp32 one); every expert's linears are 4-bit in nibble, where
/// transformers + bitsandbytes leave them in full precision, so the golden rounds them through
/// bitsandbytes' own NF4 quantizer.
#[test]
fn newer_families_4bit_forward_matches_transformers_on_dequantized_codes() {
    for name in NEWER {
        let dir = golden(name);
        let model = load(&dir, LoadOptions { quantize: Some(NF4), ..LoadOptions::default() });
        let (ids, pos, fp32) = expected(&dir);
        let want = expected_key(&dir, "logits_4bit");
        let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-4, "{name}: 4-bit logits differ from the dequantized fp32 forward by {err:e}");
        assert!(max_rel_err(&got, &fp32) > 1e-3, "{name}: 4-bit logits equal the fp32 ones");
    }
}

/// 20 greedy tokens through the KV cache (sliding and global layers, soft-capped logits, LongRoPE
/// switching to its long factors mid-generation) are transformers' own.
#[test]
fn newer_families_greedy_generation_matches_transformers() {
    for name in NEWER {
        let dir = golden(name);
        let model = load(&dir, LoadOptions::default());
        let prompt = Vec::<i64>::try_from(expected_key(&dir, "greedy_prompt").reshape([-1])).unwrap();
        let want = Vec::<i64>::try_from(expected_key(&dir, "greedy_tokens").reshape([-1])).unwrap();
        let sampling = model_loader::Sampling { max_new_tokens: 20, ..Default::default() };
        let got = model.generate(&prompt, &sampling).unwrap().tokens;
        assert_eq!(got, want, "{name}: greedy tokens differ from transformers'");
        // The uncached path agrees, except under LongRoPE: recomputing the whole sequence turns
        // every position with the long factors once it is past the pretraining length, where
        // the cache kept the earlier keys as turned by the short ones (transformers alike).
        if name != "phi3" {
            assert_eq!(model.generate_greedy(&prompt, 20, &[]).unwrap(), want, "{name}: uncached greedy");
        }
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

/// A Mixtral as transformers + bitsandbytes save it in 4 bits: attention packed, experts in float
/// (bitsandbytes leaves 3-D parameters alone). nibble quantizes those experts while loading with
/// the checkpoint's own settings, so the model is the one it makes quantizing the fp32 golden.
#[test]
fn a_transformers_saved_4bit_mixture_quantizes_its_float_experts() {
    let dir = golden("mixtral-4bit-saved");
    let model = load(&dir, LoadOptions::default());
    assert!(model.config().prequantized);
    assert_eq!(model.config().bnb_4bit, Some(NF4));
    let on_load = load(&golden("mixtral"), LoadOptions { quantize: Some(NF4), ..LoadOptions::default() });
    let (ids, pos, _) = expected(&golden("mixtral"));
    let (a, b) = tch::no_grad(|| {
        (model.forward(&ids, Some(&pos), None).unwrap(), on_load.forward(&ids, Some(&pos), None).unwrap())
    });
    assert!(
        a.equal(&b),
        "the saved 4-bit Mixtral differs from quantizing the fp32 one: {:e}",
        max_rel_err(&a, &b)
    );
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

/// Logits of one golden's `key` and nibble's for the same input.
fn int8_logits(model: &CausalLm, key: &str) -> (Tensor, Tensor) {
    let t = Tensor::read_safetensors(golden("llama-int8-saved").join("expected.safetensors")).unwrap();
    let get = |k: &str| t.iter().find(|(n, _)| n == k).map(|(_, v)| v.shallow_clone()).expect(k);
    let got = tch::no_grad(|| model.forward(&get("input_ids"), Some(&get("position_ids")), None)).unwrap();
    (got, get(key))
}

/// Tolerance of 8-bit logits against bitsandbytes' with the same product scale, relative to the
/// largest logit. On the machine that made the goldens they are bit-identical (the same codes,
/// int32 products and outlier columns, and the same ATen ops after them); elsewhere the fp32
/// noise of the rest of the model (the 1e-5 of the fp32 parity) can push an activation across a
/// rounding boundary of its int8 code, and each such flip moves these logits by about 1e-5.
const INT8_TOL: f64 = 5e-5;

/// LLM.int8 while loading, against transformers + bitsandbytes (`load_in_8bit=True`, eval mode,
/// CPU) on a Llama with outlier features: within [`INT8_TOL`] of bitsandbytes' logits with its
/// int8 product scaled by the CUDA kernel's constant (the one nibble uses), and within 3e-4 of
/// its own CPU logits, whose int8 products are 1.8e-5 larger (9.3e-5 measured: the scale itself
/// and the code flips it causes downstream).
#[test]
fn int8_quantized_while_loading_matches_bitsandbytes() {
    let opts = LoadOptions { quantize_8bit: Some(Int8Options::default()), ..LoadOptions::default() };
    let model = load(&golden("llama-int8"), opts);
    let (got, kernel_scale) = int8_logits(&model, "logits_kernel_scale");
    let err = max_rel_err(&got, &kernel_scale);
    assert!(err < INT8_TOL, "8-bit logits differ from bitsandbytes (kernel scale) by {err:e}");
    let (_, bnb_cpu) = int8_logits(&model, "logits");
    let err_cpu = max_rel_err(&got, &bnb_cpu);
    // Quantization happened: the fp32 model's logits are far away.
    let (_, _, fp32) = expected(&golden("llama-int8"));
    let err_fp32 = max_rel_err(&got, &fp32);
    println!("int8 logits vs bnb: {err:.2e} (kernel scale), {err_cpu:.2e} (bnb CPU); vs fp32 {err_fp32:.2e}");
    assert!(err_cpu < 3e-4, "8-bit logits differ from bitsandbytes' CPU output by {err_cpu:e}");
    assert!(err_fp32 > 20.0 * INT8_TOL, "8-bit logits are as close to the fp32 ones: {err_fp32:e}");
}

/// bitsandbytes' CPU training path (dequantize, then a plain linear) as nibble's
/// `Int8Matmul::Dequantized`: the same arithmetic, so fp32 parity.
#[test]
fn int8_dequantized_path_matches_bitsandbytes_training_mode() {
    let matmul = Int8Matmul::Dequantized;
    let opts = LoadOptions {
        quantize_8bit: Some(Int8Options { matmul, ..Int8Options::default() }),
        ..LoadOptions::default()
    };
    let model = load(&golden("llama-int8"), opts);
    let (got, want) = int8_logits(&model, "logits_train");
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-5, "dequantized 8-bit logits differ from bitsandbytes' train mode by {err:e}");
}

#[test]
fn prequantized_int8_checkpoint_loads_without_requantizing() {
    let dir = golden("llama-int8-saved");
    let model = load(&dir, LoadOptions::default());
    assert_eq!(model.config().quantization, Some(Prequantized::EightBit { threshold: 6.0 }));
    let (got, want) = int8_logits(&model, "logits_kernel_scale");
    let err = max_rel_err(&got, &want);
    assert!(err < INT8_TOL, "pre-quantized 8-bit logits differ from bitsandbytes by {err:e}");
    // The same int8 weights as quantizing the fp32 checkpoint while loading.
    let opts = LoadOptions { quantize_8bit: Some(Int8Options::default()), ..LoadOptions::default() };
    let (on_load, _) = int8_logits(&load(&golden("llama-int8"), opts), "logits");
    assert!(got.equal(&on_load), "pre-quantized and quantized-while-loading models differ");
    // 4-bit and 8-bit together is refused.
    let both = LoadOptions {
        quantize: Some(QuantizeOptions::default()),
        quantize_8bit: Some(Int8Options::default()),
        ..LoadOptions::default()
    };
    let r = CausalLm::load(&golden("llama"), &both, &mut |_, _| {});
    assert!(matches!(r, Err(Error::BadOption(_))), "{r:?}");
}

/// A copy of the saved 8-bit golden with its tensors (and config.json text) changed by `edit`.
fn corrupt_int8(tag: &str, edit: &dyn Fn(&mut Vec<quant::state::RawTensor>, &mut String)) -> PathBuf {
    let src = golden("llama-int8-saved");
    let dir = std::env::temp_dir().join(format!("nibble-int8-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut tensors, meta) = quant::file::read(&src.join("model.safetensors")).unwrap();
    let mut config = std::fs::read_to_string(src.join("config.json")).unwrap();
    edit(&mut tensors, &mut config);
    quant::file::write(&dir.join("model.safetensors"), &tensors, &meta).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

#[test]
fn malformed_int8_checkpoints_are_errors_naming_the_tensor() {
    let load_err = |dir: &Path| CausalLm::load(dir, &LoadOptions::default(), &mut |_, _| {}).unwrap_err();
    let dir = corrupt_int8("scb", &|t, _| t.retain(|t| t.name != "model.layers.1.mlp.up_proj.SCB"));
    let e = load_err(&dir);
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.SCB"), "{e}");
    let dir = corrupt_int8("format", &|t, _| {
        let f = t.iter_mut().find(|t| t.name == "model.layers.0.self_attn.q_proj.weight_format").unwrap();
        f.data = vec![2];
    });
    let e = load_err(&dir);
    assert!(
        matches!(&e, Error::Quant { source: quant::Error::MalformedState { key, .. }, .. } if key.ends_with("q_proj.weight_format")),
        "{e}"
    );
    let dir = corrupt_int8("shape", &|t, _| {
        let w = t.iter_mut().find(|t| t.name == "model.layers.0.mlp.down_proj.weight").unwrap();
        w.shape = vec![w.shape[1], w.shape[0]];
    });
    let e = load_err(&dir);
    assert!(
        matches!(&e, Error::TensorMismatch { name, .. } if name == "model.layers.0.mlp.down_proj.weight"),
        "{e}"
    );
    let dir = corrupt_int8("fp16", &|_, c| {
        *c = c.replace("\"llm_int8_has_fp16_weight\": false", "\"llm_int8_has_fp16_weight\": true")
    });
    let e = load_err(&dir);
    assert!(
        matches!(&e, Error::BadConfig { message, .. } if message.contains("llm_int8_has_fp16_weight")),
        "{e}"
    );
    for tag in ["scb", "format", "shape", "fp16"] {
        std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("nibble-int8-{tag}-{}", std::process::id())),
        )
        .unwrap();
    }
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

/// Layers that skip a batch's padding (`context_skipping_padding`: linears, norms and MLPs on
/// the real tokens, attention on the padded grid) give every real token the padded layout's
/// hidden state and its embedding the same gradient, in every family (Gemma 2's eager
/// attention, Phi-3's fused projection, the mixtures' experts, Mistral's window included), and
/// zeros at padding.
#[test]
fn skipping_padding_changes_nothing_for_real_tokens() {
    for name in ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3moe"] {
        let model = load(&golden(name), LoadOptions::default());
        let (rows, cols) = (3i64, 9i64);
        let lens = [9i64, 4, 6];
        let ids = Tensor::from_slice(&(0..rows * cols).map(|i| 3 + (i * 7) % 50).collect::<Vec<_>>())
            .view([rows, cols]);
        let seg: Vec<i64> =
            lens.iter().flat_map(|&l| (0..cols).map(move |c| if c < l { 0 } else { -1 })).collect();
        let seg = Tensor::from_slice(&seg).view([rows, cols]);
        let pos = Tensor::arange(cols, (Kind::Int64, tch::Device::Cpu)).expand([rows, cols], false);
        let real = seg.ge(0).unsqueeze(-1);
        let run = |skip: bool| {
            let ctx = if skip {
                model.context_skipping_padding(&pos, Some(&seg)).unwrap()
            } else {
                model.context(&pos, Some(&seg)).unwrap()
            };
            let e = model.embed(&ids).unwrap().detach().set_requires_grad(true);
            let mut h = ctx.pack(&e).unwrap();
            let tokens = if skip { lens.iter().sum::<i64>() } else { cols };
            assert_eq!(h.size()[..2], [if skip { 1 } else { rows }, tokens], "{name}: the layers' layout");
            for i in 0..model.num_layers() {
                h = model.layer(i, &h, &ctx).unwrap();
            }
            let h = ctx.unpack(&h).unwrap();
            // A loss on real tokens only, as training's.
            let w = Tensor::arange(h.size()[2], (Kind::Float, tch::Device::Cpu)).sin();
            (&h * &w * &real).sum(Kind::Float).backward();
            (h.detach(), e.grad())
        };
        let (padded, padded_grad) = run(false);
        let (skipped, skipped_grad) = run(true);
        let err = max_rel_err(&(&skipped * &real), &(&padded * &real));
        assert!(err < 1e-5, "{name}: real tokens' hidden states differ by {err:e}");
        let err = max_rel_err(&skipped_grad, &padded_grad);
        assert!(err < 1e-5, "{name}: embeddings' gradients differ by {err:e}");
        let at_padding = (&skipped * real.logical_not()).abs().max().double_value(&[]);
        assert_eq!(at_padding, 0.0, "{name}: padding must come back as zeros");
        // The whole-model entry point agrees.
        let ctx = model.context_skipping_padding(&pos, Some(&seg)).unwrap();
        let h = tch::no_grad(|| model.hidden_states_in(&ctx, &ids, &mut |_| Ok(()))).unwrap();
        assert!(max_rel_err(&(&h * &real), &(&padded * &real)) < 1e-5, "{name}: hidden_states_in");
    }
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

/// Phi-3's LongRoPE within the pretraining length takes the short factors, and the long ones
/// past it (the 12-position golden), as transformers picks them per forward.
#[test]
fn phi3_longrope_picks_its_factors_by_length() {
    let dir = golden("phi3");
    let model = load(&dir, LoadOptions::default());
    let (ids, pos, long) = expected(&dir);
    let want = expected_key(&dir, "logits_short");
    let got = tch::no_grad(|| model.forward(&ids.narrow(1, 0, 6), Some(&pos.narrow(1, 0, 6)), None)).unwrap();
    let err = max_rel_err(&got, &want);
    assert!(err < 1e-5, "phi3 short-factor logits differ from transformers by {err:e}");
    // The same six positions inside the longer batch were turned by the long factors.
    assert!(max_rel_err(&long.narrow(1, 0, 6), &want) > 1e-3, "the factors make no difference");
}

#[test]
fn newer_families_parameter_count_and_linears_follow_the_checkpoint() {
    for name in NEWER {
        let mut model = load(&golden(name), LoadOptions::default());
        // Tied head counted once, four norms per layer, Gemma 3's q/k norms.
        let ck = safetensors_numel(&golden(name).join("model.safetensors"));
        assert_eq!(model.num_parameters(), ck, "{name}");
        let layers = model.num_layers();
        // Phi-3's fused linears; a mixture offers its attention's (experts are not targets).
        let per_layer = if matches!(name, "phi3" | "mixtral" | "qwen3moe") { 4 } else { 7 };
        assert_eq!(model.linears_mut().len(), per_layer * layers, "{name}");
    }
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

/// The bf16-saved Gemma copies, computed in bf16, against transformers' bf16 forward of them
/// (the golden host has native bf16 GEMMs): equal there; where nibble runs 16-bit products in f32
/// (`cpu_matmul: auto` without native bf16, or `f32`) Gemma 3's attention rounds differently,
/// 1.3e-2 of the largest logit measured, against 1.7e-2 between transformers' bf16 and fp32.
#[test]
fn newer_families_bf16_checkpoints_follow_transformers_bf16_forward() {
    for name in NEWER {
        let dir = golden(name);
        let opts =
            LoadOptions { dtype: Kind::BFloat16, compute_dtype: Kind::BFloat16, ..LoadOptions::default() };
        let model = load(&golden(&format!("{name}-bf16")), opts);
        let (ids, pos, fp32) = expected(&dir);
        let want = expected_key(&dir, "logits_bf16");
        let got = tch::no_grad(|| model.forward(&ids, Some(&pos), None)).unwrap();
        assert_eq!(got.kind(), Kind::BFloat16);
        let got = got.to_kind(Kind::Float);
        let (err, err_fp32) = (max_rel_err(&got, &want), max_rel_err(&want, &fp32));
        println!(
            "{name}: bf16 logits vs transformers' bf16 {err:.2e}; transformers' bf16 vs fp32 {err_fp32:.2e}"
        );
        assert!(err < 2e-2, "{name}: bf16 logits differ from transformers' bf16 ones by {err:e}");
    }
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

#[test]
fn kv_cached_generation_equals_recomputing() {
    // Mistral's window (5) is shorter than prompt + new tokens, so the cache must apply it too.
    for name in ["mistral", "qwen3", "llama"] {
        let model = load(&golden(name), LoadOptions::default());
        let prompt = [5i64, 9, 14, 30, 2, 41];
        let s = model_loader::Sampling { max_new_tokens: 8, ..Default::default() };
        let cached = model.generate(&prompt, &s).unwrap();
        assert_eq!(cached.tokens, model.generate_greedy(&prompt, 8, &[]).unwrap(), "{name}");
        let x = Tensor::from_slice(&prompt).view([1, 6]);
        let full = tch::no_grad(|| model.forward(&x, None, None)).unwrap().get(0);
        assert!(max_rel_err(&cached.prompt_logits, &full) < 1e-6, "{name}: prompt logits");
    }
}

#[test]
fn sampling_is_seeded_and_top_p_narrows_it() {
    let model = load(&golden("qwen2"), LoadOptions::default());
    let prompt = [5i64, 9, 14];
    let s = model_loader::Sampling {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        seed: 3,
        stop_ids: vec![],
    };
    let a = model.generate(&prompt, &s).unwrap().tokens;
    let b = model.generate(&prompt, &s).unwrap().tokens;
    assert_eq!(a, b, "same seed, same sample");
    let other = model.generate(&prompt, &model_loader::Sampling { seed: 4, ..s.clone() }).unwrap().tokens;
    assert_ne!(a, other, "another seed, another sample");
    // A tiny nucleus keeps only the most probable token: greedy.
    let narrow = model.generate(&prompt, &model_loader::Sampling { top_p: 1e-6, ..s }).unwrap().tokens;
    assert_eq!(narrow, model.generate_greedy(&prompt, 12, &[]).unwrap());
}

/// A placement (a device map applied) that keeps everything on the CPU gives the same logits as
/// the plain load; a layer whose weights would be stored away from where it computes is refused
/// for non-4-bit weights, naming the layer; a placement of the wrong length is refused.
#[test]
fn placements_apply_and_bad_ones_are_errors() {
    use model_loader::{LayerPlacement, Placement};
    let dir = golden("llama");
    let (ids, pos, want) = expected(&dir);
    let layers = load(&dir, LoadOptions::default()).num_layers();
    let plan = device_map::Plan {
        placements: std::iter::once(("model.embed_tokens".to_owned(), device_map::Device::Cpu))
            .chain((0..layers).map(|i| (format!("model.layers.{i}"), device_map::Device::Cpu)))
            .chain([
                ("model.norm".to_owned(), device_map::Device::Cpu),
                ("lm_head".to_owned(), device_map::Device::Cpu),
            ])
            .collect(),
    };
    let placement = Placement::from_plan(&plan, layers, 0, true).unwrap();
    let placed = load(&dir, LoadOptions { placement: Some(placement.clone()), ..LoadOptions::default() });
    assert_eq!(placed.placement(), &placement);
    let got = tch::no_grad(|| placed.forward(&ids, Some(&pos), None)).unwrap();
    assert!(max_rel_err(&got, &want) < 1e-5);

    let refused = |p: Placement| {
        let opts = LoadOptions { placement: Some(p), ..LoadOptions::default() };
        CausalLm::load(&dir, &opts, &mut |_, _| {}).unwrap_err().to_string()
    };
    let mut split = placement.clone();
    split.layers[1] = LayerPlacement { weights: tch::Device::Cuda(0), compute: tch::Device::Cpu };
    let e = refused(split);
    assert!(e.contains("model.layers.1.self_attn.q_proj") && e.contains("only 4-bit"), "{e}");

    let mut short = placement;
    short.layers.pop();
    let e = refused(short);
    assert!(e.contains(&format!("covers {} decoder layers", layers - 1)), "{e}");
}
