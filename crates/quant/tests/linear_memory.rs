//! Linear4bit and Linear8bit keep no dequantized weight alive between forward and backward:
//! measured as the resident memory the autograd graph holds, against dequantize-then-linear. Its
//! own test binary with one test, so no other test allocates while it measures.

#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests")]

use quant::linear::{Int8Matmul, Int8Options, Linear, Linear4bit, Linear8bit};
use quant::ops::QuantizeOptions;
use tch::{Kind, Tensor};

/// Resident set size in bytes, from /proc/self/status.
fn rss() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Bytes of resident memory the autograd graph of one forward through `layers` keeps until
/// backward (the outputs themselves are a few KiB here).
fn retained_by_graph(forward: &dyn Fn(&Tensor) -> Tensor) -> i64 {
    let x = Tensor::randn([4, 1024], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let before = rss();
    let y = forward(&x);
    let after = rss();
    y.sum(Kind::Float).backward();
    assert_eq!(x.grad().size(), vec![4, 1024]);
    after - before
}

#[test]
fn quantized_linears_keep_no_dequantized_weight_between_forward_and_backward() {
    // Large tensors come from mmap and go back to the OS when freed, so RSS tracks live tensors
    // (glibc would otherwise raise its mmap threshold after the first free and keep freed
    // weights in the heap).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_MMAP_THRESHOLD: i32 = -3;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes glibc's allocation policy; no memory is touched.
        assert_eq!(unsafe { mallopt(M_MMAP_THRESHOLD, 64 * 1024) }, 1);
    }
    tch::manual_seed(1);
    let weights: Vec<Tensor> =
        (0..8).map(|_| Tensor::randn([1024, 1024], (Kind::Float, tch::Device::Cpu)) * 0.03).collect();
    let four: Vec<Box<dyn Linear>> = weights
        .iter()
        .map(|w| {
            Box::new(Linear4bit::quantize(w, None, QuantizeOptions::default(), Kind::BFloat16).unwrap())
                as Box<dyn Linear>
        })
        .collect();
    let eight = |matmul| -> Vec<Box<dyn Linear>> {
        let opts = Int8Options { matmul, ..Int8Options::default() };
        weights
            .iter()
            .map(|w| Box::new(Linear8bit::quantize(w, None, opts).unwrap()) as Box<dyn Linear>)
            .collect()
    };
    for (name, layers, kind) in [
        ("Linear4bit", four, Kind::BFloat16),
        ("Linear8bit (LLM.int8)", eight(Int8Matmul::Decomposed), Kind::BFloat16),
        ("Linear8bit (dequantized)", eight(Int8Matmul::Dequantized), Kind::BFloat16),
    ] {
        measure(name, &layers, kind);
    }
}

fn measure(name: &str, layers: &[Box<dyn Linear>], kind: Kind) {
    let fused = |x: &Tensor| layers.iter().fold(x.to_kind(kind), |h, l| l.forward(&h).unwrap());
    // A dense layer per weight, as dequantize-then-linear would run: autograd saves its weight
    // for grad_x.
    let dense: Vec<Tensor> =
        (0..layers.len()).map(|_| Tensor::randn([1024, 1024], (kind, tch::Device::Cpu))).collect();
    let naive = |x: &Tensor| {
        dense.iter().fold(x.to_kind(kind), |h, w| {
            let w = w.copy();
            h.linear::<Tensor>(&w, None)
        })
    };
    // Warm up (thread pools, BLAS buffers), then measure each path twice and keep the smaller.
    retained_by_graph(&fused);
    retained_by_graph(&naive);
    let fused_bytes = retained_by_graph(&fused).min(retained_by_graph(&fused));
    let naive_bytes = retained_by_graph(&naive).min(retained_by_graph(&naive));
    let weight_bytes = 8 * 1024 * 1024 * 2;
    println!(
        "retained between forward and backward, 8 layers 1024x1024 bf16: {name} {:.2} MiB, \
         dequantize+linear {:.2} MiB (dequantized weights: {:.2} MiB)",
        fused_bytes as f64 / 1048576.0,
        naive_bytes as f64 / 1048576.0,
        weight_bytes as f64 / 1048576.0
    );
    assert!(
        naive_bytes >= weight_bytes * 3 / 4,
        "naive path should keep ~{weight_bytes} B, kept {naive_bytes}"
    );
    assert!(fused_bytes.max(0) * 4 <= naive_bytes, "{name} kept {fused_bytes} B vs {naive_bytes} B");
}
