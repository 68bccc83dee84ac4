//! The 4-bit linear layer against a dense layer on its dequantized weight: exact outputs and
//! input gradients; the 8-bit layer against bitsandbytes' `Linear8bitLt` (goldens made by
//! `scripts/golden_int8.py`) and against a dense layer (the memory measurement is in
//! `linear_memory.rs`).
#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests")]

use quant::Error;
use quant::QuantType;
use std::collections::BTreeMap;
use std::path::Path;

use quant::linear::{Dense, Int8Matmul, Int8Options, Linear, Linear4bit, Linear8bit};
use quant::ops::{QuantizeOptions, Quantized8bit};
use tch::{Kind, Tensor};

fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.kind(), b.kind(), "{what}: dtype");
    assert_eq!(a.size(), b.size(), "{what}: shape");
    // Compare bit patterns: `equal` would call -0.0 and 0.0 equal.
    let bits = |t: &Tensor| {
        let k = if t.kind() == Kind::Float { Kind::Int } else { Kind::Int16 };
        t.contiguous().view_dtype(k)
    };
    assert!(bits(a).equal(&bits(b)), "{what}: values differ");
}

#[test]
fn forward_and_input_gradient_equal_dense_on_the_dequantized_weight() {
    tch::manual_seed(7);
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for (bias, double_quant, quant_type, blocksize) in [
            (false, false, QuantType::Nf4, 64),
            (true, true, QuantType::Fp4, 32),
            (true, false, QuantType::Nf4, 128),
        ] {
            let what = format!("{kind:?} bias={bias} dq={double_quant} {quant_type:?} bs={blocksize}");
            let w = Tensor::randn([48, 96], (Kind::Float, tch::Device::Cpu)) * 0.1;
            let b =
                bias.then(|| Tensor::randn([48], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true));
            let opts = QuantizeOptions { quant_type, blocksize, double_quant };
            let layer = Linear4bit::quantize(&w, b.as_ref().map(Tensor::shallow_clone), opts, kind).unwrap();
            assert_eq!((layer.in_features(), layer.out_features()), (96, 48));

            let b2 = b.as_ref().map(|b| b.detach().set_requires_grad(true));
            let dense =
                Dense::new(layer.weight().dequantize(kind).unwrap(), b2.as_ref().map(|b| b.to_kind(kind)))
                    .unwrap();

            let x = Tensor::randn([3, 5, 96], (Kind::Float, tch::Device::Cpu));
            let g = Tensor::randn([3, 5, 48], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
            let x1 = x.detach().set_requires_grad(true);
            let x2 = x.detach().set_requires_grad(true);
            let y1 = layer.forward(&x1).unwrap();
            // Like bitsandbytes, the 4-bit layer returns the input's dtype.
            let y2 = dense.forward(&x2.to_kind(kind)).unwrap().to_kind(x.kind());
            assert_same(&y1, &y2, &format!("{what}: output"));
            (&y1 * &g).sum(Kind::Float).backward();
            (&y2 * &g).sum(Kind::Float).backward();
            assert_same(&x1.grad(), &x2.grad(), &format!("{what}: input gradient"));
            if let (Some(b), Some(b2)) = (&b, &b2) {
                assert_same(&b.grad(), &b2.grad(), &format!("{what}: bias gradient"));
            }
        }
    }
}

#[test]
fn layers_are_interchangeable_behind_the_trait() {
    let w = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu));
    let q = Linear4bit::quantize(&w, None, QuantizeOptions::default(), Kind::Float).unwrap();
    let d = Dense::new(q.weight().dequantize(Kind::Float).unwrap(), None).unwrap();
    let layers: Vec<Box<dyn Linear>> = vec![Box::new(q), Box::new(d)];
    let x = Tensor::randn([2, 16], (Kind::Float, tch::Device::Cpu));
    let ys: Vec<Tensor> = layers.iter().map(|l| l.forward(&x).unwrap()).collect();
    assert!(ys[0].equal(&ys[1]));
}

