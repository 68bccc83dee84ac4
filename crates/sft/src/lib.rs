//! The SFT pipeline behind the `sft` binary: data (sources, rows, chat templates, tokenization,
//! packing, batching), the training loop, reports and adapter merging.

#![deny(missing_docs)]

pub mod data;
pub mod merge;
pub mod report;
pub mod template;
pub mod train;
