//! The training half of the `sft` binary, usable as a library: the loop as transformers' Trainer
//! runs it (windows, clipping, AdamW, schedules, gradient checkpointing, evaluation, atomic
//! checkpoints and resume, data parallelism) and adapter merging. Data comes from the `data`
//! crate and logs and run files go through the `report` crate.

#![deny(missing_docs)]

mod error;
pub mod merge;
pub mod params;
pub mod train;

pub use error::Error;