#[test]
fn bad_shapes_are_errors() {
    let w = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu));
    let layer = Linear4bit::quantize(&w, None, QuantizeOptions::default(), Kind::BFloat16).unwrap();
    let r = layer.forward(&Tensor::zeros([2, 15], (Kind::Float, tch::Device::Cpu)));
    assert!(matches!(r, Err(Error::BadTensor { what: "input", .. })), "{r:?}");
    let r = Linear4bit::quantize(&w.reshape([128]), None, QuantizeOptions::default(), Kind::Float);
    assert!(matches!(r, Err(Error::BadTensor { what: "weight", .. })), "{r:?}");
    let bias = Tensor::zeros([7], (Kind::Float, tch::Device::Cpu));
    let r = Linear4bit::quantize(&w, Some(bias), QuantizeOptions::default(), Kind::Float);
    assert!(matches!(r, Err(Error::BadTensor { what: "bias", .. })), "{r:?}");
    let r = Linear4bit::quantize(&w, None, QuantizeOptions::default(), Kind::Int);
    assert!(matches!(r, Err(Error::BadTensor { what: "compute dtype", .. })), "{r:?}");
}

/// The tensors of a golden file as libtorch tensors, and its metadata.
fn golden(path: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, String>) {
    let (raw, meta) = quant::file::read(path).unwrap();
    let tensors = raw
        .into_iter()
        .map(|t| {
            let kind = match t.dtype.as_str() {
                "F32" => Kind::Float,
                "F16" => Kind::Half,
                "BF16" => Kind::BFloat16,
                "I8" => Kind::Int8,
                "I64" => Kind::Int64,
                other => panic!("{}: dtype {other}", t.name),
            };
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            (t.name, Tensor::f_from_data_size(&t.data, &shape, kind).unwrap())
        })
        .collect();
    (tensors, meta)
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).abs().max().double_value(&[])
}

/// Whether libtorch's BLAS runs here the kernels it ran where a golden was made: the ATen CPU
/// capability `scripts/golden_bnb.py` records (`cpu_capability`) is this host's (MKL picks its
/// kernels by CPUID as ATen does), and MKL is not told to take others. `MKL_ENABLE_INSTRUCTIONS=
/// SSE4_2` gives other kernels, and so another kind of CPU's results, on any x86-64 host.
fn same_blas_kernels(golden_capability: &str) -> bool {
    let steered = ["MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"].iter().any(|v| std::env::var_os(v).is_some());
    !steered && golden_capability == host_cpu_capability()
}

/// The ATen CPU capability of this host, named as `torch.backends.cpu.get_cpu_capability()` does.
fn host_cpu_capability() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return "AVX512";
        }
        if has!("avx2") && has!("fma") {
            return "AVX2";
        }
    }
    "DEFAULT"
}

/// `got` against a golden `want` that came out of a float GEMM with inner dimension `k`, whose
/// element-wise bound `|a| @ |b|` is `scale`: bit for bit where the golden was made on this kind
/// of CPU (the same BLAS kernels, so any other cast or order is a bug), else within the
/// reordering error of a length-`k` f32 sum (MKL takes other kernels on an AVX-512 host; the
/// order of a BLAS sum is no contract) plus one rounding step of a 16-bit output.
fn assert_gemm_result(got: &Tensor, want: &Tensor, scale: &Tensor, k: i64, same_cpu: bool, what: &str) {
    if same_cpu {
        return assert_same(got, want, what);
    }
    assert_eq!((got.kind(), got.size()), (want.kind(), want.size()), "{what}: dtype and shape");
    let step16 = match want.kind() {
        Kind::BFloat16 => 2f64.powi(-7),
        Kind::Half => 2f64.powi(-10),
        _ => 0.0,
    };
    let (got, want) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let diff = (&got - &want).abs();
    let tol = scale * (2.0 * k as f64 * 2f64.powi(-24)) + got.abs().maximum(&want.abs()) * step16;
    let excess = (&diff - tol).max().double_value(&[]);
    println!("{what}: max |nibble - golden| = {:.2e} (golden made on another kind of CPU)", max_abs(&diff));
    assert!(excess <= 0.0, "{what}: beyond the GEMM's reordering bound by {excess:e}");
}

