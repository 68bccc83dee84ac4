//! The SFT training loop, as transformers' Trainer runs it for TRL's SFTTrainer: windows of
//! `gradient_accumulation_steps` micro-batches, loss normalised over the window's label tokens,
//! global-norm clipping, AdamW, a per-step schedule, logging, atomic checkpoints and resume.
//! With a process group (`Trainer::group`), every rank trains on its shard of each global batch,
//! the window's token count and the adapter gradients are summed over the ranks before the loss
//! is normalised and the (identical) optimizer step; rank 0 alone logs, evaluates and saves.

pub mod checkpoint;
pub mod clock;
pub mod dpo;
mod head;
pub mod optim;
pub mod router;
pub mod schedule;
pub mod state;
pub mod step;

use crate::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dist::ProcessGroup;
use model_loader::CausalLm;
use serde::{Deserialize, Serialize};
use tch::Tensor;

pub use checkpoint::Checkpoint;
pub use head::f32_product as head_product_in_f32;
pub use optim::{AdamW, AdamWConfig, clip_grad_norm};
pub use schedule::Schedule;
pub use step::{
    DeviceBatch, HEAD_CHUNK_BYTES, MicroStats, evaluate_batch, forward_backward, forward_backward_with,
    hidden_states_routed,
};

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
    /// The weight of a mixture of experts' load-balancing loss (`router_aux_loss_coef`; unset:
    /// the model config's, as TRL takes it; 0 or a dense model: none).
    pub router_aux_loss_coef: Option<f64>,
    /// What `trainer_state.json` records of the run's settings.
    pub state: state::StateInfo,
    /// Ranking checkpoints by an eval metric (`metric_for_best_model`), when the recipe asks.
    pub best: Option<BestModel>,
}

/// How the Trainer's `metric_for_best_model` machinery acts: each evaluation's metric is compared
/// with the best so far, checkpoints record the best one, rotation keeps it, and the run can end
/// on its adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct BestModel {
    /// The eval metric's full name (`eval_loss`, `eval_rewards/margins`).
    pub metric: String,
    /// Higher is better.
    pub greater_is_better: bool,
    /// `save_strategy: best`: a checkpoint whenever the metric improves, and only then.
    pub save_on_best: bool,
    /// `load_best_model_at_end`.
    pub load_at_end: bool,
}

/// The metrics an evaluation reports (each with its `eval_` prefix): the loss, token accuracy and
/// runtime; DPO's own ([`dpo::DPO_METRICS`]); `eval_aux_loss` where a mixture's router loss is on
/// (`routed`). What `metric_for_best_model` may name, checked before a run starts.
pub fn eval_metric_names(dpo: bool, routed: bool) -> Vec<String> {
    let mut names: Vec<String> =
        ["eval_loss", "eval_mean_token_accuracy", "eval_runtime"].map(String::from).to_vec();
    if dpo {
        // DPO's token accuracy is the entry's own field (above).
        let own = dpo::DPO_METRICS.iter().filter(|m| **m != "mean_token_accuracy");
        names.extend(own.map(|m| format!("eval_{m}")));
    }
    if routed {
        names.push("eval_aux_loss".to_owned());
    }
    names
}

impl BestModel {
    /// The metric's value in `e`, or an error listing the metrics there are (as the Trainer's).
    fn value(&self, e: &EvalEntry) -> Result<f64, Error> {
        let v = serde_json::to_value(e).unwrap_or_default();
        v.get(&self.metric).and_then(serde_json::Value::as_f64).ok_or_else(|| {
            let names: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            Error::BestMetric { metric: self.metric.clone(), available: format!("{names:?}") }
        })
    }

    /// Whether `value` beats `best` (none yet: any finite value does).
    fn improves(&self, value: f64, best: Option<f64>) -> bool {
        let best = best.unwrap_or(if self.greater_is_better { f64::NEG_INFINITY } else { f64::INFINITY });
        if self.greater_is_better { value > best } else { value < best }
    }
}

pub use report::{EvalEntry, LogEntry};

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

/// What the loop tells an objective about the micro-batch it is computing.
#[derive(Debug, Clone, Copy)]
pub struct MicroContext {
    /// Loss-bearing items of the whole optimizer step's window, over every rank (SFT's
    /// normaliser).
    pub window_items: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Ranks training together.
    pub world: usize,
    /// Recompute each layer in backward.
    pub checkpointing: bool,
    /// This micro-batch's dropout seed.
    pub seed: i64,
    /// NEFTune's alpha.
    pub neftune_alpha: Option<f64>,
}

