//! 4-bit quantization bit-exact with bitsandbytes (NF4/FP4, blocksize 32..4096, double
//! quantization of the block scales), usable alone: quantize a tensor, store it in bitsandbytes'
//! layout, dequantize it, or run a quantized linear layer.
//!
//! - [`codec`]: the reference implementation on slices (no native dependency); it defines every
//!   bit and documents each edge case and each place where bitsandbytes' own paths disagree.

#![deny(missing_docs)]

pub mod codec;
pub mod file;
/// Linear layers (dense and 4-bit) behind one small trait, so adapters can wrap any of them.
#[cfg(feature = "torch")]
pub mod linear;
/// The fast path: the codec as libtorch ops on `tch` tensors (C++ in `csrc/`, bit-identical to [`codec`]).
#[cfg(feature = "torch")]
pub mod ops;
/// JSON text as Python's `json.dumps` writes it, for files Python tools read byte for byte.
pub mod pyjson;
/// bitsandbytes' serialized layout (`weight`, `weight.absmax`, ..., `quant_state` JSON) on plain buffers.
pub mod state;

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
}
