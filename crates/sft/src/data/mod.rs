//! Training rows from local files (JSONL, JSON): each row recognised as one of TRL's dataset
//! formats, or an error naming the file and row.

mod rows;

pub use rows::{DataError, Example, Message, read_rows};
