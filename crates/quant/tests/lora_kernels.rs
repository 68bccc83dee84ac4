//! The fused LoRA update (`ops::lora_update`, AVX-512 kernels) against PEFT's composition of
//! torch ops: outputs and all four gradients, in bf16 and f32, over ranks that fill one to four
//! 16-lane chunks (and leave tails), row counts off the kernels' 8-row blocks and widths off
//! their 16-lane blocks. Where the CPU lacks AVX-512 the kernels are not built for it and the
//! test says so.

#![allow(clippy::unwrap_used, reason = "tests")]

use proptest::prelude::*;
use quant::ops;
use tch::{Device, Kind, Tensor};

/// `max |got - want| / max |want|`.
fn rel(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let d = (&g - &w).abs().max().double_value(&[]);
    d / w.abs().max().double_value(&[]).max(1e-30)
}

/// PEFT's order: `base + ((x.to(f32) A^T) B^T * s).to(base dtype)`, its gradients by autograd.
fn peft(x: &Tensor, base: &Tensor, a: &Tensor, b: &Tensor, s: f64, g: &Tensor) -> [Tensor; 5] {
    let (x, base) = (x.detach().set_requires_grad(true), base.detach().set_requires_grad(true));
    let (a, b) = (a.detach().set_requires_grad(true), b.detach().set_requires_grad(true));
    let update = x.to_kind(Kind::Float).linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * s;
    let y = &base + update.to_kind(base.kind());
    (&y.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
    [y.detach(), x.grad(), base.grad(), a.grad(), b.grad()]
}

fn fused(x: &Tensor, base: &Tensor, a: &Tensor, b: &Tensor, s: f64, g: &Tensor) -> [Tensor; 5] {
    let (x, base) = (x.detach().set_requires_grad(true), base.detach().set_requires_grad(true));
    let (a, b) = (a.detach().set_requires_grad(true), b.detach().set_requires_grad(true));
    let y = ops::lora_update(&x, &base, &a, &b, s).unwrap();
    assert_eq!(y.kind(), base.kind());
    assert_eq!(y.size(), base.size());
    (&y.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
    [y.detach(), x.grad(), base.grad(), a.grad(), b.grad()]
}

fn check(kind: Kind, lead: &[i64], fan_in: i64, fan_out: i64, r: i64, s: f64, seed: i64) {
    tch::manual_seed(seed);
    let opts = (Kind::Float, Device::Cpu);
    let shape = |last: i64| lead.iter().copied().chain([last]).collect::<Vec<_>>();
    let x = Tensor::randn(shape(fan_in), opts).to_kind(kind);
    let base = Tensor::randn(shape(fan_out), opts).to_kind(kind);
    let a = Tensor::randn([r, fan_in], opts) * 0.2;
    let b = Tensor::randn([fan_out, r], opts) * 0.2;
    let g = Tensor::randn(shape(fan_out), opts).to_kind(kind).to_kind(Kind::Float);
    let want = peft(&x, &base, &a, &b, s, &g);
    let got = fused(&x, &base, &a, &b, s, &g);
    // One rounding of the output in its dtype may land on the other side of a tie: a unit in the
    // last place of bf16 (2^-8 relative) or float noise in f32.
    let (out_tol, grad_tol) = if kind == Kind::BFloat16 { (1e-2, 1e-2) } else { (1e-5, 1e-5) };
    let what = format!("{kind:?} {lead:?} in {fan_in} out {fan_out} r {r} s {s}");
    assert!(rel(&got[0], &want[0]) < out_tol, "{what}: output off by {}", rel(&got[0], &want[0]));
    assert_eq!(got[1].kind(), kind, "{what}: input gradient dtype");
    assert!(rel(&got[1], &want[1]) < grad_tol, "{what}: input gradient off by {}", rel(&got[1], &want[1]));
    assert!(got[2].equal(&want[2]), "{what}: the base output's gradient is the output's");
    // The factors' gradients are f32 sums over the rows, in another order.
    assert!(rel(&got[3], &want[3]) < 1e-5, "{what}: A's gradient off by {}", rel(&got[3], &want[3]));
    assert!(rel(&got[4], &want[4]) < 1e-5, "{what}: B's gradient off by {}", rel(&got[4], &want[4]));
}

#[test]
fn the_fused_update_is_pefts_composition() {
    if !ops::lora_kernels_available() {
        eprintln!("skipped: this CPU lacks AVX-512 (F, BW, VL); adapters keep torch's products here");
        return;
    }
    for kind in [Kind::BFloat16, Kind::Float] {
        // The bench's shapes: 2 x 256 rows, q/k/v/o, gate/up and down of a 768-wide model.
        check(kind, &[2, 256], 768, 768, 16, 2.0, 1);
        check(kind, &[2, 256], 768, 2048, 16, 2.0, 2);
        check(kind, &[2, 256], 2048, 768, 16, 2.0, 3);
        // Ranks of 1-4 chunks with tails, rows off the 8-row blocks, widths off 16 lanes, a
        // scaling that is no power of two, and one row.
        check(kind, &[3, 7], 40, 24, 8, 32.0 / 12.0_f64.sqrt(), 4);
        check(kind, &[13], 33, 70, 20, 1.0, 5);
        check(kind, &[5, 3], 300, 17, 64, 0.5, 6);
        check(kind, &[1], 16, 16, 1, 4.0, 7);
        check(kind, &[9], 600, 45, 48, 2.0, 8);
    }
}

#[test]
fn bad_inputs_are_refused_with_what_is_wrong() {
    if !ops::lora_kernels_available() {
        return;
    }
    let f = |k| Tensor::zeros([4, 8], (k, Device::Cpu));
    let (a, b) = (
        Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)),
        Tensor::zeros([8, 2], (Kind::Float, Device::Cpu)),
    );
    let err = |r: Result<Tensor, quant::Error>| r.unwrap_err().to_string();
    assert!(
        err(ops::lora_update(&f(Kind::BFloat16), &f(Kind::Float), &a, &b, 1.0)).contains("share a dtype")
    );
    assert!(
        err(ops::lora_update(&f(Kind::Float), &f(Kind::Float), &a.to_kind(Kind::BFloat16), &b, 1.0))
            .contains("float32 factors")
    );
    let wide = Tensor::zeros([65, 8], (Kind::Float, Device::Cpu));
    assert!(
        err(ops::lora_update(&f(Kind::Float), &f(Kind::Float), &wide, &wide.tr(), 1.0))
            .contains("ranks 1 to 64")
    );
    let narrow = Tensor::zeros([2, 7], (Kind::Float, Device::Cpu));
    assert!(
        err(ops::lora_update(&f(Kind::Float), &f(Kind::Float), &narrow, &b, 1.0)).contains("A expects 7")
    );
}

