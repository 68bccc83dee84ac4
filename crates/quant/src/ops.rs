//! The fast path of the codec: 4-bit and blockwise 8-bit quantization as libtorch ops on `tch`
//! tensors (C++ in `csrc/quant_ops.cpp`, parallel over blocks), producing the same bytes as the
//! reference in [`crate::codec`].
//!
//! Inputs must be contiguous CPU tensors; 4-bit quantization takes f32, f16 and bf16 (converted
//! exactly to f32 first), dequantization writes f32, f16 or bf16 (`code * absmax` in f32, then
//! rounded to nearest even). Double quantization takes its offset from torch's own
//! `absmax.mean()`, as bitsandbytes does, so the bytes match bitsandbytes on long inputs too.
//!
//! The int8 (LLM.int8) half, [`crate::ops::quantize_int8_rowwise`] and [`crate::ops::Quantized8bit`] (C++ in
//! `csrc/int8_ops.cpp`), is built from ATen ops in the order bitsandbytes' torch backend runs
//! them, so it takes tensors on any device and rounds as bitsandbytes' CPU path does; it gives
//! the same codes as [`crate::int8`].

use std::ffi::{CStr, c_char, c_void};

use tch::{Device, Kind, Tensor};

use crate::Error;
use crate::codec::{self, NESTED_BLOCKSIZE, QuantType};

mod ffi {
    use std::ffi::{c_char, c_void};

