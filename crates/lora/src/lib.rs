//! LoRA adapters around any linear layer behind [`quant::linear::Linear`] (dense or 4-bit), read
//! and written in Python PEFT's adapter format, so an adapter trained here loads in PEFT and one
//! trained with PEFT loads here.
//!
//! - [`LoraConfig`]: the settings, and `adapter_config.json` both ways (PEFT 0.21.2's fields).
//! - [`inject`]: wrap the targeted linears in [`LoraLinear`]s (plain LoRA or DoRA), returning the
//!   [`Adapters`] (the trainable tensors, the train/eval switch, save and load).
//! - [`inject_with_modules`]: the same, and PEFT's `modules_to_save` (trainable full copies of
//!   other modules, such as the output head or the embedding, offered as named tensors).
//! - [`inject_from`] / [`inject_from_with_modules`]: the same from a PEFT adapter directory.

#![deny(missing_docs)]

mod adapters;
mod config;
mod dora;
mod init;
mod layer;
mod target;

use std::path::PathBuf;

pub use adapters::{
    AdapterModule, Adapters, ParamAdapter, ParamSlot, SavedTensor, inject, inject_from,
    inject_from_with_modules, inject_from_with_params, inject_with_modules,
};
pub use config::{CONFIG_FILE, LoraConfig, LoraInit, PEFT_VERSION, TargetModules, WEIGHTS_FILE};
pub use init::global_rng;
pub use layer::LoraLinear;
pub use target::select as select_targets;

/// Everything that can go wrong configuring, injecting, saving or loading adapters; messages name
/// the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting nibble does not implement yet (bias training, rank patterns, ...).
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// A config value out of range.
    #[error("invalid LoRA config: {0}")]
    InvalidConfig(String),
    /// A target (list entry, regex or all-linear) that matches none of the offered linears.
    #[error("target_modules {target} matches none of the {} linear layers offered: {}", .offered.len(), offered_list(.offered))]
    NoMatch {
        /// The target, as written in the config.
        target: String,
        /// Every module name offered.
        offered: Vec<String>,
    },
    /// A `modules_to_save` entry that ends no offered module's name (PEFT's matching rule).
    #[error("modules_to_save entry `{entry}` matches none of the modules offered for full training: {}", offered_list(.offered))]
    NoModuleToSave {
        /// The entry, as written in the config.
        entry: String,
        /// The names of the modules offered (parameter names without their last part).
        offered: Vec<String>,
    },
    /// The base layer under a DoRA adapter failed when run to measure its weight.
    #[error("module `{module}`: DoRA could not run the base layer: {source}")]
    Base {
        /// The module's name.
        module: String,
        /// What the layer said.
        source: quant::Error,
    },
    /// A target regex (or a `modules_to_save` name, which PEFT uses as a regex) that does not compile.
    #[error("{field} regex `{pattern}` does not compile: {source}")]
    Regex {
        /// The config key it comes from.
        field: &'static str,
        /// The pattern.
        pattern: String,
        /// What the regex parser said.
        source: Box<regex::Error>,
    },
    /// I/O on an adapter file or directory.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An unreadable safetensors file, or a quantized state that cannot be used.
    #[error(transparent)]
    File(#[from] quant::Error),
    /// A malformed `adapter_config.json`, or one that does not fit the adapters it is loaded into.
    #[error("{}: {problem}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A tensor in the adapter file that no targeted module takes.
    #[error("{}: unexpected tensor `{key}` ({why})", .path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// Why it does not fit.
        why: String,
    },
    /// A targeted module whose A or B is not in the adapter file.
    #[error("{}: missing tensor `{key}`", .path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The key PEFT writes for it.
        key: String,
    },
    /// A tensor in the adapter file with the wrong shape or dtype.
    #[error("{}: tensor `{key}`: {problem}", .path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A libtorch failure, with its message.
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e.to_string())
    }
}

fn offered_list(offered: &[String]) -> String {
    if offered.is_empty() { "(none)".to_owned() } else { offered.join(", ") }
}