/// Each product on its own is torch's matmul, to f32 rounding.
#[test]
fn each_rank_product_is_a_matmul() {
    if !ops::lora_kernels_available() {
        return;
    }
    tch::manual_seed(9);
    let f = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu));
    for kind in [Kind::BFloat16, Kind::Float] {
        let (x, a) = (f(&[37, 70]).to_kind(kind), f(&[70, 20]));
        let got = ops::lora_rank_product(ops::RankProduct::Contract, &x, &a).unwrap();
        assert!(rel(&got, &x.to_kind(Kind::Float).matmul(&a)) < 1e-5, "contract {kind:?}");
        let (d, w) = (f(&[37, 20]), f(&[20, 45]));
        let got = ops::lora_rank_product(ops::RankProduct::Expand, &d, &w).unwrap();
        assert!(rel(&got, &d.matmul(&w)) < 1e-5, "expand");
        let (d, y) = (f(&[37, 20]), f(&[37, 45]).to_kind(kind));
        let got = ops::lora_rank_product(ops::RankProduct::Reduce, &d, &y).unwrap();
        assert!(rel(&got, &d.tr().matmul(&y.to_kind(Kind::Float))) < 1e-5, "reduce {kind:?}");
    }
    let wide = f(&[8, 65]);
    assert!(ops::lora_rank_product(ops::RankProduct::Contract, &f(&[3, 8]), &wide).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any small shape and rank: PEFT's composition, in both dtypes.
    #[test]
    fn any_shape_matches_pefts_composition(
        rows in 1i64..40, fan_in in 1i64..90, fan_out in 1i64..90, r in 1i64..=64, bf16 in any::<bool>(), seed in 0i64..1000,
    ) {
        prop_assume!(ops::lora_kernels_available());
        let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
        check(kind, &[rows], fan_in, fan_out, r, 2.0, seed);
    }
}
