//! The SFT training loop, as transformers' Trainer runs it for TRL's SFTTrainer: windows of
//! `gradient_accumulation_steps` micro-batches, loss normalised over the window's label tokens,
//! global-norm clipping, AdamW, a per-step schedule, logging, atomic checkpoints and resume.

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod step;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use model_loader::CausalLm;
use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use optim::{AdamW, AdamWConfig, clip_grad_norm};
pub use schedule::{Schedule, ScheduleError};
pub use step::{
    DeviceBatch, MicroStats, evaluate_batch, forward_backward, forward_backward_with, loss_sum,
    token_accuracy,
};

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
    #[error("step {step}: optimizer: {message}")]
    Optim {
        /// Optimizer step being computed.
        step: u64,
        /// What failed (libtorch's message).
        message: String,
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
    /// Evaluate every this many steps (and at the end) when an eval set is given.
    pub eval_steps: Option<u64>,
    /// Also evaluate before the first step.
    pub eval_on_start: bool,
    /// NEFTune noise on the embeddings while training (`neftune_noise_alpha`).
    pub neftune_noise_alpha: Option<f64>,
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
    /// Input tokens (pads excluded) trained on so far, as TRL counts `num_tokens`.
    pub num_tokens: u64,
    /// Mean over the window's micro-batches of next-token accuracy (TRL's `mean_token_accuracy`).
    pub mean_token_accuracy: f64,
    /// Input tokens per second since the previous log.
    pub tokens_per_second: f64,
    /// Seconds since training started (this process).
    pub elapsed_s: f64,
    /// Estimated seconds to the end.
    pub eta_s: f64,
}

/// One evaluation over the eval set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalEntry {
    /// Optimizer steps done.
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean token loss over the eval set, each batch weighted by its rows (as transformers does).
    pub eval_loss: f64,
    /// Next-token accuracy over the eval set.
    pub eval_mean_token_accuracy: f64,
    /// Seconds the evaluation took.
    pub eval_runtime: f64,
}

