//! LLM.int8() row-wise quantization in plain Rust on slices: the readable reference that defines
//! every code of an 8-bit weight (and of the activations an 8-bit linear quantizes), which the
//! libtorch fast path is tested against.
//!
//! The rules are those of bitsandbytes' `int8_vectorwise_quant` (0.50.2, its torch-ops
//! implementation, which runs on the CPU and defines the bytes of the goldens here):
//!
//! - a matrix `[rows, cols]` is quantized row by row; `SCB[r] = max |x|` over the row, in f32;
//! - the scale is `127 * (1 / SCB[r])`: torch's `127.0 / t` is `t.reciprocal() * 127`, two f32
//!   roundings, which differ from a correctly rounded `127 / SCB` in the last bit for about a
//!   quarter of the values;
//! - `code = round_half_even(x * scale)`, in f32; a product that is not finite (a zero row gives
//!   `0 * inf`, a row whose absmax is subnormal an infinite scale) becomes code 0, which is what
//!   torch's float-to-int8 conversion gives on x86 and what CUDA's `__float2int_rn` truncates to;
//! - with a threshold `t > 0` (LLM.int8's outlier decomposition, applied to activations): every
//!   element with `|x| >= t` is an outlier; outliers are set to zero before the row absmax, and
//!   every column holding an outlier (in any row) gets code 0 in every row. Those columns are
//!   returned (ascending) so the caller can compute them in floating point.
//!
//! Where bitsandbytes' CUDA kernel (`kInt8VectorQuant`) differs, nibble follows the CPU rules:
//! the kernel computes the scale with `__fdividef(127, absmax)`, an approximate reciprocal that
//! cannot be reproduced off the GPU, so a value that lands within an ulp of a rounding boundary
//! may take the neighbouring code there. Everything else (absmax, outliers, ties to even) agrees.
//!
//! bitsandbytes always quantizes in float16: the weight is cast with `weight.to(float16)` before
//! its codes are made, and activations are cast to float16 before theirs. This module works on
//! the values it is given; [`round_to_f16`] does that cast. A threshold is compared in the data's
//! own dtype by torch (for float16 data, `6.0` is exact; another threshold is first rounded to
//! float16): pass it rounded the same way.
//!
//! Two dequantizations, both bitsandbytes', which may differ in the last bit:
//! - [`dequantize_rowwise`]: `(code * SCB) * (1/127)`, `int8_vectorwise_dequant` (transformers'
//!   `dequantize`, and the outlier columns of the LLM.int8 matmul);
//! - [`matmul_weight`]: `code * (SCB * (1/127))`, the weight `MatMul8bitLt` backward (and the
//!   CPU training path) multiplies with.
//!
//! The int8 matmul's product `C = A_codes B_codes^T` (exact in int32) is scaled back with
//! `C * (SCA * SCB) * MM_DEQUANT_SCALE`; see [`MM_DEQUANT_SCALE`] for the constant.
//!
//! Edge cases, all defined:
//! - **NaN or ±inf** in the input is an error ([`Error::NonFinite`]): for a weight it means the
//!   float16 cast overflowed (|w| > 65504), which bitsandbytes turns into a row of zeros.
//! - **All-zero row**: SCB 0, every code 0; it dequantizes to zeros.
//! - **Empty input**: no rows. Zero columns with rows is a [`Error::Length`] error.

use crate::Error;

/// `1/127` as bitsandbytes writes it (`7.874015718698502e-3`), which is the f32 nearest `1/127`.
#[allow(clippy::excessive_precision, reason = "bitsandbytes' digits, so they can be compared")]
pub const INV_127: f32 = 7.874_015_718_698_502e-3;

/// The scale of an int8 matmul's int32 product, `1/(127*127)` as the f32 nearest it
/// (`6.200012e-05f`, CUDA's `MM_DEQUANT_CONST`). bitsandbytes' CPU path (its torch ops) writes
/// `6.200124e-05` instead, a transposed digit that makes every int8 product 1.8e-5 (relative)
/// too large; nibble uses the kernel's value and documents the difference.
pub const MM_DEQUANT_SCALE: f32 = 6.200_012e-5;

