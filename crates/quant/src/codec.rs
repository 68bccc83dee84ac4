//! The 4-bit codec in plain Rust on slices: the readable reference that defines every bit, and
//! that the fast libtorch path is tested against.
//!
//! The rules follow bitsandbytes' CUDA kernel (`kQuantizeBlockwise`), which makes most real
//! checkpoints:
//!
//! - the input is cut into blocks of `blocksize` elements (the last one may be short);
//! - `absmax = max |x|` over the block, in f32;
//! - each value is scaled by *multiplying* with `1 / absmax` (f32 division, then f32 product);
//! - the scaled value is mapped by comparisons against fixed thresholds with a strict `>`, so a
//!   value exactly on a threshold takes the lower code;
//! - element `2j` goes to the high nibble of byte `j`, element `2j + 1` to the low nibble; an odd
//!   count pads the last low nibble with the code of `0.0 * scale`.
//!
//! Where bitsandbytes' CPU path (0.50.2, a torch-ops implementation) differs, nibble follows the
//! kernel above. `tests/bnb_parity.rs` recomputes each CPU rule and fails on any difference that
//! none of them explains. Measured on its golden files:
//!
//! - a short last block is divided by absmax instead of multiplied by its reciprocal;
//! - an all-zero block gets NF4 nibble 7 (the kernel: 0);
//! - absmax is clamped to at least 1e-38 (the kernel's reciprocal overflows for subnormal absmax);
//! - FP4 thresholds are torch's f32 midpoints, one ulp from the kernel's literals, and a negative
//!   value exactly on one takes the larger magnitude; a few NF4 midpoints also differ in the last bit;
//! - FP4 gives the sign bit to tiny positive values that round to zero and not to tiny negative
//!   ones (the kernel sets it by the sign of x);
//! - the 8-bit map of double quantization goes through a 65536-bin lookup table instead of the
//!   kernel's search (codes within one bin of the nearest, more often near zero);
//! - the double-quantization offset is torch's f32 `mean()`, which this module's f64 mean matches
//!   except for an ulp on some inputs (pass bitsandbytes' offset to [`double_quant`] to compare).
//!
//! Dequantization is exact by definition: `code[nibble] * absmax` in f32, then round to nearest
//! even into the output dtype.
//!
//! Edge cases, all defined:
//! - **NaN or ±inf** anywhere in the input is an error ([`Error::NonFinite`] with the element
//!   index). bitsandbytes silently produces garbage there (NaN maps to code 0 = -absmax; an
//!   infinite absmax zeroes the whole block).
//! - **All-zero block**: absmax 0, scale +inf, `0 * inf` is NaN, which fails every comparison:
//!   NF4 code 0 and FP4 code 0. Both dequantize to zero (`code * 0`; NF4 gives -0.0).
//! - **-0.0** quantizes like 0.0 (NF4 code 7, FP4 code 0: the FP4 sign bit is set only for
//!   `x < 0`).
//! - **Subnormal absmax**: `1 / absmax` may overflow to +inf; exact zeros in such a block then
//!   take code 0 (dequantizing to -absmax for NF4, an error below 1.2e-38), as on CUDA.
//! - **Empty input**: no bytes, no blocks. **One element**: one byte, one block.

#![allow(
    clippy::excessive_precision,
    reason = "code values and thresholds keep bitsandbytes' published digits, so they can be compared"
)]

use crate::Error;

/// The two 4-bit code books.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of a standard normal, for normally distributed weights.
    Nf4,
    /// 4-bit float, e2m1 with a sign bit (bit 3).
    Fp4,
}

impl QuantType {
    /// bitsandbytes' name (`nf4` / `fp4`), as in `quant_state.bitsandbytes__nf4`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, indexed by nibble.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODE,
            QuantType::Fp4 => &FP4_CODE,
        }
    }

    /// Nibble of a value already scaled into [-1, 1].
    #[inline]
    pub fn encode(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => encode_nf4(x),
            QuantType::Fp4 => encode_fp4(x),
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::UnknownQuantType(other.to_owned())),
        }
    }
}

/// NF4 code values by nibble (bitsandbytes' table, as f32).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

