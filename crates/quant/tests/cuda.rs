//! `quant::cuda` (feature `cuda`): the device-dispatching API. Without a GPU this checks the CPU
//! fallbacks against the reference codec; with one, the same checks run on `cuda:0` too
//! (`scripts/gpu_check.sh` holds the exhaustive GPU comparison and timings).

use quant::codec::{self, QuantType};
use quant::cuda;
use quant::ops::{Absmax4, QuantizeOptions};
use tch::{Device, Kind, Tensor};

fn input(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 * 0.731).sin() * 0.05) * if i % 97 == 0 { 4.0 } else { 1.0 }).collect()
}

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if cuda::is_available() {
        d.push(Device::Cuda(0));
    }
    d
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(&t.to_device(Device::Cpu).view([-1])).expect("u8 tensor")
}

#[test]
fn quantize_matches_the_codec_on_every_device() -> Result<(), quant::Error> {
    for dev in devices() {
        for (n, bs, qt) in
            [(1000usize, 64usize, QuantType::Nf4), (4097, 128, QuantType::Fp4), (1, 32, QuantType::Nf4)]
        {
            let x = input(n);
            let (p, a) = cuda::quantize_4bit(&Tensor::from_slice(&x).to_device(dev), bs, qt)?;
            assert_eq!(p.device(), dev);
            let (rp, ra) = codec::quantize_4bit(&x, bs, qt)?;
            assert_eq!(bytes(&p), rp, "{dev:?} n={n} bs={bs}");
            assert_eq!(Vec::<f32>::try_from(&a.to_device(Device::Cpu))?, ra);
        }
    }
    Ok(())
}

#[test]
fn nested_dequantize_and_gemv_match_the_cpu_path() -> Result<(), quant::Error> {
    let (out_f, in_f) = (48i64, 200i64);
    let w = Tensor::from_slice(&input((out_f * in_f) as usize)).view([out_f, in_f]);
    let opts = QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true };
    let q = quant::ops::Quantized4bit::quantize(&w, opts)?;
    assert!(matches!(q.absmax, Absmax4::Nested { .. }));
    let reference = q.dequantize(Kind::BFloat16)?;
    let x = Tensor::from_slice(&input(in_f as usize)).to_kind(Kind::BFloat16).view([1, in_f]);
    let y_ref = x.to_kind(Kind::Float).linear::<&Tensor>(&reference.to_kind(Kind::Float), None);
    for dev in devices() {
        let qd = q.to_device(dev)?;
        let d = cuda::dequantize(&qd, Kind::BFloat16)?;
        assert_eq!(d.device(), dev);
        assert!(d.to_device(Device::Cpu).equal(&reference), "{dev:?}: dequantize differs");
        let y = cuda::gemv_4bit(&x.to_device(dev), &qd)?;
        assert_eq!(y.size(), [1, out_f]);
        let err = (y.to_device(Device::Cpu).to_kind(Kind::Float) - &y_ref).abs().max().double_value(&[]);
        assert!(err <= 1e-2 * y_ref.abs().max().double_value(&[]), "{dev:?}: gemv error {err}");
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error_on_every_device() {
    for dev in devices() {
        let mut x = input(300);
        x[123] = f32::INFINITY;
        let got = cuda::quantize_4bit(&Tensor::from_slice(&x).to_device(dev), 64, QuantType::Nf4);
        assert!(matches!(got, Err(quant::Error::NonFinite { index: 123, .. })), "{dev:?}: {got:?}");
        let got = cuda::quantize_4bit(&Tensor::from_slice(&input(10)).to_device(dev), 48, QuantType::Nf4);
        assert!(matches!(got, Err(quant::Error::Blocksize(48))), "{dev:?}: {got:?}");
    }
}