/// bitsandbytes' `Linear8bitLt(has_fp16_weights=False)` on the CPU, output and input gradient:
/// eval mode (LLM.int8) bit for bit once its product scale is the kernel's, and within the
/// 1.8e-5 that its torch backend's constant adds; train mode (dequantize + linear) bit for bit.
/// Results of float GEMMs are bit for bit on the kind of CPU the goldens were made on (their
/// `cpu_capability`), within the GEMM's reordering bound on another (`assert_gemm_result`).
#[test]
fn linear8bit_matches_bitsandbytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/int8");
    let mut cases = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let (t, meta) = golden(&path);
        if meta["kind"] != "int8_linear" {
            continue;
        }
        cases += 1;
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let threshold: f32 = meta["threshold"].parse().unwrap();
        let same_cpu = same_blas_kernels(&meta["cpu_capability"]);
        // The weight as bitsandbytes' Int8Params quantized it.
        let q = Quantized8bit::quantize(&t["weight"]).unwrap();
        assert!(q.codes.equal(&t["codes"]) && q.scb.equal(&t["scb"]), "{name}: weight quantization");
        let x = &t["x"];
        let g = &t["grad_y"];
        // Element-wise bounds of the two GEMMs, |x| @ |W|^T and |g| @ |W|, on the dequantized weight.
        let w =
            (t["codes"].to_kind(Kind::Double) * t["scb"].to_kind(Kind::Double).unsqueeze(1) / 127.0).abs();
        let k = x.size()[x.dim() - 1];
        let y_scale = x.to_kind(Kind::Double).abs().matmul(&w.tr());
        let g_scale = g.to_kind(Kind::Double).abs().matmul(&w);
        for (matmul, y_want, grad_want) in [
            (Int8Matmul::Decomposed, "y_eval_kernel_scale", "grad_x_eval"),
            (Int8Matmul::Dequantized, "y_train", "grad_x_train"),
        ] {
            let what = format!("{name} {matmul:?}");
            let q = Quantized8bit { codes: t["codes"].shallow_clone(), scb: t["scb"].shallow_clone() };
            let layer =
                Linear8bit::new(q, Some(t["bias"].shallow_clone()), Int8Options { threshold, matmul })
                    .unwrap();
            let xi = x.detach().set_requires_grad(true);
            let y = layer.forward(&xi).unwrap();
            assert_gemm_result(&y, &t[y_want], &y_scale, k, same_cpu, &format!("{what}: output"));
            (&y * g).sum(Kind::Float).backward();
            let out_features = w.size()[0];
            assert_gemm_result(
                &xi.grad(),
                &t[grad_want],
                &g_scale,
                out_features,
                same_cpu,
                &format!("{what}: input gradient"),
            );
            if matmul == Int8Matmul::Decomposed {
                // bitsandbytes' own CPU output: its int8 part 1.8e-5 larger, which may also move
                // a 16-bit output by one ulp.
                let diff = max_abs(&(y.to_kind(Kind::Double) - t["y_eval"].to_kind(Kind::Double)));
                let rel = diff / max_abs(&t["y_eval"]);
                let ulp = match x.kind() {
                    Kind::BFloat16 => 2f64.powi(-7),
                    Kind::Half => 2f64.powi(-10),
                    _ => 0.0,
                };
                println!("{what}: max |nibble - bnb CPU| = {rel:.2e} of max |y|");
                assert!(rel <= 2.5e-5 + ulp, "{what}: {rel:e}");
            }
        }
    }
    assert_eq!(cases, 4, "int8_linear goldens (regenerate with scripts/golden_int8.py)");
}