const FP4_RAW: [f32; 16] =
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// FP4 code values by nibble: the e2m1 magnitudes divided by their maximum, 12.
pub const FP4_CODE: [f32; 16] = {
    let mut out = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = FP4_RAW[i] / 12.0;
        i += 1;
    }
    out
};

/// NF4 encoding: a binary tree over the midpoints between adjacent codes (bitsandbytes'
/// thresholds, as f32 literals). NaN fails every `>` and lands on code 0.
#[inline]
pub fn encode_nf4(x: f32) -> u8 {
    if x > 0.039_790_15 {
        if x > 0.389_312_54 {
            if x > 0.642_786_9 {
                if x > 0.861_478_4 { 0b1111 } else { 0b1110 }
            } else if x > 0.501_663_4 {
                0b1101
            } else {
                0b1100
            }
        } else if x > 0.203_521_25 {
            if x > 0.292_013_77 { 0b1011 } else { 0b1010 }
        } else if x > 0.120_255_25 {
            0b1001
        } else {
            0b1000
        }
    } else if x > -0.339_679_43 {
        if x > -0.137_911_73 {
            if x > -0.045_525_018 { 0b0111 } else { 0b0110 }
        } else if x > -0.234_607_4 {
            0b0101
        } else {
            0b0100
        }
    } else if x > -0.610_632_9 {
        if x > -0.459_995_27 { 0b0011 } else { 0b0010 }
    } else if x > -0.848_096_4 {
        0b0001
    } else {
        0b0000
    }
}

/// FP4 encoding: sign bit for `x < 0`, then a tree over |x| with bitsandbytes' thresholds.
#[inline]
pub fn encode_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let m = if a > 0.291_666_67 {
        if a > 0.583_333 {
            if a > 0.833_333_3 { 0b0011 } else { 0b0010 }
        } else if a > 0.416_666_7 {
            0b0101
        } else {
            0b0100
        }
    } else if a > 0.085_937_5 {
        if a > 0.208_333_33 { 0b0111 } else { 0b0110 }
    } else if a > 0.002_604_17 {
        0b0001
    } else {
        0b0000
    };
    m + sign
}

/// Block sizes bitsandbytes accepts for 4-bit and blockwise 8-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Check a block size against [`BLOCKSIZES`].
pub fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    if BLOCKSIZES.contains(&blocksize) { Ok(()) } else { Err(Error::Blocksize(blocksize)) }
}

/// Number of blocks for `n` elements.
pub fn n_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Number of packed bytes for `n` 4-bit elements.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

fn check_finite(x: &[f32]) -> Result<(), Error> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(Error::NonFinite { index, value: x[index] }),
        None => Ok(()),
    }
}

/// `max |x|` of a block, as the kernel reduces it.
#[inline]
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantize to 4 bits: packed nibbles (`ceil(n/2)` bytes) and one f32 absmax per block.
pub fn quantize_4bit(x: &[f32], blocksize: usize, qt: QuantType) -> Result<(Vec<u8>, Vec<f32>), Error> {
    check_blocksize(blocksize)?;
    check_finite(x)?;
    let mut packed = vec![0u8; packed_len(x.len())];
    let mut absmax = Vec::with_capacity(n_blocks(x.len(), blocksize));
    // blocksize is even, so a block never splits a byte.
    for (b, block) in x.chunks(blocksize).enumerate() {
        let m = block_absmax(block);
        absmax.push(m);
        let scale = 1.0f32 / m;
        let out = &mut packed[b * blocksize / 2..];
        for (j, pair) in block.chunks(2).enumerate() {
            let hi = qt.encode(pair[0] * scale);
            let lo = qt.encode(pair.get(1).copied().unwrap_or(0.0) * scale);
            out[j] = (hi << 4) | lo;
        }
    }
    Ok((packed, absmax))
}

/// Dequantize 4-bit codes into `out` (f32); `out.len()` is the element count.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    qt: QuantType,
    out: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    let n = out.len();
    if packed.len() != packed_len(n) {
        return Err(Error::Length { what: "packed bytes", expected: packed_len(n), got: packed.len() });
    }
    if absmax.len() != n_blocks(n, blocksize) {
        return Err(Error::Length { what: "absmax", expected: n_blocks(n, blocksize), got: absmax.len() });
    }
    let code = qt.code();
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let nib = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        *o = code[nib as usize] * absmax[i / blocksize];
    }
    Ok(())
}

