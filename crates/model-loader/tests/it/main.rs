//! model-loader's integration tests in one binary (each links libtorch: one link instead of
//! three). None of them changes process-wide state (torch's generator, the matmul policy, the
//! environment); `checkpoint.rs` stays a binary of its own because it measures the process's
//! resident file pages, which tests loading models beside it would move.

mod export;
mod parity;
mod resolve;
