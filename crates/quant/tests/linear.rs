//! The 4-bit linear layer against a dense layer on its dequantized weight: exact outputs and
//! input gradients (the memory measurement is in `linear_memory.rs`).
#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "tests")]

use quant::Error;
use quant::QuantType;
use quant::linear::{Dense, Linear, Linear4bit};
use quant::ops::QuantizeOptions;
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
