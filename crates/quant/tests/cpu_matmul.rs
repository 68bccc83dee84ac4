//! The CPU matmul policy (`quant::ops::CpuMatmul`): with `F32`, 16-bit layers compute exactly
//! `(x.f32 @ W16.f32^T + b16.f32).to(16-bit)` (and the matching input gradient); with `Native`,
//! torch's own 16-bit kernels; the two agree to 16-bit rounding. Its own test binary: the policy
//! is process-wide, and this is its one test.
#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, reason = "tests")]

use quant::linear::{Dense, Int8Matmul, Int8Options, Linear, Linear4bit, Linear8bit};
use quant::ops::{CpuMatmul, QuantizeOptions};
use tch::{Device, Kind, Tensor};

fn bits(t: &Tensor) -> Tensor {
    let k = if t.kind() == Kind::Float { Kind::Int } else { Kind::Int16 };
    t.contiguous().view_dtype(k)
}

/// Output and input gradient of `f` on `x` for the upstream gradient `g`.
fn run(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, g: &Tensor) -> (Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let y = f(&x);
    (&y.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
    (y.detach(), x.grad())
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[]);
    d / b.to_kind(Kind::Double).abs().max().double_value(&[])
}

#[test]
fn sixteen_bit_layers_follow_the_cpu_matmul_policy() {
    tch::manual_seed(11);
    let w = Tensor::randn([48, 96], (Kind::Float, Device::Cpu)) * 0.1;
    let bias = Tensor::randn([48], (Kind::Float, Device::Cpu));
    let x = Tensor::randn([3, 5, 96], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([3, 5, 48], (Kind::Float, Device::Cpu));
    for kind in [Kind::BFloat16, Kind::Half] {
        let x = x.to_kind(kind);
        let four =
            Linear4bit::quantize(&w, Some(bias.shallow_clone()), QuantizeOptions::default(), kind).unwrap();
        let w4 = four.weight().dequantize(kind).unwrap();
        let int8 = Int8Options { threshold: 6.0, matmul: Int8Matmul::Dequantized };
        let eight = Linear8bit::quantize(&w, Some(bias.shallow_clone()), int8).unwrap();
        let w8 = eight.weight().dequantize(kind).unwrap();
        let dense = Dense::new(w4.shallow_clone(), None).unwrap();
        let b16 = bias.to_kind(kind);
        let layers: [(&str, &dyn Linear, &Tensor, Option<&Tensor>); 3] = [
            ("Linear4bit", &four, &w4, Some(&b16)),
            ("Linear8bit", &eight, &w8, Some(&b16)),
            ("Dense (frozen)", &dense, &w4, None),
        ];
        let mut outputs = Vec::new();
        for policy in [CpuMatmul::Native, CpuMatmul::F32] {
            policy.set();
            for (name, layer, w16, b16) in layers {
                let what = format!("{kind:?} {policy:?} {name}");
                let got = run(&|x| layer.forward(x).unwrap(), &x, &g);
                let want = match policy {
                    CpuMatmul::F32 => run(
                        &|x| {
                            let f = Kind::Float;
                            let b = b16.map(|b| b.to_kind(f));
                            x.to_kind(f).linear(&w16.to_kind(f), b.as_ref()).to_kind(kind)
                        },
                        &x,
                        &g,
                    ),
                    _ => run(&|x| x.linear(w16, b16), &x, &g),
                };
                assert_eq!(got.0.kind(), kind, "{what}: output dtype");
                assert!(bits(&got.0).equal(&bits(&want.0)), "{what}: output");
                assert!(bits(&got.1).equal(&bits(&want.1)), "{what}: input gradient");
                outputs.push(got);
            }
        }
        // Native and f32 differ only in where the sums round: within 16-bit precision.
        for i in 0..layers.len() {
            let (native, f32) = (&outputs[i], &outputs[i + layers.len()]);
            assert!(rel(&native.0, &f32.0) < 2e-2, "{kind:?} {}: outputs", layers[i].0);
            assert!(rel(&native.1, &f32.1) < 2e-2, "{kind:?} {}: input gradients", layers[i].0);
        }
    }
    CpuMatmul::Auto.set();
}