/// The constant bitsandbytes' CPU (torch-ops) `int8_mm_dequant` multiplies with; for tests that
/// recompute its numbers.
pub const BNB_CPU_MM_DEQUANT_SCALE: f32 = 6.200_124e-5;

/// A matrix quantized row-wise to int8, with its scales and outlier columns.
#[derive(Debug, Clone, PartialEq)]
pub struct RowwiseInt8 {
    /// `rows * cols` codes in `[-127, 127]`, row-major.
    pub codes: Vec<i8>,
    /// One absmax per row (bitsandbytes' `SCB` for a weight, `SCA` for activations).
    pub scb: Vec<f32>,
    /// Columns holding an outlier (`|x| >= threshold`), ascending; empty without a threshold.
    pub outlier_cols: Vec<usize>,
}

/// The values rounded to nearest even into float16 and back (exactly): what bitsandbytes
/// quantizes. Values beyond float16's range become ±inf.
pub fn round_to_f16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

fn rows_of(len: usize, cols: usize) -> Result<usize, Error> {
    if cols == 0 {
        return if len == 0 { Ok(0) } else { Err(Error::Length { what: "columns", expected: 1, got: 0 }) };
    }
    if !len.is_multiple_of(cols) {
        return Err(Error::Length {
            what: "row-major matrix",
            expected: len.div_ceil(cols) * cols,
            got: len,
        });
    }
    Ok(len / cols)
}

/// The code of a value already multiplied by its row's scale.
#[inline]
pub fn encode_int8(scaled: f32) -> i8 {
    let q = scaled.round_ties_even();
    // |x * scale| <= 127 (1 + 2^-23)^2 < 127.5 for finite products, so `q` fits.
    if q.is_finite() { q as i8 } else { 0 }
}

/// The scale of a row: `127 * (1 / absmax)` in f32 (torch's `127.0 / absmax`).
#[inline]
pub fn row_scale(absmax: f32) -> f32 {
    (1.0f32 / absmax) * 127.0
}

/// Quantize a row-major `[rows, cols]` matrix row-wise to int8, with LLM.int8's outlier
/// columns when `threshold > 0`.
pub fn quantize_rowwise(x: &[f32], cols: usize, threshold: f32) -> Result<RowwiseInt8, Error> {
    let rows = rows_of(x.len(), cols)?;
    if let Some(index) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { index, value: x[index] });
    }
    let is_outlier = |v: f32| threshold > 0.0 && v.abs() >= threshold;
    let mut outlier_col = vec![false; cols];
    for row in x.chunks(cols.max(1)) {
        for (c, &v) in row.iter().enumerate() {
            outlier_col[c] |= is_outlier(v);
        }
    }
    let mut codes = vec![0i8; x.len()];
    let mut scb = Vec::with_capacity(rows);
    for (r, row) in x.chunks(cols.max(1)).enumerate() {
        // Outliers are zeroed before the absmax, so they do not stretch the row's scale.
        let kept = |v: f32| if is_outlier(v) { 0.0 } else { v };
        let absmax = row.iter().fold(0.0f32, |m, &v| m.max(kept(v).abs()));
        scb.push(absmax);
        let scale = row_scale(absmax);
        for (c, &v) in row.iter().enumerate() {
            codes[r * cols + c] = if outlier_col[c] { 0 } else { encode_int8(kept(v) * scale) };
        }
    }
    let outlier_cols = outlier_col.iter().enumerate().filter_map(|(c, &o)| o.then_some(c)).collect();
    Ok(RowwiseInt8 { codes, scb, outlier_cols })
}

fn check_scales(codes: &[i8], scb: &[f32], cols: usize) -> Result<(), Error> {
    let rows = rows_of(codes.len(), cols)?;
    if scb.len() != rows {
        return Err(Error::Length { what: "SCB", expected: rows, got: scb.len() });
    }
    Ok(())
}

/// bitsandbytes' `int8_vectorwise_dequant`: `(code * SCB[row]) * (1/127)` in f32.
pub fn dequantize_rowwise(codes: &[i8], scb: &[f32], cols: usize) -> Result<Vec<f32>, Error> {
    check_scales(codes, scb, cols)?;
    Ok(codes.iter().enumerate().map(|(i, &q)| (f32::from(q) * scb[i / cols]) * INV_127).collect())
}