/// What one micro-batch gave the loop.
#[derive(Debug, Clone, PartialEq)]
pub struct Micro {
    /// This micro-batch's share of the step's loss (the shares of a window, over every rank, sum
    /// to the step's loss).
    pub loss: f64,
    /// One value per [`Objective::metric_names`] entry, `None` when this micro-batch has none;
    /// logged as means over the micro-batches since the previous log.
    pub metrics: Vec<Option<f64>>,
    /// Input tokens (pads excluded), for `num_tokens`.
    pub tokens: u64,
}

/// A training objective over the shared loop (windows, clipping, AdamW, schedules, checkpoints,
/// logs, several ranks): SFT's next-token loss ([`Sft`]) or DPO's preference loss
/// (`dpo::Dpo`).
pub trait Objective {
    /// A micro-batch, ready on the model's device.
    type Batch;
    /// The metrics [`Micro::metrics`] carries, by TRL's names.
    fn metric_names(&self) -> &'static [&'static str];
    /// Forward and backward of one micro-batch, gradients accumulating into the trainable tensors.
    fn step(&self, model: &CausalLm, batch: &Self::Batch, ctx: &MicroContext) -> Result<Micro, Error>;
}

/// Supervised fine-tuning: next-token cross-entropy over the label tokens, summed and divided by
/// the window's label tokens (transformers with `num_items_in_batch`); for a mixture of experts
/// plus its router's load-balancing loss, as TRL's SFTTrainer adds it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sft {
    /// The router loss's coefficient (`None`: no router loss).
    pub router_aux_loss_coef: Option<f64>,
}

impl Objective for Sft {
    type Batch = DeviceBatch;

    fn metric_names(&self) -> &'static [&'static str] {
        if self.router_aux_loss_coef.is_some() {
            &["mean_token_accuracy", "aux_loss"]
        } else {
            &["mean_token_accuracy"]
        }
    }

    fn step(&self, model: &CausalLm, batch: &DeviceBatch, ctx: &MicroContext) -> Result<Micro, Error> {
        // TRL adds `coef * aux / accumulation steps` to each micro-batch's loss and DDP averages
        // over ranks; the loop sums shares over both, so each share carries both divisors.
        let router = match self.router_aux_loss_coef {
            Some(coef) => {
                let scale = coef / (ctx.grad_accum.max(1) * ctx.world.max(1)) as f64;
                router::RouterLoss::for_batch(model, batch.segment_ids.as_ref(), scale)
                    .map_err(model_loader::Error::from)?
            }
            None => None,
        };
        let m = forward_backward_with(
            model,
            batch,
            ctx.window_items.max(1.0),
            ctx.checkpointing,
            ctx.seed,
            ctx.neftune_alpha,
            router.as_ref(),
        )?;
        let accuracy = (m.total > 0).then(|| m.correct as f64 / m.total as f64);
        let aux = router.as_ref().and_then(|r| r.value.get().map(|v| (v, r.scale)));
        let mut metrics = vec![accuracy];
        if self.router_aux_loss_coef.is_some() {
            metrics.push(aux.map(|(v, _)| v));
        }
        let loss = m.loss + aux.map_or(0.0, |(v, scale)| v * scale);
        Ok(Micro { loss, metrics, tokens: batch.num_tokens })
    }
}

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
    /// The best `metric_for_best_model` value so far.
    #[serde(default)]
    pub best_metric: Option<f64>,
    /// The step of that evaluation.
    #[serde(default)]
    pub best_global_step: Option<u64>,
    /// The checkpoint saved at that step, once it exists.
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    /// Processes the run trains on (a resumed run must have as many); 0 in a fresh `Progress`
    /// means not yet set, 1 in checkpoints written before it was recorded.
    #[serde(default = "one")]
    pub world_size: u64,
}

fn one() -> u64 {
    1
}

