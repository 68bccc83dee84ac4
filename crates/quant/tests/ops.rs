//! The libtorch fast path (`quant::ops`) against the reference codecs: byte-identical packed
//! nibbles, absmax and nested codes on random shapes, dtypes, block sizes and quant types, exact
//! dequantization, the same int8 codes, scales and outlier columns as `quant::int8`, and typed
//! errors for what it refuses.
#![cfg(feature = "torch")]
#![allow(clippy::unwrap_used, reason = "tests")]

use half::{bf16, f16};
use proptest::prelude::*;
use quant::Error;
use quant::codec::{self, BLOCKSIZES, NESTED_BLOCKSIZE, QuantType};
use quant::int8;
use quant::ops::{self, Absmax4, CodecAbsmaxOwned, Offset, QuantizeOptions, Quantized4bit, Quantized8bit};
use tch::{Kind, Tensor};

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.reshape([-1])).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(&t.reshape([-1])).unwrap()
}

/// Raw bits of a 16-bit tensor (bf16 or f16).
fn bits16(t: &Tensor) -> Vec<u16> {
    Vec::<i16>::try_from(&t.reshape([-1]).view_dtype(Kind::Int16))
        .unwrap()
        .iter()
        .map(|&v| v as u16)
        .collect()
}

/// Expected 16-bit patterns of f32 values, every NaN as the canonical quiet NaN that torch's
/// conversions (and the fast path) write; `half` keeps the NaN's sign.
fn want_bf16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| if x.is_nan() { 0x7fc0 } else { bf16::from_f32(x).to_bits() }).collect()
}

/// Same for f16; NaNs compared by class (any NaN pattern), see [`canon_f16`].
fn want_f16(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| canon_f16(f16::from_f32(x).to_bits())).collect()
}

fn canon_f16(b: u16) -> u16 {
    if b & 0x7c00 == 0x7c00 && b & 0x03ff != 0 { 0x7e00 } else { b }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Values as they reach the codec once stored in `kind` (exact for every value of `kind`).
fn stored(values: &[f32], kind: Kind) -> Vec<f32> {
    match kind {
        Kind::Half => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        Kind::BFloat16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

/// A tensor of `kind` holding exactly `stored(values, kind)`.
fn tensor(values: &[f32], shape: &[i64], kind: Kind) -> Tensor {
    match kind {
        Kind::Half => {
            let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
            Tensor::from_slice(&v).reshape(shape)
        }
        // Not `from_slice(&[bf16])`: tch 0.24 tags `half::bf16` as Kind::Half. The f32 values
        // rounded to bf16 first convert exactly.
        Kind::BFloat16 => Tensor::from_slice(&stored(values, kind)).to_kind(Kind::BFloat16).reshape(shape),
        _ => Tensor::from_slice(values).reshape(shape),
    }
}

fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -3.0f32..3.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => -1e-30f32..1e-30,
        1 => proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
    ]
}

fn shape() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        (0i64..3000).prop_map(|n| vec![n]),
        (0i64..70, 0i64..90).prop_map(|(a, b)| vec![a, b]),
        (1i64..12, 1i64..12, 1i64..40).prop_map(|(a, b, c)| vec![a, b, c]),
    ]
}

