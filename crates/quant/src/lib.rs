//! 4-bit quantization bit-exact with bitsandbytes (NF4/FP4, blocksize 32..4096, double
//! quantization of the block scales), usable alone: quantize a tensor, store it in bitsandbytes'
//! layout, dequantize it, or run a quantized linear layer.
//!
//! - [`codec`]: the reference implementation on slices (no native dependency); it defines every
//!   bit and documents each edge case and each place where bitsandbytes' own paths disagree.

#![deny(missing_docs)]

pub mod codec;

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
}