/// The order of an epoch's samples as transformers' Trainer draws it under accelerate (its
/// `SeedableRandomSampler`): `torch.randperm(len)` from a generator seeded with `seed + epoch`
/// (`seed` is `data_seed`, else `seed`). Drawn from libtorch's own generator, so the same
/// permutation; it reseeds the process's generator, which every later random draw of a run
/// reseeds anyway (dropout and NEFTune per layer and micro-batch).
pub fn sampler_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let _rng = lora::global_rng();
    tch::manual_seed(seed.wrapping_add(epoch) as i64);
    let perm = Tensor::randperm(len as i64, (tch::Kind::Int64, tch::Device::Cpu));
    Vec::<i64>::try_from(perm)
        .unwrap_or_default()
        .into_iter()
        .map(|i| usize::try_from(i).unwrap_or(0))
        .collect()
}

/// An eval set the loop can evaluate on: SFT's next-token batches, or DPO's pairs
/// (`dpo::DpoEval`).
pub trait Evaluator {
    /// No batches: the loop does not evaluate.
    fn is_empty(&self) -> bool;
    /// Loss and metrics over the whole set at `step`, without gradients.
    fn evaluate(&self, model: &CausalLm, step: u64, epoch: f64) -> Result<EvalEntry, Error>;
}

/// SFT's eval set: next-token batches with their label-token counts.
pub struct SftEval<'a>(pub &'a [(DeviceBatch, u64)], pub Option<f64>);

impl Evaluator for SftEval<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Next-token loss (each batch's token mean weighted by its rows, as transformers does) and
    /// accuracy; for a mixture with its router loss (`self.1`'s coefficient), each batch's loss
    /// plus `coef * aux` (TRL's evaluation, no accumulation to divide by) and `eval_aux_loss` the
    /// mean over batches.
    fn evaluate(&self, model: &CausalLm, step: u64, epoch: f64) -> Result<EvalEntry, Error> {
        let eval = self.0;
        let start = Instant::now();
        let forward = |source| Error::Forward { step, source: Box::new(source) };
        let (mut weighted, mut rows, mut correct, mut total) = (0.0, 0u64, 0u64, 0u64);
        let (mut aux_sum, mut aux_n) = (0.0, 0usize);
        for (batch, _) in eval {
            let router = match self.1 {
                Some(coef) => router::RouterLoss::for_batch(model, batch.segment_ids.as_ref(), coef)
                    .map_err(|e| forward(e.into()))?,
                None => None,
            };
            let (sum, c, t, aux) = evaluate_batch(model, batch, router.as_ref()).map_err(forward)?;
            let n = batch.input_ids.size()[0] as u64;
            let routed = aux.zip(self.1).map_or(0.0, |(a, coef)| coef * a);
            weighted += (if t > 0 { sum / t as f64 } else { 0.0 } + routed) * n as f64;
            if let Some(a) = aux {
                aux_sum += a;
                aux_n += 1;
            }
            rows += n;
            correct += c;
            total += t;
        }
        let eval_loss = weighted / rows.max(1) as f64;
        if !eval_loss.is_finite() {
            return Err(Error::NonFiniteEval { step, loss: eval_loss });
        }
        let mut metrics = std::collections::BTreeMap::new();
        if aux_n > 0 {
            metrics.insert("eval_aux_loss".to_owned(), aux_sum / aux_n as f64);
        }
        Ok(EvalEntry {
            step,
            epoch,
            eval_loss,
            eval_mean_token_accuracy: correct as f64 / total.max(1) as f64,
            eval_runtime: start.elapsed().as_secs_f64(),
            metrics,
        })
    }
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
    /// The ranks training together, when there are several; `epoch_batches` then gives this
    /// rank's shard of each epoch.
    pub group: Option<&'a ProcessGroup>,
}

impl<'a> Trainer<'a> {
    /// A fresh run.
    pub fn new(model: &'a CausalLm, params: Vec<Tensor>, opts: TrainOptions) -> Result<Self, Error> {
        let optimizer = AdamW::new(params, opts.adam)
            .map_err(|e| Error::Optim { step: 0, message: quant::ops::torch_message(&e) })?;
        Ok(Trainer {
            model,
            opts,
            optimizer,
            progress: Progress::default(),
            stop: Arc::new(AtomicBool::new(false)),
            group: None,
        })
    }

    /// Loss and accuracy over `eval` (no gradients).
    pub fn evaluate(&self, eval: &[(DeviceBatch, u64)], epoch: f64) -> Result<EvalEntry, Error> {
        SftEval(eval, self.router_aux_loss_coef()).evaluate(self.model, self.progress.global_step, epoch)
    }

