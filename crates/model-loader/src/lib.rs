//! Hugging Face models for nibble: where a model lives (a local directory or the hub cache,
//! offline), what its `config.json` says (architecture and shape), its memory-mapped safetensors,
//! and the model itself ([`CausalLm`]), quantized to 4 or 8 bits tensor by tensor as it loads; and
//! models written back as transformers saves them ([`export`]: `sft quantize`, merged models).

#![deny(missing_docs)]

mod checkpoint;
pub mod export;
mod hf_config;
mod model;
mod resolve;

pub use checkpoint::{Checkpoint, TensorView, expected_shapes, kind_from_torch_name, torch_name};
pub use hf_config::{Architecture, GemmaConfig, HfConfig, MoeConfig, MoeNames, Prequantized, RopeScaling};
pub use model::{
    CausalLm, Generation, LayerContext, LayerPlacement, LinearSlot, LoadOptions, ParamLora, ParamSlotInfo,
    Placement, Sampling, TensorSlot, param_slots_of,
};
pub use resolve::{HubCache, resolve_model};

use std::path::PathBuf;

/// Why a model could not be found or understood; every variant names the file or id at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a local directory nor a cached hub model.
    #[error(
        "model `{id}` (revision `{revision}`) is not a local directory and not in the Hugging Face cache \
         (searched {}); nibble never downloads: fetch it with `huggingface-cli download {id}` or give a local path",
        .searched.display()
    )]
    NotInCache {
        /// The id as given.
        id: String,
        /// The revision asked for.
        revision: String,
        /// The cache folder of that repository.
        searched: PathBuf,
    },
    /// An output directory that exists and is not empty (pass `overwrite` to replace it).
    #[error("{} exists and is not empty (use --overwrite to replace it)", .path.display())]
    OutputExists {
        /// The directory.
        path: PathBuf,
    },
    /// An output that cannot be written where or as asked.
    #[error("{}: {message}", .path.display())]
    BadOutput {
        /// The output path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An option out of range (blocksize, dtype, ...).
    #[error("invalid option: {0}")]
    BadOption(String),
    /// A file that could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file that could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A config.json that is not valid JSON or lacks a required key.
    #[error("{}: {message}", .path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A checkpoint file or index that cannot be used.
    #[error("{}: {message}", .path.display())]
    BadCheckpoint {
        /// The file (or directory).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A shard the index names but the directory lacks.
    #[error("{}: shard {} is missing", .index.display(), .shard.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
    },
    /// A tensor the model needs that no shard holds.
    #[error("tensor `{name}` is not in the checkpoint at {}", .path.display())]
    MissingTensor {
        /// The tensor.
        name: String,
        /// The checkpoint directory.
        path: PathBuf,
    },
    /// A tensor whose dtype or shape does not fit config.json.
    #[error("{}: tensor `{name}`: {message}", .path.display())]
    TensorMismatch {
        /// The tensor.
        name: String,
        /// The shard holding it.
        path: PathBuf,
        /// Expected vs found.
        message: String,
    },
    /// An architecture nibble has no model file for.
    #[error(
        "{}: architecture `{found}` is not supported (supported: {})",
        .path.display(),
        Architecture::SUPPORTED.join(", ")
    )]
    Unsupported {
        /// The config.json.
        path: PathBuf,
        /// The `architectures` entry found.
        found: String,
    },
    /// A tensor that could not be quantized or used as a linear layer's weight.
    #[error("tensor `{name}`: {source}")]
    Quant {
        /// The tensor.
        name: String,
        /// What the quant crate reported.
        source: quant::Error,
    },
    /// A layer failed while running (shape or dtype the layer cannot take).
    #[error("{0}")]
    Layer(#[from] quant::Error),
    /// Input the model cannot run on.
    #[error("bad model input: {0}")]
    BadInput(String),
    /// A libtorch failure (its message, without libtorch's C++ stack trace).
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(quant::ops::torch_message(&e))
    }
}