#[test]
fn linear8bit_dequantized_path_equals_dense_and_grads_only_the_input() {
    tch::manual_seed(3);
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        let w = Tensor::randn([24, 40], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let b = Tensor::randn([24], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let opts = Int8Options { threshold: 6.0, matmul: Int8Matmul::Dequantized };
        let layer = Linear8bit::quantize(&w, Some(b.shallow_clone()), opts).unwrap();
        assert_eq!((layer.in_features(), layer.out_features()), (40, 24));
        let b2 = b.detach().set_requires_grad(true);
        let dense = Dense::new(layer.weight().dequantize(kind).unwrap(), Some(b2.to_kind(kind))).unwrap();
        let x = Tensor::randn([3, 5, 40], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
        let g = Tensor::randn([3, 5, 24], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
        let (x1, x2) = (x.detach().set_requires_grad(true), x.detach().set_requires_grad(true));
        let y1 = layer.forward(&x1).unwrap();
        let y2 = dense.forward(&x2).unwrap();
        assert_same(&y1, &y2, &format!("{kind:?}: output"));
        (&y1 * &g).sum(Kind::Float).backward();
        (&y2 * &g).sum(Kind::Float).backward();
        assert_same(&x1.grad(), &x2.grad(), &format!("{kind:?}: input gradient"));
        assert_same(&b.grad(), &b2.grad(), &format!("{kind:?}: bias gradient"));
        assert!(!layer.weight().codes.requires_grad() && !layer.weight().scb.requires_grad());
    }
}

#[test]
fn linear8bit_decomposed_is_close_to_dense_and_its_gradient_is_straight_through() {
    tch::manual_seed(4);
    let w = Tensor::randn([32, 64], (Kind::Float, tch::Device::Cpu)) * 0.1;
    let layer = Linear8bit::quantize(&w, None, Int8Options::default()).unwrap();
    let dense = Dense::new(layer.weight().dequantize(Kind::Float).unwrap(), None).unwrap();
    let x = Tensor::randn([7, 64], (Kind::Float, tch::Device::Cpu));
    let _ = x.narrow(1, 9, 1).g_mul_scalar_(20.0); // an outlier column, computed in f32
    let x1 = x.detach().set_requires_grad(true);
    let y = layer.forward(&x1).unwrap();
    let want = dense.forward(&x).unwrap();
    let rel = max_abs(&(&y - &want)) / max_abs(&want);
    assert!(rel > 0.0 && rel < 2e-2, "int8 activations: {rel:e}");
    let g = Tensor::randn([7, 32], (Kind::Float, tch::Device::Cpu));
    (&y * &g).sum(Kind::Float).backward();
    assert_same(&x1.grad(), &g.mm(&dense.weight), "input gradient through the dequantized weight");
    // Zero rows and an empty batch.
    let zeros = Tensor::zeros([2, 64], (Kind::Float, tch::Device::Cpu));
    assert_eq!(max_abs(&layer.forward(&zeros).unwrap()), 0.0);
    let empty = layer.forward(&Tensor::zeros([0, 64], (Kind::Float, tch::Device::Cpu))).unwrap();
    assert_eq!(empty.size(), vec![0, 32]);
}

#[test]
fn linear8bit_bad_inputs_are_errors() {
    let w = Tensor::randn([8, 16], (Kind::Float, tch::Device::Cpu));
    let layer = Linear8bit::quantize(&w, None, Int8Options::default()).unwrap();
    let r = layer.forward(&Tensor::zeros([2, 15], (Kind::Float, tch::Device::Cpu)));
    assert!(matches!(r, Err(Error::BadTensor { what: "input", .. })), "{r:?}");
    let r = layer.forward(&Tensor::zeros([2, 16], (Kind::Int64, tch::Device::Cpu)));
    assert!(matches!(r, Err(Error::BadTensor { what: "input", .. })), "{r:?}");
    let bias = Tensor::zeros([7], (Kind::Float, tch::Device::Cpu));
    let r = Linear8bit::quantize(&w, Some(bias), Int8Options::default());
    assert!(matches!(r, Err(Error::BadTensor { what: "bias", .. })), "{r:?}");
    let r = Linear8bit::quantize(&w, None, Int8Options { threshold: -1.0, ..Int8Options::default() });
    assert!(matches!(r, Err(Error::BadTensor { what: "threshold", .. })), "{r:?}");
    let q = Quantized8bit {
        codes: Tensor::zeros([8, 16], (Kind::Int8, tch::Device::Cpu)),
        scb: Tensor::zeros([7], (Kind::Float, tch::Device::Cpu)),
    };
    let r = Linear8bit::new(q, None, Int8Options::default());
    assert!(matches!(r, Err(Error::BadTensor { what: "SCB", .. })), "{r:?}");
}
