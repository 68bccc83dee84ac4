//! The codec on CUDA tensors (the `cuda` feature): NF4/FP4 quantization with double quant,
//! dequantization that reads double-quantized absmax directly, and a fused 4-bit gemv for
//! batch-1 generation, as kernels in `csrc/cuda/` run on torch's current stream.
//!
//! Every function here takes tensors on any device: on a CUDA device it runs the kernels, on
//! the CPU it falls back to [`crate::ops`] (the same bytes, by the same rules of
//! [`crate::codec`]). Results stay on the input's device.

use tch::{Device, Kind, Tensor};

use crate::Error;
use crate::codec::{NESTED_BLOCKSIZE, QuantType};
use crate::ops::{
    self, Absmax4, Offset, QuantizeOptions, Quantized4bit, blocksize_i64, check, out_code, ptr, qt_code, take,
};

mod ffi {
    use std::ffi::{c_char, c_void};

    // Same conventions as `ops`: tensors cross as `torch::Tensor*`, outputs are owned by the
    // caller, errors are malloc'd strings freed by `nibble_quant_free_error`.
    unsafe extern "C" {
        pub fn nibble_cuda_quantize_4bit(
            input: *const c_void,
            blocksize: i64,
            qt: i32,
            packed: *mut *mut c_void,
            absmax: *mut *mut c_void,
            bad_index: *mut i64,
        ) -> *mut c_char;
        pub fn nibble_cuda_dequantize_4bit(
            packed: *const c_void,
            absmax: *const c_void,
            nested: *const c_void,
            map: *const c_void,
            offset: f32,
            n: i64,
            blocksize: i64,
            qt: i32,
            out: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_register_cuda_dequantize(
            f: unsafe extern "C" fn(
                *const c_void,
                *const c_void,
                *const c_void,
                *const c_void,
                f32,
                i64,
                i64,
                i32,
                i32,
                *mut *mut c_void,
            ) -> *mut c_char,
        );
        pub fn nibble_cuda_quantize_8bit(
            input: *const c_void,
            code: *const c_void,
            blocksize: i64,
            use_mean: i32,
            offset: *mut f32,
            codes: *mut *mut c_void,
            absmax: *mut *mut c_void,
            bad_index: *mut i64,
        ) -> *mut c_char;
        pub fn nibble_cuda_dequantize_8bit(
            codes: *const c_void,
            absmax: *const c_void,
            code: *const c_void,
            blocksize: i64,
            offset: f32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_cuda_gemv_4bit(
            x: *const c_void,
            packed: *const c_void,
            absmax: *const c_void,
            nested: *const c_void,
            map: *const c_void,
            offset: f32,
            out_features: i64,
            in_features: i64,
            blocksize: i64,
            qt: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
    }
}

/// Whether libtorch sees a CUDA device (false on a machine without one, or when libtorch_cuda
/// was not linked into the binary: see the crate docs).
pub fn is_available() -> bool {
    tch::Cuda::is_available()
}

fn on_cuda(t: &Tensor) -> bool {
    t.defined() && t.device().is_cuda()
}

fn non_finite(x: &Tensor, index: i64, offset: f32) -> Error {
    let value = x
        .f_view([-1])
        .and_then(|flat| flat.f_double_value(&[index]))
        .map(|v| v as f32 - offset)
        .unwrap_or(f32::NAN);
    Error::NonFinite { index: index as usize, value }
}

/// [`ops::quantize_4bit`] on any device: packed uint8 `[ceil(n/2), 1]` and f32 absmax, on the
/// input's device.
pub fn quantize_4bit(x: &Tensor, blocksize: usize, qt: QuantType) -> Result<(Tensor, Tensor), Error> {
    if !on_cuda(x) {
        return ops::quantize_4bit(x, blocksize, qt);
    }
    let bs = blocksize_i64(blocksize)?;
    let mut packed = std::ptr::null_mut();
    let mut absmax = std::ptr::null_mut();
    let mut bad = -1i64;
    // SAFETY: `x` lives for the call; the out-pointers are valid locals.
    let err = unsafe {
        ffi::nibble_cuda_quantize_4bit(ptr(x), bs, qt_code(qt), &mut packed, &mut absmax, &mut bad)
    };
    check(err)?;
    if bad >= 0 {
        return Err(non_finite(x, bad, 0.0));
    }
    Ok((take(packed, "packed")?, take(absmax, "absmax")?))
}

/// [`ops::quantize_blockwise_8bit`] on any device (`code` on the same device as `x`).
pub fn quantize_blockwise_8bit(
    x: &Tensor,
    code: &Tensor,
    blocksize: usize,
    offset: Offset,
) -> Result<(Tensor, Tensor, f32), Error> {
    if !on_cuda(x) {
        return ops::quantize_blockwise_8bit(x, code, blocksize, offset);
    }
    let bs = blocksize_i64(blocksize)?;
    let (use_mean, mut off) = match offset {
        Offset::Mean => (1, 0.0f32),
        Offset::Given(v) => (0, v),
    };
    let mut codes = std::ptr::null_mut();
    let mut absmax = std::ptr::null_mut();
    let mut bad = -1i64;
    // SAFETY: the tensors live for the call; the out-pointers are valid locals.
    let err = unsafe {
        ffi::nibble_cuda_quantize_8bit(
            ptr(x),
            ptr(code),
            bs,
            use_mean,
            &mut off,
            &mut codes,
            &mut absmax,
            &mut bad,
        )
    };
    check(err)?;
    if bad >= 0 {
        return Err(non_finite(x, bad, off));
    }
    Ok((take(codes, "codes")?, take(absmax, "absmax")?, off))
}

/// [`ops::dequantize_blockwise_8bit`] on any device.
pub fn dequantize_blockwise_8bit(
    codes: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: usize,
    offset: f32,
) -> Result<Tensor, Error> {
    if !on_cuda(codes) {
        return ops::dequantize_blockwise_8bit(codes, absmax, code, blocksize, offset);
    }
    let bs = blocksize_i64(blocksize)?;
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe {
        ffi::nibble_cuda_dequantize_8bit(ptr(codes), ptr(absmax), ptr(code), bs, offset, &mut result)
    };
    check(err)?;
    take(result, "absmax")
}

/// The dynamic 8-bit map on `device`.
pub fn dynamic_map_on(device: Device) -> Result<Tensor, Error> {
    Ok(ops::dynamic_map_tensor().f_to_device(device)?)
}

/// The block-scale operands of the kernels: f32 absmax or uint8 codes; with double quant the
/// nested absmax and the map; the offset.
type ScaleOperands = (Tensor, Option<(Tensor, Tensor)>, f32);

/// The block-scale operands of `absmax` for a kernel on `device`.
fn scale_operands(absmax: &Absmax4, device: Device) -> Result<ScaleOperands, Error> {
    Ok(match absmax {
        Absmax4::Plain(a) => (a.shallow_clone(), None, 0.0),
        Absmax4::Nested { codes, nested_absmax, offset } => {
            (codes.shallow_clone(), Some((nested_absmax.shallow_clone(), dynamic_map_on(device)?)), *offset)
        }
    })
}

/// Dequantize `n` 4-bit values to a 1-D tensor of `kind` (Float, Half or BFloat16), reading the
/// block scales as stored (plain or double quantized). On CUDA the nested absmax is decoded inside
/// the kernel; on the CPU it is reconstructed first, then [`ops::dequantize_4bit`] runs.
pub fn dequantize_4bit(
    packed: &Tensor,
    absmax: &Absmax4,
    n: usize,
    blocksize: usize,
    qt: QuantType,
    kind: Kind,
) -> Result<Tensor, Error> {
    if !on_cuda(packed) {
        let a = match absmax {
            Absmax4::Plain(a) => a.shallow_clone(),
            Absmax4::Nested { codes, nested_absmax, offset } => ops::dequantize_blockwise_8bit(
                codes,
                nested_absmax,
                &ops::dynamic_map_tensor(),
                NESTED_BLOCKSIZE,
                *offset,
            )?,
        };
        return ops::dequantize_4bit(packed, &a, n, blocksize, qt, kind);
    }
    let bs = blocksize_i64(blocksize)?;
    let out = out_code(kind)?;
    let n = i64::try_from(n)
        .map_err(|_| Error::BadTensor { what: "element count", problem: format!("{n} is too large") })?;
    let (a, nested, offset) = scale_operands(absmax, packed.device())?;
    let (nested_ptr, map_ptr) =
        nested.as_ref().map_or((std::ptr::null(), std::ptr::null()), |(n, m)| (ptr(n), ptr(m)));
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call (nested/map may be null, which the C++ side reads as
    // plain absmax); `result` is a valid local.
    let err = unsafe {
        ffi::nibble_cuda_dequantize_4bit(
            ptr(packed),
            ptr(&a),
            nested_ptr,
            map_ptr,
            offset,
            n,
            bs,
            qt_code(qt),
            out,
            &mut result,
        )
    };
    check(err)?;
    take(result, "dequantized")
}

/// [`Quantized4bit::quantize`] on any device: the packed codes and block scales stay on `x`'s
/// device (double quantization with the device's own `mean()`, as bitsandbytes takes it).
pub fn quantize(x: &Tensor, opts: QuantizeOptions) -> Result<Quantized4bit, Error> {
    if !on_cuda(x) {
        return Quantized4bit::quantize(x, opts);
    }
    let (packed, absmax) = quantize_4bit(x, opts.blocksize, opts.quant_type)?;
    let absmax = if opts.double_quant {
        let map = dynamic_map_on(x.device())?;
        let (codes, nested_absmax, offset) =
            quantize_blockwise_8bit(&absmax, &map, NESTED_BLOCKSIZE, Offset::Mean)?;
        Absmax4::Nested { codes, nested_absmax, offset }
    } else {
        Absmax4::Plain(absmax)
    };
    Ok(Quantized4bit {
        packed,
        absmax,
        shape: x.size(),
        dtype: x.f_kind()?,
        blocksize: opts.blocksize,
        quant_type: opts.quant_type,
    })
}

/// [`Quantized4bit::dequantize`] on any device, in the original shape.
pub fn dequantize(q: &Quantized4bit, kind: Kind) -> Result<Tensor, Error> {
    let flat = dequantize_4bit(&q.packed, &q.absmax, q.numel(), q.blocksize, q.quant_type, kind)?;
    Ok(flat.f_view(q.shape.as_slice())?)
}

/// `x W^T` for one input row `x [..., in]` (f32/f16/bf16) and a 4-bit weight `[out, in]`: the
/// fused kernel on CUDA (W never materialised; f32 accumulation), `x.linear(dequantize(W))` on
/// the CPU. The result has `x`'s dtype and shape with the last dimension `out`.
pub fn gemv_4bit(x: &Tensor, w: &Quantized4bit) -> Result<Tensor, Error> {
    let [out_features, in_features] = w.shape[..] else {
        return Err(Error::BadTensor {
            what: "weight",
            problem: format!("must be 2-D [out, in], got shape {:?}", w.shape),
        });
    };
    if !on_cuda(x) {
        let weight = dequantize(w, x.f_kind()?)?;
        return Ok(x.f_linear::<&Tensor>(&weight, None)?);
    }
    let bs = blocksize_i64(w.blocksize)?;
    let (a, nested, offset) = scale_operands(&w.absmax, x.device())?;
    let (nested_ptr, map_ptr) =
        nested.as_ref().map_or((std::ptr::null(), std::ptr::null()), |(n, m)| (ptr(n), ptr(m)));
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call (nested/map may be null); `result` is a valid local.
    let err = unsafe {
        ffi::nibble_cuda_gemv_4bit(
            ptr(x),
            ptr(&w.packed),
            ptr(&a),
            nested_ptr,
            map_ptr,
            offset,
            out_features,
            in_features,
            bs,
            qt_code(w.quant_type),
            &mut result,
        )
    };
    check(err)?;
    take(result, "gemv output")
}

/// Hands the kernels' 4-bit dequantize to the quantized linears' C++ autograd Functions (built
/// without CUDA), once per process; [`crate::linear::Linear4bit`] calls it before running on a GPU.
pub(crate) fn register_kernels() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a function pointer with the signature the C++ side declares.
    ONCE.call_once(|| unsafe { ffi::nibble_register_cuda_dequantize(ffi::nibble_cuda_dequantize_4bit) });
}