/// A shape, values for it with some whole blocks zeroed, a block size and a quant type.
fn case() -> impl Strategy<Value = (Vec<i64>, Vec<f32>, usize, QuantType, Kind)> {
    (
        shape(),
        proptest::sample::select(BLOCKSIZES.to_vec()),
        prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)],
        prop_oneof![Just(Kind::Float), Just(Kind::Half), Just(Kind::BFloat16)],
    )
        .prop_flat_map(|(shape, bs, qt, kind)| {
            let n = shape.iter().product::<i64>() as usize;
            let blocks = codec::n_blocks(n, bs);
            (
                Just(shape),
                proptest::collection::vec(value(), n),
                proptest::collection::vec(proptest::bool::weighted(0.2), blocks),
                Just(bs),
                Just(qt),
                Just(kind),
            )
        })
        .prop_map(|(shape, mut values, zero, bs, qt, kind)| {
            // Keep values finite once stored in a 16-bit kind.
            let max = match kind {
                Kind::Half => 65504.0,
                Kind::BFloat16 => 3.38e38,
                _ => f32::MAX,
            };
            values.iter_mut().for_each(|v| *v = v.clamp(-max, max));
            for (b, z) in zero.iter().enumerate() {
                if *z {
                    let end = ((b + 1) * bs).min(values.len());
                    values[b * bs..end].iter_mut().for_each(|v| *v = 0.0);
                }
            }
            (shape, values, bs, qt, kind)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn quantize_matches_the_codec_byte_for_byte((shape, values, bs, qt, kind) in case()) {
        let x = tensor(&values, &shape, kind);
        let exact = stored(&values, kind);
        let (want_packed, want_absmax) = codec::quantize_4bit(&exact, bs, qt).unwrap();

        let (packed, absmax) = ops::quantize_4bit(&x, bs, qt).unwrap();
        prop_assert_eq!(packed.size(), vec![want_packed.len() as i64, 1]);
        prop_assert_eq!(u8s(&packed), want_packed.clone());
        prop_assert_eq!(bits(&f32s(&absmax)), bits(&want_absmax));

        // Double quantization: the offset is torch's own f32 mean of the absmax values.
        let dq = Quantized4bit::quantize(&x, QuantizeOptions { quant_type: qt, blocksize: bs, double_quant: true });
        if want_absmax.is_empty() {
            let q = dq.unwrap();
            let Absmax4::Nested { offset, .. } = &q.absmax else { panic!("not nested") };
            prop_assert!(offset.is_nan());
            return Ok(());
        }
        let offset = Tensor::from_slice(&want_absmax).mean(Kind::Float).double_value(&[]) as f32;
        match codec::double_quant(&want_absmax, Some(offset)) {
            Ok(want) => {
                let q = dq.unwrap();
                prop_assert_eq!(q.packed_bytes().unwrap(), want_packed);
                prop_assert_eq!(&q.shape, &shape);
                prop_assert_eq!(q.codec_absmax().unwrap(), CodecAbsmaxOwned::Nested(want.clone()));
                // The absmax values it dequantizes with are the codec's, bit for bit.
                prop_assert_eq!(bits(&f32s(&q.absmax_f32().unwrap())), bits(&want.absmax().unwrap()));
            }
            // Scales near f32::MAX overflow the mean or `absmax - offset`: both refuse.
            Err(Error::NonFinite { index, value }) => match dq {
                Err(Error::NonFinite { index: i, value: v }) => {
                    prop_assert_eq!(i, index);
                    prop_assert_eq!(v.to_bits(), value.to_bits());
                }
                other => prop_assert!(false, "codec refused element {index}, fast path gave {other:?}"),
            },
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    #[test]
    fn dequantize_is_exact((shape, values, bs, qt, kind) in case()) {
        let x = tensor(&values, &shape, kind);
        for double_quant in [false, true] {
            let q = match Quantized4bit::quantize(&x, QuantizeOptions { quant_type: qt, blocksize: bs, double_quant }) {
                Ok(q) => q,
                // Scales near f32::MAX overflow double quantization (checked against the codec above).
                Err(Error::NonFinite { .. }) if double_quant => continue,
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            let absmax = f32s(&q.absmax_f32().unwrap());
            let packed = q.packed_bytes().unwrap();
            let mut want = vec![0.0f32; q.numel()];
            codec::dequantize_4bit(&packed, &absmax, bs, qt, &mut want).unwrap();

            let got = q.dequantize(Kind::Float).unwrap();
            prop_assert_eq!(got.size(), shape.clone());
            prop_assert_eq!(bits(&f32s(&got)), bits(&want));

            let got = q.dequantize(Kind::BFloat16).unwrap();
            prop_assert_eq!(got.kind(), Kind::BFloat16);
            prop_assert_eq!(bits16(&got), want_bf16(&want));

            let got = q.dequantize(Kind::Half).unwrap();
            prop_assert_eq!(got.kind(), Kind::Half);
            let got: Vec<u16> = bits16(&got).into_iter().map(canon_f16).collect();
            prop_assert_eq!(got, want_f16(&want));
        }
    }

    /// Any bytes and any finite scales, not only what quantize makes (overflow to f16 inf,
    /// subnormal results, huge scales).
    #[test]
    fn dequantize_arbitrary_bytes_and_scales(
        n in 0usize..2000,
        bs in proptest::sample::select(BLOCKSIZES.to_vec()),
        fp4 in any::<bool>(),
        seed in proptest::collection::vec(any::<u8>(), 1000),
        scales in proptest::collection::vec(value(), 63),
    ) {
        let qt = if fp4 { QuantType::Fp4 } else { QuantType::Nf4 };
        let packed: Vec<u8> = (0..codec::packed_len(n)).map(|i| seed[i % seed.len()].wrapping_add((i / seed.len()) as u8)).collect();
        let absmax: Vec<f32> = (0..codec::n_blocks(n, bs)).map(|i| scales[i % scales.len()]).collect();
        let mut want = vec![0.0f32; n];
        codec::dequantize_4bit(&packed, &absmax, bs, qt, &mut want).unwrap();
        let p = Tensor::from_slice(&packed);
        let a = Tensor::from_slice(&absmax);
        let got = ops::dequantize_4bit(&p, &a, n, bs, qt, Kind::Float).unwrap();
        prop_assert_eq!(bits(&f32s(&got)), bits(&want));
        let got = ops::dequantize_4bit(&p, &a, n, bs, qt, Kind::BFloat16).unwrap();
        prop_assert_eq!(bits16(&got), want_bf16(&want));
        let got = ops::dequantize_4bit(&p, &a, n, bs, qt, Kind::Half).unwrap();
        let got: Vec<u16> = bits16(&got).into_iter().map(canon_f16).collect();
        prop_assert_eq!(got, want_f16(&want));
    }

    /// Plain blockwise 8-bit quantization with a given offset, against the codec.
    #[test]
    fn blockwise_8bit_matches_the_codec(
        values in proptest::collection::vec(value(), 0..3000),
        bs in proptest::sample::select(BLOCKSIZES.to_vec()),
        offset in -1.0f32..1.0,
    ) {
        let centered: Vec<f32> = values.iter().map(|&v| v - offset).collect();
        prop_assume!(centered.iter().all(|v| v.is_finite()));
        let map = ops::dynamic_map_tensor();
        let (want_codes, want_absmax) = codec::quantize_blockwise_8bit(&centered, codec::dynamic_map(), bs).unwrap();
        let (codes, absmax, used) = ops::quantize_blockwise_8bit(&Tensor::from_slice(&values), &map, bs, Offset::Given(offset)).unwrap();
        prop_assert_eq!(used.to_bits(), offset.to_bits());
        prop_assert_eq!(u8s(&codes), want_codes.clone());
        prop_assert_eq!(bits(&f32s(&absmax)), bits(&want_absmax));
        let back = ops::dequantize_blockwise_8bit(&codes, &absmax, &map, bs, offset).unwrap();
        let mut want = codec::dequantize_blockwise_8bit(&want_codes, &want_absmax, codec::dynamic_map(), bs).unwrap();
        want.iter_mut().for_each(|v| *v += offset);
        prop_assert_eq!(bits(&f32s(&back)), bits(&want));
    }
}

/// bf16 to NF4 and FP4 takes a path without f32 compares (per-block thresholds in bf16 order,
/// see `OctaveTable` in `csrc/quant_ops.cpp`): every absmax mantissa, exponents at and past the
/// ends of its range (both parities), and values on and next to every threshold (and -0.0,
/// subnormals, -absmax) quantize as the reference codec does, byte for byte.
#[test]
fn bf16_at_every_threshold_matches_the_codec() {
    // bf16 values in the order of their value, as integers (-1 - magnitude for negatives).
    let key = |v: f32| -> i32 {
        let b = i32::from(bf16::from_f32(v).to_bits());
        if b & 0x8000 == 0 { b } else { -1 - (b & 0x7fff) }
    };
    let value = |k: i32| -> f32 {
        let b = if k >= 0 { k as u16 } else { ((-1 - k) as u16) | 0x8000 };
        bf16::from_bits(b).to_f32()
    };
    // The codec's thresholds: midpoints of neighbouring NF4 codes, and (FP4 compares |x|) of
    // neighbouring FP4 magnitudes, on both sides of zero.
    let midpoints = |mut v: Vec<f32>| -> Vec<f32> {
        v.sort_by(f32::total_cmp);
        v.dedup();
        v.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
    };
    let nf4 = midpoints(QuantType::Nf4.code().to_vec());
    let fp4: Vec<f32> = midpoints(QuantType::Fp4.code().iter().map(|c| c.abs()).collect())
        .into_iter()
        .flat_map(|t| [t, -t])
        .collect();
    assert_eq!((nf4.len(), fp4.len()), (15, 14));
    for (qt, thresholds) in [(QuantType::Nf4, &nf4[..]), (QuantType::Fp4, &fp4[..])] {
        let mut values = Vec::new();
        for mantissa in 0..128u16 {
            for delta in
                [-127i32, -126, -122, -121, -120, -117, -116, -115, -60, -1, 0, 1, 16, 17, 60, 125, 126, 127]
            {
                let absmax = bf16::from_bits((((127 + delta) as u16) << 7) | mantissa).to_f32();
                // Blocks of 32 that each hold the absmax and the special values, then the values
                // on and beside a few thresholds; the group padded to 128 so that every block of
                // 32, 64 or 128 has this absmax.
                let fixed = [absmax, -0.0, 0.0, f32::from_bits(1 << 16), -f32::from_bits(1 << 16), -absmax];
                let near: Vec<f32> = thresholds
                    .iter()
                    .flat_map(|&t| {
                        let k = key(t * absmax);
                        (k - 2..=k + 2).map(value).filter(|v| v.abs() <= absmax)
                    })
                    .collect();
                let start = values.len();
                for chunk in near.chunks(32 - fixed.len()) {
                    values.extend(fixed);
                    values.extend(chunk);
                    values.resize(values.len().div_ceil(32) * 32, absmax / 3.0);
                }
                values.resize(start + (values.len() - start).div_ceil(128) * 128, absmax / 3.0);
            }
        }
        for bs in [32, 64, 128] {
            assert_bf16_matches_the_codec(&values, bs, qt);
        }
    }
}

/// bf16 quantized by the fast path equals the reference codec's, byte for byte (the first
/// differing byte named with its two elements), absmax too.
fn assert_bf16_matches_the_codec(values: &[f32], bs: usize, qt: QuantType) {
    let exact = stored(values, Kind::BFloat16);
    let (want_packed, want_absmax) = codec::quantize_4bit(&exact, bs, qt).unwrap();
    let x = tensor(values, &[values.len() as i64], Kind::BFloat16);
    let (packed, absmax) = ops::quantize_4bit(&x, bs, qt).unwrap();
    let got = u8s(&packed);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want_packed[i]) {
        let (a, b) = (exact[2 * i], exact[2 * i + 1]);
        panic!(
            "{qt:?} blocksize {bs}: byte {i} (elements {a} {b}) is {:#04x}, the codec gives {:#04x}",
            got[i], want_packed[i]
        );
    }
    assert_eq!(bits(&f32s(&absmax)), bits(&want_absmax));
}

/// The same path on every finite bf16 value up to the absmax, for a few absmax values.
#[test]
fn bf16_on_every_bf16_value_matches_the_codec() {
    let mut values = Vec::new();
    for (mantissa, delta) in
        [(0u16, 0i32), (1, 125), (64, -120), (127, 0), (93, 7), (12, -116), (0, 16), (127, 16)]
    {
        let absmax = bf16::from_bits((((127 + delta) as u16) << 7) | mantissa).to_f32();
        let all = (0..=0xffffu16).map(|b| bf16::from_bits(b).to_f32()).filter(|v| v.abs() <= absmax);
        for chunk in all.collect::<Vec<_>>().chunks(63) {
            values.push(absmax);
            values.extend_from_slice(chunk);
            values.resize(values.len().div_ceil(64) * 64, 0.0);
        }
    }
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        assert_bf16_matches_the_codec(&values, 64, qt);
    }
}

/// The exactness tests above exercise the octave-table kernel, not only its f32 fallback: it is
/// what bf16 inputs take wherever the CPU has AVX2 and F16C.
#[test]
fn bf16_takes_the_octave_kernel_where_the_cpu_has_avx2() {
    #[cfg(target_arch = "x86_64")]
    {
        let off = std::env::var("NIBBLE_QUANT_F32_SEARCH").is_ok_and(|v| !v.is_empty() && v != "0");
        let cpu = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c");
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            assert_eq!(ops::bf16_octave_kernel(qt), cpu && !off, "{qt:?}");
        }
    }
}

#[test]
fn non_finite_input_is_an_error_naming_the_element() {
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            // 1100: past the first chunk of 16 blocks of 64 that the bf16 kernel sizes up at once.
            for at in [0usize, 77, 1100, 4999] {
                let mut v = vec![0.5f32; 5000];
                v[at] = bad;
                // A second bad value later must not be the one reported.
                if at + 300 < v.len() {
                    v[at + 300] = f32::NAN;
                }
                let x = tensor(&v, &[50, 100], kind);
                for (qt, bs) in
                    [(QuantType::Nf4, 64), (QuantType::Fp4, 64), (QuantType::Nf4, 32), (QuantType::Fp4, 256)]
                {
                    match ops::quantize_4bit(&x, bs, qt) {
                        Err(Error::NonFinite { index, value }) => {
                            assert_eq!(index, at, "{kind:?} {qt:?} blocksize {bs} {bad}");
                            assert_eq!(value.is_nan(), bad.is_nan());
                        }
                        other => panic!("{kind:?} {qt:?} blocksize {bs} {bad} at {at}: {other:?}"),
                    }
                }
            }
        }
    }
    let x = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
    let r = ops::quantize_blockwise_8bit(&x, &ops::dynamic_map_tensor(), 256, Offset::Mean);
    assert!(matches!(r, Err(Error::NonFinite { index: 1, .. })), "{r:?}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let x = Tensor::from_slice(&[1.0f32; 128]).reshape([8, 16]);
    assert!(matches!(ops::quantize_4bit(&x, 48, QuantType::Nf4), Err(Error::Blocksize(48))));
    let ints = Tensor::from_slice(&[1i32; 8]);
    let r = ops::quantize_4bit(&ints, 64, QuantType::Nf4);
    assert!(matches!(r, Err(Error::BadTensor { what: "input", .. })), "{r:?}");
    let r = ops::quantize_4bit(&x.tr(), 64, QuantType::Nf4);
    assert!(
        matches!(&r, Err(Error::BadTensor { what: "input", problem }) if problem.contains("contiguous")),
        "{r:?}"
    );
    let r = Quantized4bit::quantize(&x, QuantizeOptions::default()).and_then(|q| q.dequantize(Kind::Int));
    assert!(matches!(r, Err(Error::BadTensor { what: "output dtype", .. })), "{r:?}");
    // Lengths that do not fit together are reported by the C++ op as a libtorch error.
    let p = Tensor::from_slice(&[0u8; 4]);
    let a = Tensor::from_slice(&[1.0f32]);
    let r = ops::dequantize_4bit(&p, &a, 10, 64, QuantType::Nf4, Kind::Float);
    assert!(matches!(&r, Err(Error::Torch(m)) if m.contains("packed bytes: expected 5")), "{r:?}");
    let r = Quantized4bit::from_codec(
        &[0u8; 4],
        ops::CodecAbsmax::Plain(&[1.0]),
        &[10],
        Kind::Float,
        64,
        QuantType::Nf4,
    );
    assert!(matches!(r, Err(Error::Length { what: "packed bytes", expected: 5, got: 4 })), "{r:?}");
}