    /// Run SFT until `total_steps` (or a stop request), evaluating on `eval` and saving
    /// checkpoints as configured.
    pub fn train(
        &mut self,
        epoch_batches: &mut dyn FnMut(u64) -> EpochBatches,
        eval: &[(DeviceBatch, u64)],
        save_adapter: &dyn Fn(&std::path::Path) -> Result<(), String>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, Error> {
        let objective = Sft { router_aux_loss_coef: self.router_aux_loss_coef() };
        let evaluator = SftEval(eval, objective.router_aux_loss_coef);
        self.train_objective(&objective, epoch_batches, &evaluator, save_adapter, on_event)
    }

    /// A mixture of experts' router-loss coefficient as TRL takes it: the recipe's
    /// `router_aux_loss_coef`, else the model config's; `None` when 0 or the model is dense.
    pub fn router_aux_loss_coef(&self) -> Option<f64> {
        let moe_coef = self.model.config().moe.as_ref().map(|m| m.router_aux_loss_coef);
        router::coefficient(moe_coef, self.opts.router_aux_loss_coef)
    }

    /// [`Trainer::train`] for any objective; `epoch_batches(e)` gives epoch `e`'s micro-batches
    /// with their loss-bearing items. `eval` is the objective's evaluation (empty for none).
    pub fn train_objective<O: Objective>(
        &mut self,
        objective: &O,
        epoch_batches: &mut dyn FnMut(u64) -> Vec<(O::Batch, u64)>,
        eval: &dyn Evaluator,
        save_adapter: &dyn Fn(&std::path::Path) -> Result<(), String>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome, Error> {
        let names = objective.metric_names();
        let k = names.len();
        let start = Instant::now();
        let start_step = self.progress.global_step;
        let ga = self.opts.grad_accum.max(1);
        let (rank, world) = self.group.map_or((0, 1), |g| (g.rank(), g.world_size()));
        let main = rank == 0;
        if start_step > 0 && self.progress.world_size.max(1) != world as u64 {
            return Err(Error::WorldSize { checkpoint: self.progress.world_size.max(1), now: world as u64 });
        }
        self.progress.world_size = world as u64;
        let group = self.group;
        let dist_err = |step: u64| move |source: dist::DistError| Error::Dist { step, source };
        let (mut window_loss_sum, mut steps_since_log) = (0.0f64, 0u64);
        // Per metric: the sum of its micro-batch values and their count since the last log.
        let (mut metric_sum, mut metric_n) = (vec![0.0f64; k], vec![0.0f64; k]);
        let (mut tokens_at_log, mut time_at_log) = (self.progress.num_tokens, 0.0f64);
        let mut phases = clock::PhaseTotals::default();
        let mut batches = epoch_batches(self.progress.epoch);
        if batches.is_empty() {
            return Err(Error::NoData);
        }
        let epoch_now =
            |p: &Progress, len: usize| p.epoch as f64 + p.batch_in_epoch as f64 / len.max(1) as f64;
        if main && self.opts.eval_on_start && !eval.is_empty() && self.progress.global_step == 0 {
            let e = eval.evaluate(self.model, 0, 0.0)?;
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
            let step_started = Instant::now();
            // What an evaluation or a save since the last step spent is not this step's.
            let _ = clock::take();
            let from = self.progress.batch_in_epoch;
            let to = (from + ga).min(batches.len());
            let window = &batches[from..to];
            let mut num_items: u64 = window.iter().map(|(_, n)| n).sum();
            if let Some(g) = group {
                // TRL's `average_tokens_across_devices`: normalise by the global window's tokens.
                num_items = g.all_reduce_scalar(num_items as f64).map_err(dist_err(step + 1))?.round() as u64;
            }
            let mut step_loss = 0.0;
            let (mut step_sum, mut step_n, mut step_tokens) = (vec![0.0f64; k], vec![0.0f64; k], 0u64);
            for (i, (batch, _)) in window.iter().enumerate() {
                // Micro-batch i of rank r is the global window's micro-batch i * world + r: the
                // same dropout seed as in one process with `world` times the accumulation.
                let micro = (step * ga as u64 + i as u64) * world as u64 + rank as u64;
                let seed = (self.opts.seed as i64).wrapping_mul(1_000_003).wrapping_add(micro as i64 * 1009);
                let ctx = MicroContext {
                    window_items: num_items.max(1) as f64,
                    grad_accum: ga,
                    world,
                    checkpointing: self.opts.gradient_checkpointing,
                    seed,
                    neftune_alpha: self.opts.neftune_noise_alpha,
                };
                let m = objective.step(self.model, batch, &ctx).map_err(|e| match e {
                    Error::Model(source) => Error::Forward { step: step + 1, source },
                    other => other,
                })?;
                step_loss += m.loss;
                for (j, v) in m.metrics.iter().enumerate().take(k) {
                    if let Some(v) = v {
                        step_sum[j] += v;
                        step_n[j] += 1.0;
                    }
                }
                step_tokens += m.tokens;
            }
            let mut stop_now = self.stop.load(Ordering::SeqCst);
            if let Some(g) = group {
                let mut grads: Vec<Tensor> = self.optimizer.params().iter().map(Tensor::grad).collect();
                g.all_reduce_sum(&mut grads).map_err(dist_err(step + 1))?;
                // The window loss, metrics, tokens and stop requests of all ranks, in one message.
                let mut local = vec![step_loss, step_tokens as f64, f64::from(u8::from(stop_now))];
                local.extend(&step_sum);
                local.extend(&step_n);
                // On the group's device (NCCL sums CUDA tensors only).
                let mut stats =
                    vec![Tensor::from_slice(&local).f_to_device(g.device()).map_err(|e| Error::Optim {
                        step: step + 1,
                        message: quant::ops::torch_message(&e),
                    })?];
                g.all_reduce_sum(&mut stats).map_err(dist_err(step + 1))?;
                let sum = Vec::<f64>::try_from(&stats[0].to_device(tch::Device::Cpu))
                    .map_err(|e| Error::Optim { step: step + 1, message: quant::ops::torch_message(&e) })?;
                step_loss = sum[0];
                step_tokens = sum[1].round() as u64;
                stop_now = sum[2] > 0.0;
                step_sum.copy_from_slice(&sum[3..3 + k]);
                step_n.copy_from_slice(&sum[3 + k..3 + 2 * k]);
            }
            for j in 0..k {
                metric_sum[j] += step_sum[j];
                metric_n[j] += step_n[j];
            }
            self.progress.num_tokens += step_tokens;
            if !step_loss.is_finite() {
                return Err(Error::NonFinite { step: step + 1, loss: step_loss });
            }
            let optim =
                |e: tch::TchError| Error::Optim { step: step + 1, message: quant::ops::torch_message(&e) };
            let lr = self.opts.learning_rate * self.opts.schedule.factor(step);
            let grad_norm = clock::timed(clock::Phase::Optimizer, self.model.device(), || {
                let norm = clip_grad_norm(self.optimizer.params(), self.opts.max_grad_norm)?;
                self.optimizer.step(lr)?;
                self.optimizer.zero_grad();
                Ok(norm)
            })
            .map_err(optim)?;
            phases.add(clock::take(), step_started.elapsed().as_secs_f64());
            self.progress.global_step += 1;
            self.progress.batch_in_epoch = to;
            window_loss_sum += step_loss;
            steps_since_log += 1;

            let gs = self.progress.global_step;
            let last = gs == self.opts.total_steps;
            let mut new_best = false;
            let log_now = (self.opts.logging_steps > 0 && gs.is_multiple_of(self.opts.logging_steps))
                || (gs == 1 && self.opts.logging_first_step)
                || last;
            if log_now {
                let elapsed = start.elapsed().as_secs_f64();
                let done = (gs - start_step) as f64;
                let mut mean_token_accuracy = None;
                let mut metrics = std::collections::BTreeMap::new();
                for (j, name) in names.iter().enumerate() {
                    let mean = if metric_n[j] > 0.0 { metric_sum[j] / metric_n[j] } else { 0.0 };
                    if *name == "mean_token_accuracy" {
                        mean_token_accuracy = Some(mean);
                    } else if metric_n[j] > 0.0 {
                        metrics.insert((*name).to_owned(), mean);
                    }
                }
                let entry = LogEntry {
                    step: gs,
                    epoch: epoch_now(&self.progress, batches.len()),
                    loss: window_loss_sum / steps_since_log as f64,
                    grad_norm,
                    learning_rate: lr,
                    num_tokens: self.progress.num_tokens,
                    mean_token_accuracy,
                    tokens_per_second: (self.progress.num_tokens - tokens_at_log) as f64
                        / (elapsed - time_at_log).max(1e-9),
                    elapsed_s: elapsed,
                    eta_s: elapsed / done.max(1.0) * (self.opts.total_steps - gs) as f64,
                    metrics,
                };
                if main {
                    on_event(Event::Train(&entry));
                }
                self.progress.log_history.push(entry);
                (window_loss_sum, steps_since_log) = (0.0, 0);
                metric_sum.fill(0.0);
                metric_n.fill(0.0);
                (tokens_at_log, time_at_log) = (self.progress.num_tokens, elapsed);
            }
            if main
                && !eval.is_empty()
                && let Some(every) = self.opts.eval_steps
                && ((every > 0 && gs.is_multiple_of(every)) || last)
            {
                let e = eval.evaluate(self.model, gs, epoch_now(&self.progress, batches.len()))?;
                on_event(Event::Eval(&e));
                if let Some(best) = &self.opts.best {
                    let value = best.value(&e)?;
                    if best.improves(value, self.progress.best_metric) {
                        self.progress.best_metric = Some(value);
                        self.progress.best_global_step = Some(gs);
                        new_best = true;
                    }
                }
                self.progress.eval_history.push(e);
            }
            let stop = stop_now && !last;
            // As transformers' Trainer: every `save_steps` and at the end (`steps`/`epoch`), or at
            // each new best (`best`); an interrupted run saves where it stopped.
            let scheduled =
                self.opts.save_steps.is_some_and(|every| every > 0 && (gs.is_multiple_of(every) || last));
            let on_best = new_best && self.opts.best.as_ref().is_some_and(|b| b.save_on_best);
            if scheduled || on_best || stop {
                if let Some(best) = self.progress.best_global_step {
                    let name = format!("checkpoint-{best}");
                    if best == gs || self.opts.output_dir.join(&name).is_dir() {
                        self.progress.best_model_checkpoint =
                            Some(self.opts.output_dir.join(name).display().to_string());
                    }
                }
                let dir = if main {
                    let dir = Checkpoint::save(
                        &self.opts.output_dir,
                        &self.progress,
                        &self.optimizer,
                        &self.opts.state,
                        (self.opts.learning_rate, self.opts.learning_rate * self.opts.schedule.factor(gs)),
                        save_adapter,
                    )?;
                    on_event(Event::Saved(&dir));
                    let keep = self.progress.best_model_checkpoint.as_deref().map(std::path::Path::new);
                    checkpoint::rotate(&self.opts.output_dir, self.opts.save_total_limit, keep)?;
                    dir
                } else {
                    self.opts.output_dir.join(format!("checkpoint-{gs}"))
                };
                if let Some(g) = group {
                    // Nobody moves on (or exits) before rank 0's checkpoint is in place.
                    g.barrier().map_err(dist_err(gs))?;
                }
                if stop {
                    log_phases(&phases);
                    return Ok(Outcome::Interrupted(dir));
                }
            }
        }
        log_phases(&phases);
        Ok(Outcome::Finished)
    }
}

/// Logs where the steps' time went ([`clock::PhaseTotals`]), as one JSON object.
fn log_phases(phases: &clock::PhaseTotals) {
    if let Some(j) = phases.to_json() {
        tracing::info!("time per step by phase (seconds): {j}");
    }
}

#[cfg(test)]
mod sampler_tests {
    /// The permutations transformers' Trainer draws (accelerate 1.15's seedable sampler, seed 42),
    /// printed by: `set_seed(42)`, `Accelerator(dataloader_config=DataLoaderConfiguration(
    /// use_seedable_sampler=True)).prepare(DataLoader(range(10), sampler=RandomSampler(...)))`,
    /// one epoch after `set_epoch(0)` and `set_epoch(1)`.
    #[test]
    fn epochs_are_ordered_as_transformers_sampler_orders_them() {
        assert_eq!(super::sampler_order(10, 42, 0), [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]);
        assert_eq!(super::sampler_order(10, 42, 1), [8, 4, 9, 0, 5, 1, 6, 7, 2, 3]);
        assert!(super::sampler_order(0, 42, 0).is_empty());
    }
}
