//! The data pipeline of nibble's trainers (usable alone: it links no libtorch): training rows from local files (JSONL, JSON, Parquet), local dataset
//! folders and datasets in the Hugging Face hub cache (never downloaded), alone or mixed as the
//! alignment-handbook mixes them; each row recognised as one of TRL's dataset formats, then
//! tokenized, labelled, truncated or packed and batched exactly as TRL 1.16's `SFTTrainer` does,
//! with an on-disk cache of the tokenized result.
//!
//! The entry points: [`DataPlan::from_recipe`] (which files, fingerprinted), [`Tokenizer::from_recipe`],
//! [`TokenizeOptions::from_recipe`], then [`load_or_prepare_rows`] (through the cache) or
//! [`prepare_dataset`] (rows in memory), and [`Dataset::batches`] per epoch.

#![deny(missing_docs)]

mod batch;
mod cache;
mod dataset;
mod error;
mod mixture;
pub mod nprandom;
mod pack;
mod parquet;
pub mod preference;
pub mod preference_cache;
mod rows;
pub mod source;
pub mod template;
mod tokenize;
mod tokenizer;

pub use batch::{
    Batch, CollateOptions, batches, batches_per_epoch, collate, epoch_order, sequential_batches,
    shard_indices, update_steps_per_epoch,
};
pub use cache::{
    CacheOutcome, PIPELINE_VERSION, cache_key, cache_path, keyed_file, load_or_prepare, load_or_prepare_rows,
    read_cache, read_sealed, write_cache, write_sealed,
};
pub use dataset::{Dataset, Sample, prepare_dataset};
pub use error::Error;
pub use mixture::{
    DataPlan, LoadedData, MixtureRows, Origin, Rows, SOURCES_VERSION, load_mixture, load_rows, load_split,
    load_training_data, read_json, train_test_split_indices,
};
pub use pack::{MAP_BATCH_SIZE, pack, pack_bfd, pack_wrapped, shard_bounds};
pub use parquet::read_parquet;
pub use rows::{Example, Message, read_rows};
pub use source::{DatasetFiles, Format, resolve_dataset};
pub use tokenize::{
    Encoded, IGNORE_INDEX, RowKind, TokenizeOptions, build_labels, tokenize_example, truncate,
};
pub use tokenizer::{EncodedText, SPECIAL_TOKEN_NAMES, Tokenizer};
