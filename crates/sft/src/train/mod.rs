//! The SFT training loop, as transformers' Trainer runs it for TRL's SFTTrainer: windows of
//! `gradient_accumulation_steps` micro-batches, loss normalised over the window's label tokens,
//! global-norm clipping, AdamW, a per-step schedule, logging, atomic checkpoints and resume.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod step;

use std::path::PathBuf;
use std::time::Instant;

use model_loader::CausalLm;
use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use optim::{AdamW, AdamWConfig, clip_grad_norm};
pub use schedule::{Schedule, ScheduleError};
pub use step::{DeviceBatch, forward_backward, loss_sum};

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model failed on a batch.
    #[error("step {step}: {source}")]
    Model {
        /// Optimizer step being computed.
        step: u64,
        /// What failed.
        source: Box<model_loader::Error>,
    },
    /// A libtorch failure in the optimizer.
    #[error("step {step}: optimizer: {source}")]
    Optim {
        /// Optimizer step being computed.
        step: u64,
        /// What failed.
        source: tch::TchError,
    },
    /// The loss became NaN or infinite.
    #[error("step {step}: the loss is {loss} (diverged); lower the learning rate or check the data")]
    NonFinite {
        /// Optimizer step.
        step: u64,
        /// The loss.
        loss: f64,
    },
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// No batch to train on.
    #[error(
        "the training set gives no batch (is it empty, or smaller than one batch with dataloader_drop_last?)"
    )]
    NoData,
}

/// Everything the loop needs to know, resolved from the recipe.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Optimizer steps to run.
    pub total_steps: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Base learning rate.
    pub learning_rate: f64,
    /// Multiplier per step.
    pub schedule: Schedule,
    /// AdamW settings.
    pub adam: AdamWConfig,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Log every this many steps (0 = never).
    pub logging_steps: u64,
    /// Also log after the first step.
    pub logging_first_step: bool,
    /// Save a checkpoint every this many steps.
    pub save_steps: Option<u64>,
    /// Keep at most this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Where checkpoints and the final adapter go.
    pub output_dir: PathBuf,
    /// Recompute each layer in backward.
    pub gradient_checkpointing: bool,
    /// Seeds data order and dropout.
    pub seed: u64,
}

/// One line of the log history (the fields transformers logs for training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Optimizer steps done.
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean window loss since the previous log.
    pub loss: f64,
    /// Gradient norm before clipping, at this step.
    pub grad_norm: f64,
    /// Learning rate used at this step.
    pub learning_rate: f64,
    /// Label tokens trained on so far.
    pub num_tokens: u64,
    /// Seconds since training started (this process).
    pub elapsed_s: f64,
}

/// One epoch's micro-batches, each with its count of loss-bearing label tokens.
pub type EpochBatches = Vec<(DeviceBatch, u64)>;

/// The state a run resumes from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub global_step: u64,
    /// Epoch being trained.
    pub epoch: u64,
    /// Micro-batches of that epoch already consumed.
    pub batch_in_epoch: usize,
    /// Label tokens trained on.
    pub num_tokens: u64,
    /// Everything logged so far.
    pub log_history: Vec<LogEntry>,
}

/// Drives training of `params` in `model`; `epoch_batches(e)` gives epoch `e`'s micro-batches in
/// order, `save(dir)` writes the adapter files into `dir`, `on_log` sees each log line.
pub struct Trainer<'a> {
    /// The model (with adapters injected).
    pub model: &'a CausalLm,
    /// Loop settings.
    pub opts: TrainOptions,
    /// The optimizer over the trainable tensors.
    pub optimizer: AdamW,
    /// Where the run stands.
    pub progress: Progress,
}

impl<'a> Trainer<'a> {
    /// A fresh run.
    pub fn new(model: &'a CausalLm, params: Vec<Tensor>, opts: TrainOptions) -> Result<Self, TrainError> {
        let optimizer =
            AdamW::new(params, opts.adam).map_err(|source| TrainError::Optim { step: 0, source })?;
        Ok(Trainer { model, opts, optimizer, progress: Progress::default() })
    }

    /// Run until `total_steps`, saving checkpoints as configured.
    pub fn train(
        &mut self,
        epoch_batches: &mut dyn FnMut(u64) -> EpochBatches,
        save_adapter: &dyn Fn(&std::path::Path) -> Result<(), String>,
        on_log: &mut dyn FnMut(&LogEntry),
    ) -> Result<(), TrainError> {
        let start = Instant::now();
        let ga = self.opts.grad_accum.max(1);
        let (mut window_loss_sum, mut steps_since_log) = (0.0f64, 0u64);
        let mut batches = epoch_batches(self.progress.epoch);
        if batches.is_empty() {
            return Err(TrainError::NoData);
        }
        while self.progress.global_step < self.opts.total_steps {
            if self.progress.batch_in_epoch >= batches.len() {
                self.progress.epoch += 1;
                self.progress.batch_in_epoch = 0;
                batches = epoch_batches(self.progress.epoch);
            }
            let step = self.progress.global_step;
            let from = self.progress.batch_in_epoch;
            let to = (from + ga).min(batches.len());
            let window = &batches[from..to];
            let num_items: u64 = window.iter().map(|(_, n)| n).sum();
            let mut step_loss = 0.0;
            for (i, (batch, _)) in window.iter().enumerate() {
                let seed = (self.opts.seed as i64)
                    .wrapping_mul(1_000_003)
                    .wrapping_add((step * ga as u64 + i as u64) as i64 * 1009);
                step_loss += forward_backward(
                    self.model,
                    batch,
                    num_items.max(1) as f64,
                    self.opts.gradient_checkpointing,
                    seed,
                )
                .map_err(|source| TrainError::Model { step: step + 1, source: Box::new(source) })?;
            }
            if !step_loss.is_finite() {
                return Err(TrainError::NonFinite { step: step + 1, loss: step_loss });
            }
            let optim = |source| TrainError::Optim { step: step + 1, source };
            let grad_norm =
                clip_grad_norm(self.optimizer.params(), self.opts.max_grad_norm).map_err(optim)?;
            let lr = self.opts.learning_rate * self.opts.schedule.factor(step);
            self.optimizer.step(lr).map_err(optim)?;
            self.optimizer.zero_grad();
            self.progress.global_step += 1;
            self.progress.batch_in_epoch = to;
            self.progress.num_tokens += num_items;
            window_loss_sum += step_loss;
            steps_since_log += 1;

            let gs = self.progress.global_step;
            let log_now = (self.opts.logging_steps > 0 && gs.is_multiple_of(self.opts.logging_steps))
                || (gs == 1 && self.opts.logging_first_step)
                || gs == self.opts.total_steps;
            if log_now {
                let entry = LogEntry {
                    step: gs,
                    epoch: self.progress.epoch as f64 + to as f64 / batches.len() as f64,
                    loss: window_loss_sum / steps_since_log as f64,
                    grad_norm,
                    learning_rate: lr,
                    num_tokens: self.progress.num_tokens,
                    elapsed_s: start.elapsed().as_secs_f64(),
                };
                on_log(&entry);
                self.progress.log_history.push(entry);
                (window_loss_sum, steps_since_log) = (0.0, 0);
            }
            if let Some(every) = self.opts.save_steps
                && every > 0
                && gs.is_multiple_of(every)
                && gs < self.opts.total_steps
            {
                Checkpoint::save(&self.opts.output_dir, &self.progress, &self.optimizer, save_adapter)?;
                checkpoint::rotate(&self.opts.output_dir, self.opts.save_total_limit)?;
            }
        }
        Ok(())
    }
}