/// The dequantized weight an 8-bit matmul's backward multiplies with (bitsandbytes'
/// `CB * (SCB * (1/127))`), in f32.
pub fn matmul_weight(codes: &[i8], scb: &[f32], cols: usize) -> Result<Vec<f32>, Error> {
    check_scales(codes, scb, cols)?;
    Ok(codes.iter().enumerate().map(|(i, &q)| f32::from(q) * (scb[i / cols] * INV_127)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_f32_nearest() {
        assert_eq!(INV_127, 1.0f32 / 127.0);
        assert_eq!(MM_DEQUANT_SCALE, (1.0f64 / 16129.0) as f32);
        let rel = (f64::from(BNB_CPU_MM_DEQUANT_SCALE) * 16129.0) - 1.0;
        assert!((rel - 1.8e-5).abs() < 1e-6, "{rel}");
    }

    #[test]
    fn rows_scale_to_127_with_ties_to_even() {
        let q = quantize_rowwise(&[1.0, -2.0, 4.0, 0.0, 0.5, 0.0], 3, 0.0).expect("quantize");
        assert_eq!(q.scb, vec![4.0, 0.5]);
        // 1 * 127/4 = 31.75 -> 32; -2 * 31.75 = -63.5 -> -64 (even).
        assert_eq!(q.codes, vec![32, -64, 127, 0, 127, 0]);
        assert!(q.outlier_cols.is_empty());
        let back = dequantize_rowwise(&q.codes, &q.scb, 3).expect("dequantize");
        assert_eq!(back[2], 4.0);
    }

    #[test]
    fn zero_rows_and_subnormal_rows_are_code_zero() {
        let q = quantize_rowwise(&[0.0, -0.0, 1e-40, -3e-41], 2, 0.0).expect("quantize");
        assert_eq!(q.codes, vec![0, 0, 0, 0]);
        assert_eq!(q.scb, vec![0.0, 1e-40]);
        assert_eq!(dequantize_rowwise(&q.codes, &q.scb, 2).expect("dq"), vec![0.0; 4]);
    }

    #[test]
    fn outliers_leave_the_absmax_and_zero_their_columns() {
        #[rustfmt::skip]
        let x = [
            1.0, 7.0, 0.5, 2.0,
            -6.0, 1.0, 1.0, 0.25,
            1.0, 5.0, 2.0, 1.0,
        ];
        let q = quantize_rowwise(&x, 4, 6.0).expect("quantize");
        assert_eq!(q.outlier_cols, vec![0, 1]);
        // Row 1's absmax skips the outlier -6 but not the plain 1.0s; row 2 keeps the 5.0 of
        // column 1 in its absmax although the column's codes are zeroed.
        assert_eq!(q.scb, vec![2.0, 1.0, 5.0]);
        assert_eq!(&q.codes[0..4], &[0, 0, 32, 127]);
        assert_eq!(&q.codes[4..8], &[0, 0, 127, 32]);
        assert_eq!(&q.codes[8..12], &[0, 0, 51, 25]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            quantize_rowwise(&[1.0, f32::INFINITY], 2, 6.0),
            Err(Error::NonFinite { index: 1, .. })
        ));
        assert!(matches!(quantize_rowwise(&[1.0; 5], 2, 0.0), Err(Error::Length { .. })));
        assert!(matches!(quantize_rowwise(&[1.0], 0, 0.0), Err(Error::Length { .. })));
        assert!(quantize_rowwise(&[], 0, 0.0).expect("empty").codes.is_empty());
        assert!(matches!(dequantize_rowwise(&[1; 4], &[1.0], 2), Err(Error::Length { what: "SCB", .. })));
    }

    #[test]
    fn the_two_dequantizations_differ_only_in_the_last_bit() {
        let codes: Vec<i8> = (-127..=127).collect();
        let scb = vec![0.123_456_7f32];
        let a = dequantize_rowwise(&codes, &scb, codes.len()).expect("a");
        let b = matmul_weight(&codes, &scb, codes.len()).expect("b");
        for (x, y) in a.iter().zip(&b) {
            assert!((x.to_bits() as i64 - y.to_bits() as i64).abs() <= 1, "{x} vs {y}");
        }
    }
}
