//! The SFT pipeline behind the `sft` binary: data (rows, chat templates) now; tokenization,
//! packing and the training loop as they land.

#![deny(missing_docs)]

pub mod data;
pub mod merge;
pub mod report;
pub mod template;
pub mod train;
