//! 4-bit quantization bit-exact with bitsandbytes (NF4/FP4, blocksize 32..4096, double
//! quantization of the block scales) and its 8-bit LLM.int8() (row-wise int8 with outlier
//! columns), usable alone: quantize a tensor, store it in bitsandbytes' layout, dequantize it, or
//! run a quantized linear layer.
//!
//! - [`codec`] (4-bit) and [`int8`] (8-bit): the reference implementations on slices (no native
//!   dependency); they define every bit and document each edge case and each place where
//!   bitsandbytes' own paths disagree.
//! - `cuda` (feature `cuda`, off by default): CUDA kernels (`csrc/cuda/`, built with the nvcc
//!   that `cargo xtask cuda` installs) for 4-bit quantize, double quant, dequantize and a fused
//!   4-bit gemv, with one API for tensors on any device (CPU tensors fall back to `ops`). Compiled
//!   and linked without a GPU; `scripts/gpu_check.sh` runs the comparisons on a GPU machine.

#![deny(missing_docs)]

pub mod codec;
/// The codec and a fused 4-bit gemv on CUDA tensors, falling back to [`ops`] on the CPU.
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod file;
pub mod int8;
/// Linear layers (dense, 4-bit and 8-bit) behind one small trait, so adapters can wrap any of them.
#[cfg(feature = "torch")]
pub mod linear;
/// The fast path: the codec as libtorch ops on `tch` tensors (C++ in `csrc/`, bit-identical to [`codec`]).
#[cfg(feature = "torch")]
pub mod ops;
/// bitsandbytes' serialized layout (`weight`, `weight.absmax`, ..., `quant_state` JSON; the 8-bit `SCB`) on plain buffers.
pub mod state;
pub mod values;

pub use codec::{NestedAbsmax, QuantType};

/// Everything that can go wrong quantizing, dequantizing or reading quantized state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A NaN or infinite input value (bitsandbytes would silently corrupt its block).
    #[error("cannot quantize a non-finite value: element {index} is {value}")]
    NonFinite {
        /// Flat index of the first offending element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A weight value float16 cannot hold; bitsandbytes makes int8 weights from float16.
    #[error(
        "cannot quantize to int8: element {index} is {value}, beyond float16's range (±65504), which bitsandbytes quantizes from"
    )]
    Float16Range {
        /// Flat index of the first offending element.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A block size bitsandbytes does not support.
    #[error("blocksize {0} is not supported (use one of 32, 64, 128, 256, 512, 1024, 2048, 4096)")]
    Blocksize(usize),
    /// A quant type other than nf4 / fp4.
    #[error("unknown quant type `{0}` (expected nf4 or fp4)")]
    UnknownQuantType(String),
    /// Buffers whose lengths do not fit together.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Length implied by the others.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// A libtorch failure (a C++ exception or a `tch` error), with its message.
    #[cfg(feature = "torch")]
    #[error("libtorch: {0}")]
    Torch(String),
    /// A tensor the fast path cannot take as it is (wrong dtype, device, layout or shape).
    #[cfg(feature = "torch")]
    #[error("{what}: {problem}")]
    BadTensor {
        /// Which tensor.
        what: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor of a quantized state is missing.
    #[error("missing tensor `{key}`")]
    MissingTensor {
        /// Full tensor key.
        key: String,
    },
    /// A tensor of a quantized state has the wrong dtype.
    #[error("tensor `{key}`: dtype {got}, expected {expected}")]
    TensorDtype {
        /// Full tensor key.
        key: String,
        /// The dtype bitsandbytes writes.
        expected: String,
        /// The dtype found.
        got: String,
    },
    /// A tensor of a quantized state has the wrong shape for the others.
    #[error("tensor `{key}`: shape {got:?}, expected {expected:?} ({why})")]
    TensorShape {
        /// Full tensor key.
        key: String,
        /// The shape implied by the rest of the state.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
        /// What implies the expected shape.
        why: String,
    },
    /// A quantized state's JSON (or a field of it) is malformed.
    #[error("tensor `{key}`: {problem}")]
    MalformedState {
        /// Full tensor key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// I/O on a safetensors file.
    #[error("{}: {source}", .path.display())]
    FileIo {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a valid safetensors file (truncated, bad header, offsets out of range).
    #[error("{}: not a valid safetensors file: {message}", .path.display())]
    InvalidFile {
        /// The file.
        path: std::path::PathBuf,
        /// What the parser said.
        message: String,
    },
}
