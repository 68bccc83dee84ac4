//! The library's one error type: merging an adapter, running the loop (a step that failed,
//! diverged or lost a peer), checkpoints and the learning-rate schedule, each naming the step,
//! file, key or tensor at fault.

use std::path::PathBuf;

/// Why a merge, a training run, a checkpoint or a schedule failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base model (config, checkpoint, output directory).
    #[error(transparent)]
    Model(Box<model_loader::Error>),
    /// The adapter directory (config, tensors, targets).
    #[error("adapter: {0}")]
    Adapter(#[from] lora::Error),
    /// A config.json value merge cannot use.
    #[error("{}: {message}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor that could not be computed or written.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What went wrong.
        message: String,
    },

    /// The model failed on a batch.
    #[error("step {step}: {source}")]
    Forward {
        /// Optimizer step being computed.
        step: u64,
        /// What failed.
        source: Box<model_loader::Error>,
    },
    /// A libtorch failure in the optimizer.
    #[error("step {step}: optimizer: {message}")]
    Optim {
        /// Optimizer step being computed.
        step: u64,
        /// What failed (libtorch's message).
        message: String,
    },
    /// The eval loss became NaN or infinite (the model's numbers are no longer usable).
    #[error(
        "step {step}: the eval loss is {loss} (diverged); the last checkpoint before it is the one to keep; \
         lower the learning rate or check the data"
    )]
    NonFiniteEval {
        /// Optimizer steps done when evaluating.
        step: u64,
        /// The eval loss.
        loss: f64,
    },
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is {loss} (diverged); lower the learning rate or check the data")]
    NonFinite {
        /// Optimizer step.
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// A collective over the process group failed (a peer died or hung).
    #[error("step {step}: {source}")]
    Dist {
        /// Optimizer step being computed.
        step: u64,
        /// What failed.
        source: dist::DistError,
    },
    /// Resuming with another number of processes than the checkpoint was written with.
    #[error(
        "the checkpoint was written by a run of {checkpoint} process(es) and this run has {now}: resume \
         with the same number of processes (the data shards and the step count depend on it)"
    )]
    WorldSize {
        /// Processes of the run that wrote the checkpoint.
        checkpoint: u64,
        /// Processes of this run.
        now: u64,
    },
    /// No batch to train on.
    #[error(
        "the training set gives no batch (is it empty, or smaller than one batch with dataloader_drop_last?)"
    )]
    NoData,

    /// A checkpoint's file or folder could not be written or read.
    #[error("{}: {source}", .path.display())]
    CheckpointIo {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A checkpoint that cannot be used.
    #[error("{}: {message}", .path.display())]
    BadCheckpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// `metric_for_best_model` names no metric the evaluation reports.
    #[error("metric_for_best_model: `{metric}` is not among the evaluation's metrics {available}")]
    BestMetric {
        /// The metric looked for (with its `eval_` prefix).
        metric: String,
        /// The metrics the evaluation reported.
        available: String,
    },
    /// A libtorch failure while computing a loss from log-probs.
    #[error("computing the loss: {0}")]
    Loss(String),
    /// A scheduler nibble does not implement.
    #[error(
        "lr_scheduler_type `{0}` is not supported yet (supported: linear, cosine, cosine_with_min_lr, constant, constant_with_warmup)"
    )]
    UnsupportedSchedule(String),
    /// Missing or conflicting `lr_scheduler_kwargs`.
    #[error("lr_scheduler_kwargs: {0}")]
    ScheduleKwargs(String),
}

impl From<model_loader::Error> for Error {
    fn from(e: model_loader::Error) -> Self {
        Error::Model(Box::new(e))
    }
}
