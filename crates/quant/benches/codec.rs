//! Throughput of the fast 4-bit codec (`quant::ops`) on real weight shapes, with a memcpy of the
//! same bytes measured in the same run as the ceiling. Run: `cargo bench -p quant --bench codec`.
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quant::QuantType;
use quant::ops::{self, QuantizeOptions, Quantized4bit};
use tch::{Kind, Tensor};

const SHAPES: [(i64, i64); 2] = [(4096, 4096), (11008, 4096)];

fn bench(c: &mut Criterion) {
    tch::manual_seed(0);
    for (rows, cols) in SHAPES {
        let n = rows * cols;
        let name = format!("{rows}x{cols}");
        let w = (Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu)) * 0.02).to_kind(Kind::BFloat16);
        let q = Quantized4bit::quantize(&w, QuantizeOptions::default()).unwrap();
        let absmax = q.absmax_f32().unwrap();
        let packed_bytes = (n / 2) as u64;
        let absmax_bytes = (n / 64 * 4) as u64;
        let mut g = c.benchmark_group(format!("codec/{name}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));

        // Quantize bf16 weights: bytes read + written.
        g.throughput(Throughput::Bytes(n as u64 * 2 + packed_bytes + absmax_bytes));
        g.bench_function("quantize_nf4_bf16", |b| {
            b.iter(|| ops::quantize_4bit(&w, 64, QuantType::Nf4).unwrap());
        });
        // Into preallocated outputs, to compare with the memcpy below on equal terms.
        let mut packed = Tensor::empty([n / 2], (Kind::Uint8, tch::Device::Cpu));
        let mut absmax_out = Tensor::empty([n / 64], (Kind::Float, tch::Device::Cpu));
        g.bench_function("quantize_nf4_bf16_into", |b| {
            b.iter(|| ops::quantize_4bit_into(&w, 64, QuantType::Nf4, &mut packed, &mut absmax_out).unwrap());
        });
        g.bench_function("quantize_fp4_bf16_into", |b| {
            b.iter(|| ops::quantize_4bit_into(&w, 64, QuantType::Fp4, &mut packed, &mut absmax_out).unwrap());
        });
        for (kind, size) in [(Kind::BFloat16, 2u64), (Kind::Float, 4u64)] {
            g.throughput(Throughput::Bytes(packed_bytes + absmax_bytes + n as u64 * size));
            g.bench_function(format!("dequantize_nf4_to_{kind:?}"), |b| {
                b.iter(|| {
                    ops::dequantize_4bit(&q.packed, &absmax, n as usize, 64, QuantType::Nf4, kind).unwrap()
                });
            });
        }
        // Into a preallocated output, as memcpy below writes into one (no page faults).
        let mut out = Tensor::empty([rows, cols], (Kind::BFloat16, tch::Device::Cpu));
        g.throughput(Throughput::Bytes(packed_bytes + absmax_bytes + n as u64 * 2));
        g.bench_function("dequantize_nf4_into_BFloat16", |b| {
            b.iter(|| ops::dequantize_4bit_into(&q.packed, &absmax, 64, QuantType::Nf4, &mut out).unwrap());
        });
        // The ceiling: copying the bf16 weight (read + write) in the same run.
        let mut dst = Tensor::empty([rows, cols], (Kind::BFloat16, tch::Device::Cpu));
        g.throughput(Throughput::Bytes(n as u64 * 2 * 2));
        g.bench_function("memcpy_bf16", |b| {
            b.iter(|| dst.copy_(&w));
        });
        // The ceiling for ops that return a new tensor: a copy into fresh memory (its page
        // faults are part of the cost, as they are for quantize and dequantize above).
        g.bench_function("memcpy_bf16_new", |b| {
            b.iter(|| w.copy());
        });
        g.finish();
    }
}

/// Forward + backward of one 4-bit linear for a short batch, against dequantizing to a new
/// tensor and running a plain linear (what a stack without a fused layer does): the difference
/// is the reused dequantization buffer and the weight autograd does not keep.
fn bench_linear(c: &mut Criterion) {
    use quant::linear::{Linear, Linear4bit};
    tch::manual_seed(0);
    let (rows, cols, tokens) = (11008i64, 4096i64, 256i64);
    let w = Tensor::randn([rows, cols], (Kind::Float, tch::Device::Cpu)) * 0.02;
    let layer = Linear4bit::quantize(&w, None, QuantizeOptions::default(), Kind::BFloat16).unwrap();
    let q = Quantized4bit::quantize(&w, QuantizeOptions::default()).unwrap();
    let absmax = q.absmax_f32().unwrap();
    let x = Tensor::randn([tokens, cols], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
    let mut g = c.benchmark_group(format!("linear4bit/{rows}x{cols}x{tokens}"));
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g.bench_function("fused_fwd_bwd", |b| {
        b.iter(|| layer.forward(&x).unwrap().sum(Kind::Float).backward());
    });
    // The same f32 matmuls (the fused layer runs its bf16 matmuls in f32 on CPUs without native
    // bf16 GEMMs, see ops::matmul_in_f32), on a fresh dequantized tensor that autograd keeps.
    let kind =
        if ops::matmul_in_f32(Kind::BFloat16, tch::Device::Cpu) { Kind::Float } else { Kind::BFloat16 };
    g.bench_function("dequantize_then_linear_fwd_bwd", |b| {
        b.iter(|| {
            let n = (rows * cols) as usize;
            let wd = ops::dequantize_4bit(&q.packed, &absmax, n, 64, QuantType::Nf4, kind)
                .unwrap()
                .view([rows, cols]);
            x.to_kind(kind).linear::<Tensor>(&wd, None).to_kind(Kind::BFloat16).sum(Kind::Float).backward();
        });
    });
    g.finish();
}

criterion_group!(benches, bench, bench_linear);
criterion_main!(benches);