    // Tensors cross as `torch::Tensor*` (tch's `C_tensor`); outputs are owned by the caller.
    unsafe extern "C" {
        pub fn nibble_quant_free_error(err: *mut c_char);
        pub fn nibble_quantize_bf16_octaves(qt: i32) -> i32;
        pub fn nibble_quantize_4bit(
            input: *const c_void,
            blocksize: i64,
            qt: i32,
            packed: *mut *mut c_void,
            absmax: *mut *mut c_void,
            bad_index: *mut i64,
        ) -> *mut c_char;
        pub fn nibble_dequantize_4bit(
            packed: *const c_void,
            absmax: *const c_void,
            n: i64,
            blocksize: i64,
            qt: i32,
            out: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_quantize_4bit_into(
            input: *const c_void,
            blocksize: i64,
            qt: i32,
            packed: *mut c_void,
            absmax: *mut c_void,
            bad_index: *mut i64,
        ) -> *mut c_char;
        pub fn nibble_dequantize_4bit_into(
            packed: *const c_void,
            absmax: *const c_void,
            blocksize: i64,
            qt: i32,
            out: *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_quantize_8bit(
            input: *const c_void,
            code: *const c_void,
            blocksize: i64,
            use_mean: i32,
            offset: *mut f32,
            codes: *mut *mut c_void,
            absmax: *mut *mut c_void,
            bad_index: *mut i64,
        ) -> *mut c_char;
        pub fn nibble_dequantize_8bit(
            codes: *const c_void,
            absmax: *const c_void,
            code: *const c_void,
            blocksize: i64,
            offset: f32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_cpu_native_16bit_matmul(out: i32) -> i32;
        pub fn nibble_dense_upcast_forward(
            x: *const c_void,
            weight: *const c_void,
            bias: *const c_void,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_upcast_input_linear(
            x: *const c_void,
            weight: *const c_void,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_lora_kernels_available() -> i32;
        pub fn nibble_attention_available() -> i32;
        pub fn nibble_attention(
            q: *const c_void,
            k: *const c_void,
            v: *const c_void,
            causal: i32,
            scale: f64,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_lora_rank_product(
            op: i32,
            a: *const c_void,
            b: *const c_void,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_lora_update(
            x: *const c_void,
            base: *const c_void,
            a: *const c_void,
            b: *const c_void,
            scaling: f64,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_linear4bit_forward(
            x: *const c_void,
            packed: *const c_void,
            absmax: *const c_void,
            bias: *const c_void,
            out_features: i64,
            in_features: i64,
            blocksize: i64,
            qt: i32,
            round_to: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_int8_quantize_rowwise(
            x: *const c_void,
            threshold: f64,
            codes: *mut *mut c_void,
            scb: *mut *mut c_void,
            cols: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_int8_dequantize(
            codes: *const c_void,
            scb: *const c_void,
            matmul: i32,
            out: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn nibble_linear8bit_forward(
            x: *const c_void,
            codes: *const c_void,
            scb: *const c_void,
            bias: *const c_void,
            threshold: f64,
            mode: i32,
            result: *mut *mut c_void,
        ) -> *mut c_char;
    }
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(torch_message(&e))
    }
}

/// A libtorch error's message without the C++ stack trace libtorch appends ("Exception raised
/// from ..., frame #0 ..."), which tells a user nothing and buries the one line that matters.
pub fn torch_message(e: &tch::TchError) -> String {
    let full = e.to_string();
    match full.find("\nException raised from") {
        Some(i) => full[..i].to_owned(),
        None => full,
    }
}

/// Turn a C error string into `Err(Error::Torch)`, freeing it.
pub(crate) fn check(err: *mut c_char) -> Result<(), Error> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error is a NUL-terminated string malloc'd by the C++ side; it is read
    // once and freed once, by the matching free function.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: see above; `err` is not used after this.
    unsafe { ffi::nibble_quant_free_error(err) };
    Err(Error::Torch(msg))
}

/// Take ownership of a tensor the C++ side allocated with `new`.
pub(crate) fn take(ptr: *mut c_void, what: &'static str) -> Result<Tensor, Error> {
    if ptr.is_null() {
        return Err(Error::Torch(format!("{what}: the C++ op returned no tensor")));
    }
    // SAFETY: a non-null output pointer is a fresh `new torch::Tensor` that nothing else owns;
    // tch's `Tensor` frees it with `delete` on drop.
    Ok(unsafe { Tensor::from_ptr(ptr.cast()) })
}

pub(crate) fn ptr(t: &Tensor) -> *const c_void {
    t.as_ptr().cast()
}

pub(crate) fn qt_code(qt: QuantType) -> i32 {
    match qt {
        QuantType::Nf4 => 0,
        QuantType::Fp4 => 1,
    }
}

pub(crate) fn out_code(kind: Kind) -> Result<i32, Error> {
    match kind {
        Kind::Float => Ok(0),
        Kind::Half => Ok(1),
        Kind::BFloat16 => Ok(2),
        other => Err(Error::BadTensor {
            what: "output dtype",
            problem: format!("cannot dequantize to {other:?} (use Float, Half or BFloat16)"),
        }),
    }
}

pub(crate) fn blocksize_i64(blocksize: usize) -> Result<i64, Error> {
    codec::check_blocksize(blocksize)?;
    // The supported block sizes are at most 4096.
    Ok(blocksize as i64)
}

/// Check that `t` is a contiguous CPU tensor of one of `kinds`.
fn check_input(t: &Tensor, what: &'static str, kinds: &[Kind]) -> Result<(), Error> {
    let bad = |problem: String| Err(Error::BadTensor { what, problem });
    if !t.defined() {
        return bad("undefined tensor".into());
    }
    if t.device() != Device::Cpu {
        return bad(format!(
            "must be on the CPU (CUDA tensors go through `quant::cuda`, feature `cuda`), got {:?}",
            t.device()
        ));
    }
    let kind = t.f_kind()?;
    if !kinds.contains(&kind) {
        return bad(format!("dtype {kind:?} is not supported (expected one of {kinds:?})"));
    }
    if !t.is_contiguous() {
        return bad("must be contiguous (call .contiguous() first)".into());
    }
    Ok(())
}

/// The error for element `index` of `x`, whose value minus `offset` is not finite.
fn non_finite(x: &Tensor, index: i64, offset: f32) -> Error {
    let value = x
        .f_view([-1])
        .and_then(|flat| flat.f_double_value(&[index]))
        .map(|v| v as f32 - offset)
        .unwrap_or(f32::NAN);
    Error::NonFinite { index: index as usize, value }
}

/// 4-bit quantization of a whole tensor (flattened): packed uint8 `[ceil(n/2), 1]` and f32 absmax
/// `[ceil(n/blocksize)]`, byte-identical to [`codec::quantize_4bit`].
pub fn quantize_4bit(x: &Tensor, blocksize: usize, qt: QuantType) -> Result<(Tensor, Tensor), Error> {
    let bs = blocksize_i64(blocksize)?;
    check_input(x, "input", &[Kind::Float, Kind::Half, Kind::BFloat16])?;
    let mut packed = std::ptr::null_mut();
    let mut absmax = std::ptr::null_mut();
    let mut bad = -1i64;
    // SAFETY: `x` is a live tensor for the call; the out-pointers are valid locals.
    let err =
        unsafe { ffi::nibble_quantize_4bit(ptr(x), bs, qt_code(qt), &mut packed, &mut absmax, &mut bad) };
    check(err)?;
    if bad >= 0 {
        return Err(non_finite(x, bad, 0.0));
    }
    Ok((take(packed, "packed")?, take(absmax, "absmax")?))
}

/// Whether bf16 weights of `qt` quantize on the fast octave-table kernel (x86-64 with AVX2 and
/// F16C, not turned off by `NIBBLE_QUANT_F32_SEARCH=1`), so a test or a benchmark can tell which
/// path it measured; the bytes are the same either way.
pub fn bf16_octave_kernel(qt: QuantType) -> bool {
    // SAFETY: a pure query of the C++ side's dispatch, no pointers.
    unsafe { ffi::nibble_quantize_bf16_octaves(qt_code(qt)) == 1 }
}

/// Quantize into existing contiguous CPU tensors (`packed`: Uint8 with `(n + 1) / 2` elements,
/// `absmax`: Float with one per block; shapes kept), so that a caller reusing buffers pays no
/// allocation or page faults. On an error their contents are unspecified.
pub fn quantize_4bit_into(
    x: &Tensor,
    blocksize: usize,
    qt: QuantType,
    packed: &mut Tensor,
    absmax: &mut Tensor,
) -> Result<(), Error> {
    let bs = blocksize_i64(blocksize)?;
    check_input(x, "input", &[Kind::Float, Kind::Half, Kind::BFloat16])?;
    check_input(packed, "packed", &[Kind::Uint8])?;
    check_input(absmax, "absmax", &[Kind::Float])?;
    let mut bad = -1i64;
    // SAFETY: the tensors live for the call and the outputs are borrowed mutably, so nothing else
    // reads them while the op writes; `bad` is a valid local.
    let err = unsafe {
        ffi::nibble_quantize_4bit_into(
            ptr(x),
            bs,
            qt_code(qt),
            packed.as_mut_ptr().cast(),
            absmax.as_mut_ptr().cast(),
            &mut bad,
        )
    };
    check(err)?;
    if bad >= 0 {
        return Err(non_finite(x, bad, 0.0));
    }
    Ok(())
}

/// Dequantize `n` 4-bit values into a 1-D tensor of `kind` (Float, Half or BFloat16): exactly
/// [`codec::dequantize_4bit`], then rounded to nearest even for 16-bit kinds.
pub fn dequantize_4bit(
    packed: &Tensor,
    absmax: &Tensor,
    n: usize,
    blocksize: usize,
    qt: QuantType,
    kind: Kind,
) -> Result<Tensor, Error> {
    let bs = blocksize_i64(blocksize)?;
    let out = out_code(kind)?;
    check_input(packed, "packed", &[Kind::Uint8])?;
    check_input(absmax, "absmax", &[Kind::Float])?;
    let n = i64::try_from(n)
        .map_err(|_| Error::BadTensor { what: "element count", problem: format!("{n} is too large") })?;
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe {
        ffi::nibble_dequantize_4bit(ptr(packed), ptr(absmax), n, bs, qt_code(qt), out, &mut result)
    };
    check(err)?;
    take(result, "dequantized")
}

/// Dequantize into an existing contiguous CPU tensor of Float, Half or BFloat16, whose element
/// count is the number of 4-bit values (its shape is kept); avoids allocating (and faulting in)
/// a fresh output per call.
pub fn dequantize_4bit_into(
    packed: &Tensor,
    absmax: &Tensor,
    blocksize: usize,
    qt: QuantType,
    out: &mut Tensor,
) -> Result<(), Error> {
    let bs = blocksize_i64(blocksize)?;
    check_input(packed, "packed", &[Kind::Uint8])?;
    check_input(absmax, "absmax", &[Kind::Float])?;
    check_input(out, "out", &[Kind::Float, Kind::Half, Kind::BFloat16])?;
    // SAFETY: the tensors live for the call; `out` is borrowed mutably, so nothing else reads it
    // while the op writes its data.
    let err = unsafe {
        ffi::nibble_dequantize_4bit_into(ptr(packed), ptr(absmax), bs, qt_code(qt), out.as_mut_ptr().cast())
    };
    check(err)
}

/// bitsandbytes' signed dynamic 8-bit map ([`codec::dynamic_map`]) as a 256-element f32 tensor.
pub fn dynamic_map_tensor() -> Tensor {
    Tensor::from_slice(codec::dynamic_map().as_slice())
}

/// Where the offset of a blockwise 8-bit quantization comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offset {
    /// torch's `input.mean()` in f32, as bitsandbytes takes it for double quantization.
    Mean,
    /// A given value (0.0 for a plain blockwise quantization).
    Given(f32),
}

/// Blockwise 8-bit quantization of `x - offset` (f32, contiguous CPU) with a 256-entry sorted
/// map: codes uint8 `[n]`, f32 absmax per block, and the offset used. Same bytes as
/// [`codec::quantize_blockwise_8bit`] on the centered values.
pub fn quantize_blockwise_8bit(
    x: &Tensor,
    code: &Tensor,
    blocksize: usize,
    offset: Offset,
) -> Result<(Tensor, Tensor, f32), Error> {
    let bs = blocksize_i64(blocksize)?;
    check_input(x, "input", &[Kind::Float])?;
    check_input(code, "code", &[Kind::Float])?;
    let (use_mean, mut off) = match offset {
        Offset::Mean => (1, 0.0f32),
        Offset::Given(v) => (0, v),
    };
    let mut codes = std::ptr::null_mut();
    let mut absmax = std::ptr::null_mut();
    let mut bad = -1i64;
    // SAFETY: the tensors live for the call; the out-pointers are valid locals.
    let err = unsafe {
        ffi::nibble_quantize_8bit(
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

/// Inverse of [`quantize_blockwise_8bit`]: f32 `code[q] * absmax[block] + offset`.
pub fn dequantize_blockwise_8bit(
    codes: &Tensor,
    absmax: &Tensor,
    code: &Tensor,
    blocksize: usize,
    offset: f32,
) -> Result<Tensor, Error> {
    let bs = blocksize_i64(blocksize)?;
    check_input(codes, "codes", &[Kind::Uint8])?;
    check_input(absmax, "nested absmax", &[Kind::Float])?;
    check_input(code, "code", &[Kind::Float])?;
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err =
        unsafe { ffi::nibble_dequantize_8bit(ptr(codes), ptr(absmax), ptr(code), bs, offset, &mut result) };
    check(err)?;
    take(result, "absmax")
}

/// Options of [`Quantized4bit::quantize`] (bitsandbytes' defaults: NF4, blocksize 64, no double
/// quantization).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per absmax block (32..4096, a power of two).
    pub blocksize: usize,
    /// Quantize the absmax values once more (8-bit, nested blocksize 256, mean offset).
    pub double_quant: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { quant_type: QuantType::Nf4, blocksize: 64, double_quant: false }
    }
}

/// The block scales of a 4-bit tensor.
#[derive(Debug)]
pub enum Absmax4 {
    /// One f32 per block.
    Plain(Tensor),
    /// Double quantized: 8-bit codes of `absmax - offset` with the dynamic map.
    Nested {
        /// uint8, one per block of the 4-bit data.
        codes: Tensor,
        /// f32, one per [`NESTED_BLOCKSIZE`] codes.
        nested_absmax: Tensor,
        /// torch's `absmax.mean()`, subtracted before quantizing.
        offset: f32,
    },
}

/// A tensor quantized to 4 bits, with what it takes to dequantize it.
#[derive(Debug)]
pub struct Quantized4bit {
    /// uint8 `[ceil(n/2), 1]`: element `2j` in the high nibble of byte `j`.
    pub packed: Tensor,
    /// The block scales.
    pub absmax: Absmax4,
    /// Shape of the original tensor.
    pub shape: Vec<i64>,
    /// dtype of the original tensor.
    pub dtype: Kind,
    /// Elements per block.
    pub blocksize: usize,
    /// NF4 or FP4.
    pub quant_type: QuantType,
}

impl Quantized4bit {
    /// Quantize a contiguous f32/f16/bf16 CPU tensor of any shape.
    pub fn quantize(x: &Tensor, opts: QuantizeOptions) -> Result<Self, Error> {
        let (packed, absmax) = quantize_4bit(x, opts.blocksize, opts.quant_type)?;
        let absmax = if opts.double_quant {
            let (codes, nested_absmax, offset) =
                quantize_blockwise_8bit(&absmax, &dynamic_map_tensor(), NESTED_BLOCKSIZE, Offset::Mean)?;
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

    /// Number of elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product()
    }

    /// The f32 absmax per block (reconstructed from the nested codes with double quantization).
    pub fn absmax_f32(&self) -> Result<Tensor, Error> {
        match &self.absmax {
            Absmax4::Plain(a) => Ok(a.shallow_clone()),
            #[cfg(feature = "cuda")]
            Absmax4::Nested { codes, nested_absmax, offset } if codes.device().is_cuda() => {
                crate::cuda::dequantize_blockwise_8bit(
                    codes,
                    nested_absmax,
                    &crate::cuda::dynamic_map_on(codes.device())?,
                    NESTED_BLOCKSIZE,
                    *offset,
                )
            }
            Absmax4::Nested { codes, nested_absmax, offset } => dequantize_blockwise_8bit(
                codes,
                nested_absmax,
                &dynamic_map_tensor(),
                NESTED_BLOCKSIZE,
                *offset,
            ),
        }
    }

    /// The same tensor with its codes and scales on `device` (a model quantized while loading
    /// on the CPU, then placed by the device map).
    pub fn to_device(&self, device: Device) -> Result<Quantized4bit, Error> {
        self.map_tensors(|t| t.f_to_device(device))
    }

    /// The same tensor in page-locked host memory, so copies to the GPU `device` run
    /// asynchronously (a CPU-offloaded layer streams its codes to the GPU on every product).
    pub fn pin_memory(&self, device: Device) -> Result<Quantized4bit, Error> {
        self.map_tensors(|t| t.f_pin_memory(device))
    }

    /// The same tensor with `f` applied to each of its tensors.
    fn map_tensors(
        &self,
        f: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>,
    ) -> Result<Quantized4bit, Error> {
        let absmax = match &self.absmax {
            Absmax4::Plain(a) => Absmax4::Plain(f(a)?),
            Absmax4::Nested { codes, nested_absmax, offset } => {
                Absmax4::Nested { codes: f(codes)?, nested_absmax: f(nested_absmax)?, offset: *offset }
            }
        };
        Ok(Quantized4bit {
            packed: f(&self.packed)?,
            absmax,
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
            quant_type: self.quant_type,
        })
    }

    /// Dequantize to `kind` (Float, Half or BFloat16) in the original shape.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor, Error> {
        let absmax = self.absmax_f32()?;
        let flat =
            dequantize_4bit(&self.packed, &absmax, self.numel(), self.blocksize, self.quant_type, kind)?;
        Ok(flat.f_view(self.shape.as_slice())?)
    }

    /// Build from the codec's plain buffers (packed bytes, and plain or nested absmax).
    pub fn from_codec(
        packed: &[u8],
        absmax: CodecAbsmax<'_>,
        shape: &[i64],
        dtype: Kind,
        blocksize: usize,
        quant_type: QuantType,
    ) -> Result<Self, Error> {
        codec::check_blocksize(blocksize)?;
        let numel: usize = shape.iter().map(|&d| d.max(0) as usize).product();
        if packed.len() != codec::packed_len(numel) {
            return Err(Error::Length {
                what: "packed bytes",
                expected: codec::packed_len(numel),
                got: packed.len(),
            });
        }
        let blocks = codec::n_blocks(numel, blocksize);
        let absmax = match absmax {
            CodecAbsmax::Plain(a) => {
                if a.len() != blocks {
                    return Err(Error::Length { what: "absmax", expected: blocks, got: a.len() });
                }
                Absmax4::Plain(Tensor::from_slice(a))
            }
            CodecAbsmax::Nested(n) => {
                if n.codes.len() != blocks {
                    return Err(Error::Length { what: "absmax codes", expected: blocks, got: n.codes.len() });
                }
                let nested = codec::n_blocks(blocks, NESTED_BLOCKSIZE);
                if n.nested_absmax.len() != nested {
                    return Err(Error::Length {
                        what: "nested absmax",
                        expected: nested,
                        got: n.nested_absmax.len(),
                    });
                }
                Absmax4::Nested {
                    codes: Tensor::from_slice(&n.codes),
                    nested_absmax: Tensor::from_slice(&n.nested_absmax),
                    offset: n.offset,
                }
            }
        };
        let packed = Tensor::from_slice(packed).f_view([packed.len() as i64, 1])?;
        Ok(Quantized4bit { packed, absmax, shape: shape.to_vec(), dtype, blocksize, quant_type })
    }

    /// The packed bytes as a plain buffer.
    pub fn packed_bytes(&self) -> Result<Vec<u8>, Error> {
        Ok(Vec::<u8>::try_from(&self.packed.f_view([-1])?)?)
    }

    /// The block scales as the codec's plain buffers.
    pub fn codec_absmax(&self) -> Result<CodecAbsmaxOwned, Error> {
        Ok(match &self.absmax {
            Absmax4::Plain(a) => CodecAbsmaxOwned::Plain(Vec::<f32>::try_from(a)?),
            Absmax4::Nested { codes, nested_absmax, offset } => {
                CodecAbsmaxOwned::Nested(codec::NestedAbsmax {
                    codes: Vec::<u8>::try_from(codes)?,
                    nested_absmax: Vec::<f32>::try_from(nested_absmax)?,
                    offset: *offset,
                })
            }
        })
    }
}

/// Block scales as the codec's plain buffers, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum CodecAbsmax<'a> {
    /// One f32 per block.
    Plain(&'a [f32]),
    /// Double quantized.
    Nested(&'a codec::NestedAbsmax),
}

/// Block scales as the codec's plain buffers, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum CodecAbsmaxOwned {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantized.
    Nested(codec::NestedAbsmax),
}

/// How 16-bit (bf16/f16) matmuls run on the CPU; a process-wide choice (`CpuMatmul::set`),
/// made by the application (sft takes it from the recipe's `cpu_matmul`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMatmul {
    /// f32 where the CPU has no native GEMM for the dtype (the default).
    Auto,
    /// Always torch's own 16-bit kernels, e.g. to match another stack bit for bit.
    Native,
    /// Always f32.
    F32,
}

static CPU_MATMUL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl CpuMatmul {
    /// The policy by name: `auto`, `native` or `f32`.
    pub fn parse(name: &str) -> Option<CpuMatmul> {
        match name {
            "auto" => Some(CpuMatmul::Auto),
            "native" => Some(CpuMatmul::Native),
            "f32" => Some(CpuMatmul::F32),
            _ => None,
        }
    }

    /// Make this the policy of the process.
    pub fn set(self) {
        CPU_MATMUL.store(self as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The policy of the process.
    pub fn current() -> CpuMatmul {
        match CPU_MATMUL.load(std::sync::atomic::Ordering::Relaxed) {
            1 => CpuMatmul::Native,
            2 => CpuMatmul::F32,
            _ => CpuMatmul::Auto,
        }
    }
}

/// Whether matmuls in `kind` on `device` should run in f32 (inputs upcast, result rounded back):
/// on CPUs without native bf16/f16 GEMMs (AVX2 machines), torch's 16-bit products run 4x to 100x
/// slower than f32 ones (`scripts/bench_matmul.py`), so nibble computes them in f32 unless the
/// policy is [`CpuMatmul::Native`]. The f32 accumulation is what a 16-bit GEMM does internally; only
/// the operands' (exact) upcast and the summation order differ.
pub fn matmul_in_f32(kind: Kind, device: Device) -> bool {
    matmul_in_f32_under(CpuMatmul::current(), kind, device)
}

/// What [`matmul_in_f32`] answers under `policy`, whatever the process's policy is: lets a
/// planner (a memory estimate) ask about a run's policy without making it the process's.
pub fn matmul_in_f32_under(policy: CpuMatmul, kind: Kind, device: Device) -> bool {
    let code = match kind {
        Kind::BFloat16 => 2,
        Kind::Half => 1,
        _ => return false,
    };
    if device != Device::Cpu {
        return false;
    }
    match policy {
        CpuMatmul::Native => false,
        CpuMatmul::F32 => true,
        // SAFETY: a pure query of CPU features.
        CpuMatmul::Auto => unsafe { ffi::nibble_cpu_native_16bit_matmul(code) == 0 },
    }
}

/// `x W^T + b` for a frozen 16-bit CPU weight, computed in f32 and returned in `x`'s dtype,
/// through a C++ autograd Function that keeps only the 16-bit weight for backward.
pub fn dense_upcast_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, Error> {
    let mut result = std::ptr::null_mut();
    let bias_ptr = bias.map_or(std::ptr::null(), ptr);
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe { ffi::nibble_dense_upcast_forward(ptr(x), ptr(weight), bias_ptr, &mut result) };
    check(err)?;
    take(result, "output")
}

/// `x.to(w.kind()) W^T` for a weight wider than its input (PEFT's f32 LoRA factors on 16-bit
/// activations), keeping `x` itself for backward instead of its upcast copy: half the saved
/// activation bytes of every adapter, and one copy where several adapters share an input.
pub fn upcast_input_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor, Error> {
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe { ffi::nibble_upcast_input_linear(ptr(x), ptr(weight), &mut result) };
    check(err)?;
    take(result, "output")
}

/// The widest LoRA rank [`lora_update`] takes.
pub const LORA_KERNEL_MAX_RANK: i64 = 64;

/// Whether [`lora_update`] can run here (an x86-64 CPU with AVX-512 F, BW and VL): elsewhere adapters keep
/// torch's products.
pub fn lora_kernels_available() -> bool {
    // SAFETY: a pure query of CPU features.
    unsafe { ffi::nibble_lora_kernels_available() == 1 }
}

/// Whether an adapter without dropout runs as [`lora_update`] under `policy`: f32 factors of rank
/// 1 to [`LORA_KERNEL_MAX_RANK`] on bf16 or f32 activations on the CPU, a CPU with the kernels,
/// and a policy other than [`CpuMatmul::Native`] (which keeps torch's products, PEFT's bits).
/// What `lora::LoraLinear` takes and what the step floor assumes, from one place.
pub fn lora_kernels_fit(
    policy: CpuMatmul,
    factors: Kind,
    activations: Kind,
    device: Device,
    rank: i64,
) -> bool {
    factors == Kind::Float
        && matches!(activations, Kind::BFloat16 | Kind::Float)
        && device == Device::Cpu
        && (1..=LORA_KERNEL_MAX_RANK).contains(&rank)
        && policy != CpuMatmul::Native
        && lora_kernels_available()
}

/// `base + ((x A^T) * scaling) B^T` for f32 LoRA factors `a [r, in]`, `b [out, r]` (r up to
/// [`LORA_KERNEL_MAX_RANK`]) on CPU activations `x [.., in]` and the base layer's output
/// `base [.., out]` of one dtype (bf16 or f32), as one autograd Function whose six rank-r
/// products are nibble's AVX-512 kernels, reading 16-bit operands directly: PEFT's update up to
/// summation order (the update is rounded to the base dtype before the sum, as PEFT does; the
/// scaling multiplies the r-wide intermediate). `x` keeps its own dtype for backward; gradients
/// flow to `x`, `base`, `a` and `b`. Needs [`lora_kernels_available`].
pub fn lora_update(x: &Tensor, base: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor, Error> {
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe { ffi::nibble_lora_update(ptr(x), ptr(base), ptr(a), ptr(b), scaling, &mut result) };
    check(err)?;
    take(result, "output")
}

/// The three shapes of [`lora_update`]'s products, each `r` (<= [`LORA_KERNEL_MAX_RANK`]) wide
/// on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankProduct {
    /// `a [m, k] @ b [k, r]`: the input times A^T, the output gradient times B (`a` bf16 or f32).
    Contract,
    /// `a [m, r] @ b [r, n]`, in f32: the r-wide intermediate times B^T, its gradient times A.
    Expand,
    /// `a^T @ b` for `a [k, r]`, `b [k, n]` (bf16 or f32): the factors' gradients, summed over rows.
    Reduce,
}

/// One of [`lora_update`]'s products on its own, in f32 (what the step floor times for an
/// adapter's matmuls where the step runs these kernels). Needs [`lora_kernels_available`].
pub fn lora_rank_product(op: RankProduct, a: &Tensor, b: &Tensor) -> Result<Tensor, Error> {
    let code = match op {
        RankProduct::Contract => 0,
        RankProduct::Expand => 1,
        RankProduct::Reduce => 2,
    };
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe { ffi::nibble_lora_rank_product(code, ptr(a), ptr(b), &mut result) };
    check(err)?;
    take(result, "product")
}

/// Whether this CPU runs [`attention`] (AVX-512 F, BW, VL and BF16), so callers can pick it
/// over torch's flash attention where that multiplies bf16 through a generic path.
pub fn attention_available() -> bool {
    // SAFETY: a pure query of CPU features.
    unsafe { ffi::nibble_attention_available() == 1 }
}

/// The widest head [`attention`] takes.
pub const ATTENTION_MAX_HEAD_DIM: i64 = 256;

/// Whether attention over `kind` heads of `head_dim` on `device` runs as [`attention`] under
/// `policy` (the caller still owes: no mask beyond causality, no dropout, no soft-capping):
/// bf16 on a CPU with the kernels, an even head size up to [`ATTENTION_MAX_HEAD_DIM`], and a
/// policy other than [`CpuMatmul::Native`] (which keeps torch's flash attention, TRL's bits).
pub fn attention_fits(policy: CpuMatmul, kind: Kind, device: Device, head_dim: i64) -> bool {
    kind == Kind::BFloat16
        && device == Device::Cpu
        && head_dim % 2 == 0
        && (2..=ATTENTION_MAX_HEAD_DIM).contains(&head_dim)
        && policy != CpuMatmul::Native
        && attention_available()
}

/// `softmax(q k^T scale) v` with autograd, for bf16 CPU heads `q [B, H, Tq, D]`, `k`, `v [B, KVH,
/// Tk, D]` (H a multiple of KVH: grouped-query heads share keys without being repeated), causal
/// where asked (the queries are the last Tq of the Tk positions), no other mask, no dropout, D
/// even and at most [`ATTENTION_MAX_HEAD_DIM`]. torch's flash attention to float noise, with
/// every product a native bf16 dot product (`csrc/attention_ops.cpp`); needs
/// [`attention_available`]. The output is `[B, H, Tq, D]` over `[B, Tq, H, D]` memory, so
/// joining its heads is a view.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<Tensor, Error> {
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call; `result` is a valid local.
    let err = unsafe { ffi::nibble_attention(ptr(q), ptr(k), ptr(v), i32::from(causal), scale, &mut result) };
    check(err)?;
    take(result, "attention output")
}

/// Linear4bit's forward through the C++ autograd Function: `x [..., in]` (already in the compute
/// dtype, or f32 with `round_to` the 16-bit compute dtype whose weight values the f32 matmuls
/// use), weight `[out, in]` as packed bytes and f32 absmax, optional bias `[out]`.
#[allow(clippy::too_many_arguments, reason = "a thin FFI wrapper; the layer is the API")]
pub(crate) fn linear4bit_forward(
    x: &Tensor,
    packed: &Tensor,
    absmax: &Tensor,
    bias: Option<&Tensor>,
    out_features: i64,
    in_features: i64,
    blocksize: usize,
    qt: QuantType,
    round_to: Option<Kind>,
) -> Result<Tensor, Error> {
    let bs = blocksize_i64(blocksize)?;
    let round_to = match round_to {
        None => -1,
        Some(k) => out_code(k)?,
    };
    // CPU weights dequantize in C++ here; CUDA ones through the kernels `quant::cuda` registers
    // (feature `cuda`; without it the C++ side says so).
    if x.device() != packed.device() || absmax.device() != packed.device() {
        return Err(Error::BadTensor {
            what: "input",
            problem: format!(
                "input on {:?}, weight on {:?}, absmax on {:?}: all must be on one device",
                x.device(),
                packed.device(),
                absmax.device()
            ),
        });
    }
    let bias_ptr = bias.map_or(std::ptr::null(), ptr);
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call (bias may be null, which the C++ side checks); the
    // Function keeps its own references to what it saves.
    let err = unsafe {
        ffi::nibble_linear4bit_forward(
            ptr(x),
            ptr(packed),
            ptr(absmax),
            bias_ptr,
            out_features,
            in_features,
            bs,
            qt_code(qt),
            round_to,
            &mut result,
        )
    };
    check(err)?;
    take(result, "output")
}

/// Row-wise int8 quantization (LLM.int8) of a 2-D float tensor `[rows, cols]` (Float, Half or
/// BFloat16, on any device; `threshold` is compared in the tensor's dtype, as torch compares):
/// int8 codes `[rows, cols]`, f32 absmax per row, and the outlier columns (Int64, ascending;
/// empty when `threshold <= 0`). The same codes as [`crate::int8::quantize_rowwise`] on the same values.
pub fn quantize_int8_rowwise(x: &Tensor, threshold: f64) -> Result<(Tensor, Tensor, Tensor), Error> {
    check_float_matrix(x, "input")?;
    let (mut codes, mut scb, mut cols) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: `x` lives for the call; the out-pointers are valid locals.
    let err =
        unsafe { ffi::nibble_int8_quantize_rowwise(ptr(x), threshold, &mut codes, &mut scb, &mut cols) };
    check(err)?;
    Ok((take(codes, "codes")?, take(scb, "SCB")?, take(cols, "outlier columns")?))
}

fn check_float_matrix(x: &Tensor, what: &'static str) -> Result<(), Error> {
    let bad = |problem: String| Err(Error::BadTensor { what, problem });
    if !x.defined() {
        return bad("undefined tensor".into());
    }
    let kind = x.f_kind()?;
    if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
        return bad(format!("dtype {kind:?} is not supported (use Float, Half or BFloat16)"));
    }
    if x.dim() != 2 {
        return bad(format!("must be 2-D [rows, cols], got shape {:?}", x.size()));
    }
    Ok(())
}

/// bitsandbytes' `int8_vectorwise_dequant` of int8 codes `[rows, cols]` with f32 `scb [rows]`:
/// f32 `(code * SCB) * (1/127)`, as [`crate::int8::dequantize_rowwise`].
pub fn dequantize_int8_rowwise(codes: &Tensor, scb: &Tensor) -> Result<Tensor, Error> {
    int8_dequantize(codes, scb, 0, Kind::Float)
}

fn int8_dequantize(codes: &Tensor, scb: &Tensor, matmul: i32, kind: Kind) -> Result<Tensor, Error> {
    let out = out_code(kind)?;
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call (the C++ side checks their dtypes and shapes).
    let err = unsafe { ffi::nibble_int8_dequantize(ptr(codes), ptr(scb), matmul, out, &mut result) };
    check(err)?;
    take(result, "dequantized")
}

/// A weight quantized row-wise to int8 (bitsandbytes' `Int8Params` once quantized): what an
/// 8-bit linear layer holds.
#[derive(Debug)]
pub struct Quantized8bit {
    /// int8 `[out, in]` (bitsandbytes' `CB`, the checkpoint's `weight`).
    pub codes: Tensor,
    /// f32 `[out]`, the absmax of each row (bitsandbytes' `SCB`).
    pub scb: Tensor,
}

impl Quantized8bit {
    /// Quantize a 2-D float weight as bitsandbytes does: cast to float16, then row-wise int8
    /// without outliers. A value beyond float16's range is an error (bitsandbytes would zero
    /// its row).
    pub fn quantize(w: &Tensor) -> Result<Self, Error> {
        check_float_matrix(w, "weight")?;
        let h = w.f_to_kind(Kind::Half)?;
        let bad = h.f_isfinite()?.f_logical_not()?;
        if bad.f_any()?.f_int64_value(&[])? != 0 {
            let index = bad.f_view([-1])?.f_to_kind(Kind::Uint8)?.f_argmax(0, false)?.f_int64_value(&[])?;
            let value = w.f_view([-1])?.f_double_value(&[index])? as f32;
            return Err(Error::Float16Range { index: index as usize, value });
        }
        let (codes, scb, _) = quantize_int8_rowwise(&h, 0.0)?;
        Ok(Quantized8bit { codes, scb })
    }

    /// Build from plain buffers: `codes` row-major `[shape[0], shape[1]]`, one SCB per row.
    pub fn from_codec(codes: &[i8], scb: &[f32], shape: [usize; 2]) -> Result<Self, Error> {
        let [rows, cols] = shape;
        if codes.len() != rows * cols {
            return Err(Error::Length { what: "int8 codes", expected: rows * cols, got: codes.len() });
        }
        if scb.len() != rows {
            return Err(Error::Length { what: "SCB", expected: rows, got: scb.len() });
        }
        let codes = Tensor::from_slice(codes).f_view([rows as i64, cols as i64])?;
        Ok(Quantized8bit { codes, scb: Tensor::from_slice(scb) })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        let s = self.codes.size();
        [s[0], s[1]]
    }

    /// The weight the layer multiplies with, in `kind` (Float, Half or BFloat16):
    /// `code * (SCB * (1/127))` as [`crate::int8::matmul_weight`], rounded once into `kind`.
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor, Error> {
        int8_dequantize(&self.codes, &self.scb, 1, kind)
    }

    /// The codes as a row-major buffer.
    pub fn codes_vec(&self) -> Result<Vec<i8>, Error> {
        Ok(Vec::<i8>::try_from(&self.codes.f_reshape([-1])?)?)
    }

    /// The row scales as a buffer.
    pub fn scb_vec(&self) -> Result<Vec<f32>, Error> {
        Ok(Vec::<f32>::try_from(&self.scb)?)
    }
}

/// Linear8bit's forward through the C++ autograd Function: `x [..., in]` in its own dtype,
/// the int8 weight, optional bias `[out]` in x's dtype; `mode` 0 is LLM.int8's decomposition,
/// 1 the dequantizing path.
pub(crate) fn linear8bit_forward(
    x: &Tensor,
    weight: &Quantized8bit,
    bias: Option<&Tensor>,
    threshold: f64,
    mode: i32,
) -> Result<Tensor, Error> {
    let bias_ptr = bias.map_or(std::ptr::null(), ptr);
    let mut result = std::ptr::null_mut();
    // SAFETY: the tensors live for the call (bias may be null, which the C++ side checks); the
    // Function keeps its own references to what it saves.
    let err = unsafe {
        ffi::nibble_linear8bit_forward(
            ptr(x),
            ptr(&weight.codes),
            ptr(&weight.scb),
            bias_ptr,
            threshold,
            mode,
            &mut result,
        )
    };
    check(err)?;
    take(result, "output")
}
