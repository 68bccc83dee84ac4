//! The file conventions every nibble crate shares with the Python stack, in one small crate with
//! no native dependency, so `quant`, `lora`, `model-loader`, `data` and `report` write and find
//! files the same way:
//!
//! - [`json`]: JSON text exactly as Python's `json.dumps` writes it (float `repr`, `ensure_ascii`,
//!   indents, key order), for files Python tools compare byte for byte.
//! - [`atomic`]: the one atomic writer (temporary file, fsync, rename).
//! - [`hub`]: the Hugging Face hub cache, found as `huggingface_hub` lays it out (no network).
//! - [`cache`]: nibble's own cache folder (`NIBBLE_CACHE`, `NIBBLE_HOME`, `XDG_CACHE_HOME`).
//! - [`torch_save`]: files `torch.save` writes (a Trainer checkpoint's `optimizer.pt`), read with
//!   no Python or libtorch, executing nothing.

#![deny(missing_docs)]

pub mod atomic;
pub mod cache;
pub mod hub;
pub mod json;
pub mod torch_save;

pub use atomic::{write_atomic, write_atomic_with};
pub use hub::{HubCache, RepoKind};