/// The signed "dynamic" 8-bit map of bitsandbytes (`create_dynamic_map(signed=True)`), sorted,
/// as f32 bit patterns. Generated by bitsandbytes itself; `tests/bnb_parity.rs` checks it against
/// the installed package.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| DYNAMIC_MAP_BITS.map(f32::from_bits))
}

include!("dynamic_map.rs");

/// Index of the code for `x` in a sorted 256-entry map, by the kernel's search: seven halving
/// steps from the middle, then the nearer of the two bracketing codes, ties to the code on the
/// side of the last comparison's pivot.
#[inline]
pub fn encode_8bit(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: i32 = 127;
    let mut upper_pivot: i32 = 255;
    let mut lower_pivot: i32 = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot as usize];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = code[pivot as usize];
        step >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[255];
    }
    if lower_pivot == 0 {
        lower = code[0];
    }
    let idx = if x > val {
        let mid = (upper + val) * 0.5;
        if x > mid { upper_pivot } else { pivot }
    } else {
        let mid = (lower + val) * 0.5;
        if x < mid { lower_pivot } else { pivot }
    };
    idx as u8
}

/// Blockwise 8-bit quantization with a 256-entry map: codes and one f32 absmax per block.
pub fn quantize_blockwise_8bit(
    x: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>), Error> {
    check_blocksize(blocksize)?;
    check_finite(x)?;
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(n_blocks(x.len(), blocksize));
    for block in x.chunks(blocksize) {
        let m = block_absmax(block);
        absmax.push(m);
        let scale = 1.0f32 / m;
        q.extend(block.iter().map(|v| encode_8bit(code, v * scale)));
    }
    Ok((q, absmax))
}

/// Inverse of [`quantize_blockwise_8bit`]: `code[q] * absmax[block]`.
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> Result<Vec<f32>, Error> {
    check_blocksize(blocksize)?;
    if absmax.len() != n_blocks(q.len(), blocksize) {
        return Err(Error::Length {
            what: "nested absmax",
            expected: n_blocks(q.len(), blocksize),
            got: absmax.len(),
        });
    }
    Ok(q.iter().enumerate().map(|(i, &c)| code[c as usize] * absmax[i / blocksize]).collect())
}

/// Block size of the second quantization of the absmax values (bitsandbytes' fixed choice).
pub const NESTED_BLOCKSIZE: usize = 256;

/// Absmax values quantized once more (double quantization): 8-bit codes of `absmax - offset`
/// with the dynamic map, one f32 scale per 256 codes, and the offset.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per block of the 4-bit data.
    pub codes: Vec<u8>,
    /// One f32 scale per [`NESTED_BLOCKSIZE`] codes.
    pub nested_absmax: Vec<f32>,
    /// Mean of the original absmax values, subtracted before quantizing.
    pub offset: f32,
}

/// Mean of the absmax values as bitsandbytes takes it (`absmax.mean()` in f32). Computed here in
/// f64 and rounded once; torch's f32 reduction can differ in the last bit on long inputs, so the
/// fast path (which calls torch's own mean) is the one to use for byte parity on such inputs.
pub fn absmax_offset(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return f32::NAN;
    }
    (absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / absmax.len() as f64) as f32
}

/// Double-quantize absmax values; `offset` defaults to [`absmax_offset`].
pub fn double_quant(absmax: &[f32], offset: Option<f32>) -> Result<NestedAbsmax, Error> {
    let offset = offset.unwrap_or_else(|| absmax_offset(absmax));
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, dynamic_map(), NESTED_BLOCKSIZE)?;
    Ok(NestedAbsmax { codes, nested_absmax, offset })
}