/// What the loop reports as it goes.
#[derive(Debug, Clone, Copy)]
pub enum Event<'e> {
    /// A training log line.
    Train(&'e LogEntry),
    /// An evaluation.
    Eval(&'e EvalEntry),
    /// A checkpoint was written.
    Saved(&'e std::path::Path),
}

/// How a call to [`Trainer::train`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `total_steps` reached.
    Finished,
    /// Stopped on request (Ctrl-C) after saving this checkpoint.
    Interrupted(PathBuf),
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
    /// Every evaluation so far.
    #[serde(default)]
    pub eval_history: Vec<EvalEntry>,
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
    /// Set (e.g. by a Ctrl-C handler) to save a checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
}

impl<'a> Trainer<'a> {
    /// A fresh run.
    pub fn new(model: &'a CausalLm, params: Vec<Tensor>, opts: TrainOptions) -> Result<Self, TrainError> {
        let optimizer = AdamW::new(params, opts.adam)
            .map_err(|e| TrainError::Optim { step: 0, message: quant::ops::torch_message(&e) })?;
        Ok(Trainer {
            model,
            opts,
            optimizer,
            progress: Progress::default(),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Loss and accuracy over `eval` (no gradients).
    pub fn evaluate(&self, eval: &[(DeviceBatch, u64)], epoch: f64) -> Result<EvalEntry, TrainError> {
        let start = Instant::now();
        let step = self.progress.global_step;
        let (mut weighted, mut rows, mut correct, mut total) = (0.0, 0u64, 0u64, 0u64);
        for (batch, _) in eval {
            let (sum, c, t) = evaluate_batch(self.model, batch)
                .map_err(|source| TrainError::Model { step, source: Box::new(source) })?;
            let n = batch.input_ids.size()[0] as u64;
            weighted += if t > 0 { sum / t as f64 } else { 0.0 } * n as f64;
            rows += n;
            correct += c;
            total += t;
        }
        Ok(EvalEntry {
            step,
            epoch,
            eval_loss: weighted / rows.max(1) as f64,
            eval_mean_token_accuracy: correct as f64 / total.max(1) as f64,
            eval_runtime: start.elapsed().as_secs_f64(),
        })
    }

    /// Run until `total_steps` (or a stop request), evaluating on `eval` and saving
    /// checkpoints as configured.
    pub fn train(
        &mut self,
        epoch_batches: &mut dyn FnMut(u64) -> EpochBatches,
        eval: &[(DeviceBatch, u64)],
        save_adapter: &dyn Fn(&std::path::Path) -> Result<(), String>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, TrainError> {
        let start = Instant::now();
        let start_step = self.progress.global_step;
        let ga = self.opts.grad_accum.max(1);
        let (mut window_loss_sum, mut steps_since_log) = (0.0f64, 0u64);
        let (mut acc_sum, mut acc_n) = (0.0f64, 0u64);
        let (mut tokens_at_log, mut time_at_log) = (self.progress.num_tokens, 0.0f64);
        let mut batches = epoch_batches(self.progress.epoch);
        if batches.is_empty() {
            return Err(TrainError::NoData);
        }
        let epoch_now =
            |p: &Progress, len: usize| p.epoch as f64 + p.batch_in_epoch as f64 / len.max(1) as f64;
        if self.opts.eval_on_start && !eval.is_empty() && self.progress.global_step == 0 {
            let e = self.evaluate(eval, 0.0)?;
            on_event(Event::Eval(&e));
            self.progress.eval_history.push(e);
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
                let m = forward_backward_with(
                    self.model,
                    batch,
                    num_items.max(1) as f64,
                    self.opts.gradient_checkpointing,
                    seed,
                    self.opts.neftune_noise_alpha,
                )
                .map_err(|source| TrainError::Model { step: step + 1, source: Box::new(source) })?;
                step_loss += m.loss;
                if m.total > 0 {
                    acc_sum += m.correct as f64 / m.total as f64;
                    acc_n += 1;
                }
                self.progress.num_tokens += batch.num_tokens;
            }
            if !step_loss.is_finite() {
                return Err(TrainError::NonFinite { step: step + 1, loss: step_loss });
            }
            let optim = |e: tch::TchError| TrainError::Optim {
                step: step + 1,
                message: quant::ops::torch_message(&e),
            };
            let grad_norm =
                clip_grad_norm(self.optimizer.params(), self.opts.max_grad_norm).map_err(optim)?;
            let lr = self.opts.learning_rate * self.opts.schedule.factor(step);
            self.optimizer.step(lr).map_err(optim)?;
            self.optimizer.zero_grad();
            self.progress.global_step += 1;
            self.progress.batch_in_epoch = to;
            window_loss_sum += step_loss;
            steps_since_log += 1;

            let gs = self.progress.global_step;
            let last = gs == self.opts.total_steps;
            let log_now = (self.opts.logging_steps > 0 && gs.is_multiple_of(self.opts.logging_steps))
                || (gs == 1 && self.opts.logging_first_step)
                || last;
            if log_now {
                let elapsed = start.elapsed().as_secs_f64();
                let done = (gs - start_step) as f64;
                let entry = LogEntry {
                    step: gs,
                    epoch: epoch_now(&self.progress, batches.len()),
                    loss: window_loss_sum / steps_since_log as f64,
                    grad_norm,
                    learning_rate: lr,
                    num_tokens: self.progress.num_tokens,
                    mean_token_accuracy: if acc_n > 0 { acc_sum / acc_n as f64 } else { 0.0 },
                    tokens_per_second: (self.progress.num_tokens - tokens_at_log) as f64
                        / (elapsed - time_at_log).max(1e-9),
                    elapsed_s: elapsed,
                    eta_s: elapsed / done.max(1.0) * (self.opts.total_steps - gs) as f64,
                };
                on_event(Event::Train(&entry));
                self.progress.log_history.push(entry);
                (window_loss_sum, steps_since_log, acc_sum, acc_n) = (0.0, 0, 0.0, 0);
                (tokens_at_log, time_at_log) = (self.progress.num_tokens, elapsed);
            }
            if !eval.is_empty()
                && let Some(every) = self.opts.eval_steps
                && ((every > 0 && gs.is_multiple_of(every)) || last)
            {
                let e = self.evaluate(eval, epoch_now(&self.progress, batches.len()))?;
                on_event(Event::Eval(&e));
                self.progress.eval_history.push(e);
            }
            let stop = self.stop.load(Ordering::SeqCst) && !last;
            let scheduled = self.opts.save_steps.is_some_and(|every| every > 0 && gs.is_multiple_of(every));
            if (scheduled && !last) || stop {
                let dir =
                    Checkpoint::save(&self.opts.output_dir, &self.progress, &self.optimizer, save_adapter)?;
                on_event(Event::Saved(&dir));
                checkpoint::rotate(&self.opts.output_dir, self.opts.save_total_limit)?;
                if stop {
                    return Ok(Outcome::Interrupted(dir));
                }
            }
        }
        Ok(Outcome::Finished)
    }
}