#[test]
fn codec_buffers_round_trip() {
    let v: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
    let (packed, absmax) = codec::quantize_4bit(&v, 64, QuantType::Fp4).unwrap();
    let nested = codec::double_quant(&absmax, None).unwrap();
    let q = Quantized4bit::from_codec(
        &packed,
        ops::CodecAbsmax::Nested(&nested),
        &[10, 100],
        Kind::BFloat16,
        64,
        QuantType::Fp4,
    )
    .unwrap();
    assert_eq!(q.packed_bytes().unwrap(), packed);
    assert_eq!(q.codec_absmax().unwrap(), CodecAbsmaxOwned::Nested(nested.clone()));
    let mut want = vec![0.0f32; 1000];
    codec::dequantize_4bit(&packed, &nested.absmax().unwrap(), 64, QuantType::Fp4, &mut want).unwrap();
    assert_eq!(bits(&f32s(&q.dequantize(Kind::Float).unwrap())), bits(&want));
    assert_eq!(NESTED_BLOCKSIZE, 256);
}

#[test]
fn empty_and_single_element() {
    let e = Tensor::from_slice::<f32>(&[]);
    let q = Quantized4bit::quantize(&e, QuantizeOptions::default()).unwrap();
    assert_eq!(q.packed.size(), vec![0, 1]);
    assert_eq!(q.dequantize(Kind::BFloat16).unwrap().size(), vec![0]);
    let one = Tensor::from_slice(&[-3.0f32]);
    let (p, a) = ops::quantize_4bit(&one, 64, QuantType::Fp4).unwrap();
    assert_eq!((u8s(&p), f32s(&a)), (vec![0xB0], vec![3.0]));
}