impl NestedAbsmax {
    /// The absmax values the 4-bit data dequantizes with: `code[q] * nested_absmax + offset`.
    pub fn absmax(&self) -> Result<Vec<f32>, Error> {
        let mut a =
            dequantize_blockwise_8bit(&self.codes, &self.nested_absmax, dynamic_map(), NESTED_BLOCKSIZE)?;
        for v in &mut a {
            *v += self.offset;
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_codes_round_trip_through_the_tree() {
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(encode_nf4(c) as usize, i, "code {c}");
        }
        for (i, &c) in FP4_CODE.iter().enumerate() {
            // -0.0 (nibble 8) encodes as +0.0 (nibble 0): the sign bit needs x < 0.
            let want = if i == 8 { 0 } else { i };
            assert_eq!(encode_fp4(c) as usize, want, "code {c}");
        }
    }

    #[test]
    fn thresholds_take_the_lower_code() {
        // The first NF4 threshold is the midpoint of codes 7 and 8.
        assert_eq!(encode_nf4(0.039_790_15), 7);
        assert_eq!(encode_nf4(f32::from_bits(0.039_790_15f32.to_bits() + 1)), 8);
        assert_eq!(encode_nf4(f32::NAN), 0);
        assert_eq!(encode_fp4(f32::NAN), 0);
        assert_eq!(encode_nf4(-0.0), 7);
        assert_eq!(encode_fp4(-0.0), 0);
    }

    #[test]
    fn nibble_order_and_padding() {
        // Two blocks of 32 plus one odd element.
        let mut x = vec![0.0f32; 65];
        x[0] = 1.0; // high nibble of byte 0
        x[1] = -1.0; // low nibble of byte 0
        x[64] = 2.0; // third block, alone: high nibble of byte 32, padded low nibble
        let (p, a) = quantize_4bit(&x, 32, QuantType::Nf4).expect("quantize");
        assert_eq!(p.len(), 33);
        assert_eq!(a, vec![1.0, 0.0, 2.0]);
        assert_eq!(p[0], 0xF0);
        assert_eq!(p[1], 0x77, "zeros in a non-zero block are code 7");
        assert_eq!(p[16], 0x00, "an all-zero block is code 0 (0 * inf = NaN)");
        assert_eq!(p[32], 0xF7, "the pad nibble is the code of 0.0");
        let mut back = vec![0.0f32; 65];
        dequantize_4bit(&p, &a, 32, QuantType::Nf4, &mut back).expect("dequantize");
        assert_eq!(back, x);
    }

    #[test]
    fn empty_and_single() {
        let (p, a) = quantize_4bit(&[], 64, QuantType::Nf4).expect("empty");
        assert!(p.is_empty() && a.is_empty());
        let (p, a) = quantize_4bit(&[-3.0], 64, QuantType::Fp4).expect("one");
        assert_eq!((p, a), (vec![0xB0], vec![3.0]));
    }

    #[test]
    fn non_finite_is_an_error_naming_the_element() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; 100];
            x[77] = bad;
            match quantize_4bit(&x, 64, QuantType::Nf4) {
                Err(Error::NonFinite { index: 77, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_blocksize_and_lengths_are_errors() {
        assert!(matches!(quantize_4bit(&[1.0], 48, QuantType::Nf4), Err(Error::Blocksize(48))));
        let mut out = vec![0.0; 10];
        assert!(matches!(
            dequantize_4bit(&[0; 4], &[1.0], 64, QuantType::Nf4, &mut out),
            Err(Error::Length { what: "packed bytes", expected: 5, got: 4 })
        ));
    }

    #[test]
    fn dynamic_map_is_sorted_signed_and_complete() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((m[0], m[255]), (-0.992_968_75, 1.0));
        assert!(m.contains(&0.0));
        for (i, &c) in m.iter().enumerate() {
            if i != 127 || c != 0.0 {
                assert_eq!(encode_8bit(m, c) as usize, i, "code {c}");
            }
        }
    }

    #[test]
    fn double_quant_reconstructs_absmax_closely() {
        let absmax: Vec<f32> = (0..1000).map(|i| 0.01 + (i as f32 * 0.37).sin().abs()).collect();
        let n = double_quant(&absmax, None).expect("dq");
        assert_eq!(n.codes.len(), 1000);
        assert_eq!(n.nested_absmax.len(), 4);
        let back = n.absmax().expect("absmax");
        // Error bound: half the widest gap of the map, times the nested scale.
        let m = dynamic_map();
        let half_gap = m.windows(2).map(|w| w[1] - w[0]).fold(0.0f32, f32::max) / 2.0;
        for (i, (a, b)) in absmax.iter().zip(&back).enumerate() {
            let bound = half_gap * n.nested_absmax[i / NESTED_BLOCKSIZE] * 1.0001;
            assert!((a - b).abs() <= bound, "{i}: {a} vs {b} (bound {bound})");
        }
    }
}
