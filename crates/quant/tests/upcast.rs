//! The two linears that upcast instead of keeping f32 copies: `ops::upcast_input_linear` (a
//! LoRA factor in f32 on 16-bit activations) gives autograd's exact values while saving only
//! the 16-bit input, and the frozen dense upcast (`Dense` under `CpuMatmul::F32`) multiplies a
//! weight larger than its 8 MiB f32 slab slab by slab, as one f32 product would.
#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, reason = "tests")]

use quant::linear::{Dense, Linear};
use quant::ops::{self, CpuMatmul};
use tch::{Device, Kind, Tensor};

fn bits(t: &Tensor) -> Tensor {
    let k = if t.kind() == Kind::Float { Kind::Int } else { Kind::Int16 };
    t.contiguous().view_dtype(k)
}

#[test]
fn upcast_input_linear_gives_autograds_values() {
    tch::manual_seed(3);
    for kind in [Kind::BFloat16, Kind::Half] {
        let x0 = Tensor::randn([3, 5, 96], (Kind::Float, Device::Cpu)).to_kind(kind);
        let w0 = Tensor::randn([16, 96], (Kind::Float, Device::Cpu)) * 0.1;
        let g = Tensor::randn([3, 5, 16], (Kind::Float, Device::Cpu));
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let x = x0.detach().set_requires_grad(true);
            let w = w0.detach().set_requires_grad(true);
            let y = f(&x, &w);
            (&y * &g).sum(Kind::Float).backward();
            (y.detach(), x.grad(), w.grad())
        };
        let got = run(&|x, w| ops::upcast_input_linear(x, w).unwrap());
        let want = run(&|x, w| x.to_kind(Kind::Float).linear(w, None::<Tensor>));
        assert_eq!(got.0.kind(), Kind::Float);
        assert_eq!(got.1.kind(), kind);
        assert!(bits(&got.0).equal(&bits(&want.0)), "{kind:?}: output");
        assert!(bits(&got.1).equal(&bits(&want.1)), "{kind:?}: input gradient");
        assert!(bits(&got.2).equal(&bits(&want.2)), "{kind:?}: weight gradient");
    }
    let bad = ops::upcast_input_linear(
        &Tensor::zeros([2, 5], (Kind::BFloat16, Device::Cpu)),
        &Tensor::zeros([4, 6], (Kind::Float, Device::Cpu)),
    );
    assert!(bad.unwrap_err().to_string().contains("expects 6"));
}

#[test]
fn frozen_dense_upcast_runs_in_slabs_as_one_product() {
    CpuMatmul::F32.set();
    tch::manual_seed(5);
    // 5000 x 512: 9.8 MiB in f32, two slabs of at most 8 MiB.
    let w = (Tensor::randn([5000, 512], (Kind::Float, Device::Cpu)) * 0.05).to_kind(Kind::BFloat16);
    let layer = Dense::new(w.shallow_clone(), None).unwrap();
    let x0 = Tensor::randn([2, 7, 512], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let g = Tensor::randn([2, 7, 5000], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let run = |f: &dyn Fn(&Tensor) -> Tensor| {
        let x = x0.detach().set_requires_grad(true);
        let y = f(&x);
        (&y * &g).sum(Kind::Float).backward();
        (y.detach(), x.grad())
    };
    let got = run(&|x| layer.forward(x).unwrap());
    let want = run(&|x| {
        x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), None::<Tensor>).to_kind(Kind::BFloat16)
    });
    CpuMatmul::Auto.set();
    assert!(bits(&got.0).equal(&bits(&want.0)), "output");
    // The input gradient sums the slabs' f32 products: equal up to f32 reassociation, so the
    // bf16 results differ at most in a rare last bit.
    let differ = bits(&got.1).ne_tensor(&bits(&want.1)).sum(Kind::Int64).int64_value(&[]);
    assert!(differ * 100 <= got.1.numel() as i64, "{differ} of {} gradient elements differ", got.1.numel());
    let d = (got.1.to_kind(Kind::Float) - want.1.to_kind(Kind::Float)).abs().max().double_value(&[]);
    assert!(d <= 1e-2 * want.1.to_kind(Kind::Float).abs().max().double_value(&[]));
}