#[test]
fn dequantize_into_an_existing_tensor_equals_dequantize() {
    let x = Tensor::randn([33, 70], (Kind::Float, tch::Device::Cpu));
    let q = Quantized4bit::quantize(&x, QuantizeOptions::default()).unwrap();
    let absmax = q.absmax_f32().unwrap();
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        let mut out = Tensor::empty([33, 70], (kind, tch::Device::Cpu));
        ops::dequantize_4bit_into(&q.packed, &absmax, 64, QuantType::Nf4, &mut out).unwrap();
        assert!(out.equal(&q.dequantize(kind).unwrap()), "{kind:?}");
    }
    let mut short = Tensor::empty([10], (Kind::Float, tch::Device::Cpu));
    let r = ops::dequantize_4bit_into(&q.packed, &absmax, 64, QuantType::Nf4, &mut short);
    assert!(matches!(&r, Err(Error::Torch(m)) if m.contains("packed bytes")), "{r:?}");
}

#[test]
fn quantize_into_existing_tensors_equals_quantize() {
    let x = Tensor::randn([33, 70], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let (want_p, want_a) = ops::quantize_4bit(&x, 64, qt).unwrap();
        let mut p = Tensor::full([33 * 35], 0x55, (Kind::Uint8, tch::Device::Cpu));
        let mut a = Tensor::full([37], -1.0, (Kind::Float, tch::Device::Cpu));
        ops::quantize_4bit_into(&x, 64, qt, &mut p, &mut a).unwrap();
        assert_eq!((u8s(&p), f32s(&a)), (u8s(&want_p), f32s(&want_a)), "{qt:?}");
    }
    let mut p = Tensor::empty([33 * 35], (Kind::Uint8, tch::Device::Cpu));
    let mut short = Tensor::empty([36], (Kind::Float, tch::Device::Cpu));
    let r = ops::quantize_4bit_into(&x, 64, QuantType::Nf4, &mut p, &mut short);
    assert!(matches!(&r, Err(Error::Torch(m)) if m.contains("absmax must be float32 with 37")), "{r:?}");
    let bad = Tensor::from_slice(&[1.0f32, f32::NAN, 2.0, 3.0]);
    let (mut p, mut a) = (
        Tensor::empty([2], (Kind::Uint8, tch::Device::Cpu)),
        Tensor::empty([1], (Kind::Float, tch::Device::Cpu)),
    );
    let r = ops::quantize_4bit_into(&bad, 64, QuantType::Nf4, &mut p, &mut a);
    assert!(matches!(r, Err(Error::NonFinite { index: 1, .. })), "{r:?}");
}

fn i8s(t: &Tensor) -> Vec<i8> {
    Vec::<i8>::try_from(&t.reshape([-1])).unwrap()
}

/// A row-major matrix for the int8 codec: activations-like values with rare large outliers,
/// some rows zero or tiny (subnormal absmax), a threshold (0 turns outliers off) and a dtype.
fn int8_case() -> impl Strategy<Value = (i64, i64, Vec<f32>, f32, Kind)> {
    (
        0i64..12,
        1i64..48,
        prop_oneof![Just(0.0f32), Just(6.0f32), Just(1.5f32), Just(3.3f32), 0.5f32..8.0],
        prop_oneof![Just(Kind::Float), Just(Kind::Half), Just(Kind::BFloat16)],
    )
        .prop_flat_map(|(rows, cols, threshold, kind)| {
            let n = (rows * cols) as usize;
            let v = prop_oneof![
                20 => -3.0f32..3.0,
                2 => -30.0f32..30.0,
                1 => Just(0.0f32),
                1 => Just(-0.0f32),
                1 => -1e-39f32..1e-39,
            ];
            (
                Just(rows),
                Just(cols),
                proptest::collection::vec(v, n),
                proptest::collection::vec(
                    prop_oneof![8 => Just(1.0f32), 1 => Just(0.0f32), 1 => Just(1e-38)],
                    rows as usize,
                ),
                Just(threshold),
                Just(kind),
            )
        })
        .prop_map(|(rows, cols, mut values, row_scale, threshold, kind)| {
            for (r, s) in row_scale.iter().enumerate() {
                values[r * cols as usize..(r + 1) * cols as usize].iter_mut().for_each(|v| *v *= s);
            }
            (rows, cols, values, threshold, kind)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn int8_rowwise_matches_the_reference((rows, cols, values, threshold, kind) in int8_case()) {
        let x = tensor(&values, &[rows, cols], kind);
        let (codes, scb, outlier_cols) = ops::quantize_int8_rowwise(&x, f64::from(threshold)).unwrap();
        // torch compares the threshold in the tensor's dtype.
        let t = stored(&[threshold], kind)[0];
        let want = int8::quantize_rowwise(&stored(&values, kind), cols as usize, t).unwrap();
        prop_assert_eq!(codes.size(), vec![rows, cols]);
        prop_assert_eq!(i8s(&codes), want.codes.clone());
        prop_assert_eq!(bits(&f32s(&scb)), bits(&want.scb));
        let cols_got: Vec<usize> =
            Vec::<i64>::try_from(&outlier_cols).unwrap().into_iter().map(|c| c as usize).collect();
        prop_assert_eq!(cols_got, want.outlier_cols);

        let deq = ops::dequantize_int8_rowwise(&codes, &scb).unwrap();
        let want_deq = int8::dequantize_rowwise(&want.codes, &want.scb, cols as usize).unwrap();
        prop_assert_eq!(bits(&f32s(&deq)), bits(&want_deq));
        let q = Quantized8bit { codes, scb };
        let w = int8::matmul_weight(&want.codes, &want.scb, cols as usize).unwrap();
        prop_assert_eq!(bits(&f32s(&q.dequantize(Kind::Float).unwrap())), bits(&w));
        prop_assert_eq!(bits16(&q.dequantize(Kind::BFloat16).unwrap()), want_bf16(&w));
        prop_assert_eq!(bits16(&q.dequantize(Kind::Half).unwrap()), want_f16(&w));
    }
}

#[test]
fn int8_weights_are_quantized_through_float16() {
    let w = Tensor::randn([24, 40], (Kind::Float, tch::Device::Cpu)) * 0.05;
    let q = Quantized8bit::quantize(&w).unwrap();
    assert_eq!(q.shape(), [24, 40]);
    let want = int8::quantize_rowwise(&int8::round_to_f16(&f32s(&w)), 40, 0.0).unwrap();
    assert_eq!(q.codes_vec().unwrap(), want.codes);
    assert_eq!(bits(&q.scb_vec().unwrap()), bits(&want.scb));
    let back = Quantized8bit::from_codec(&want.codes, &want.scb, [24, 40]).unwrap();
    assert!(back.codes.equal(&q.codes) && back.scb.equal(&q.scb));
    for kind in [Kind::Half, Kind::BFloat16] {
        let q16 = Quantized8bit::quantize(&w.to_kind(kind)).unwrap();
        let want = int8::quantize_rowwise(&int8::round_to_f16(&stored(&f32s(&w), kind)), 40, 0.0).unwrap();
        assert_eq!(q16.codes_vec().unwrap(), want.codes, "{kind:?}");
    }
}

#[test]
fn int8_bad_inputs_are_typed_errors() {
    let mut v = vec![0.5f32; 60];
    v[17] = 70000.0;
    let r = Quantized8bit::quantize(&Tensor::from_slice(&v).view([6, 10]));
    assert!(matches!(r, Err(Error::Float16Range { index: 17, value }) if value == 70000.0), "{r:?}");
    let r = Quantized8bit::quantize(&Tensor::from_slice(&v[..10]));
    assert!(matches!(r, Err(Error::BadTensor { what: "weight", .. })), "{r:?}");
    let r = ops::quantize_int8_rowwise(&Tensor::from_slice(&[1i64, 2]).view([1, 2]), 0.0);
    assert!(matches!(r, Err(Error::BadTensor { what: "input", .. })), "{r:?}");
    let r = Quantized8bit::from_codec(&[1, 2, 3], &[1.0], [1, 2]);
    assert!(matches!(r, Err(Error::Length { what: "int8 codes", .. })), "{r:?}");
    let q = Quantized8bit {
        codes: Tensor::from_slice(&[1i8, 2]).view([1, 2]),
        scb: Tensor::from_slice(&[1.0f32, 2.0]),
    };
    let r = q.dequantize(Kind::Float);
    assert!(matches!(&r, Err(Error::Torch(m)) if m.contains("SCB")), "{r:?}");
}
