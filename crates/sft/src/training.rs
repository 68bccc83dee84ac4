//! The run plan's training section: the loop's settings as the recipe gives them, with what
//! depends on the data's length (total steps, the schedule, step cadences given as fractions or
//! per epoch) turned into the loop's [`TrainOptions`] once the data is prepared.

use std::path::PathBuf;
use std::time::Duration;

use config::Recipe;
use config::types::{Interval, KwArgs, SaveStrategy, Scheduler};
use sft::train::{AdamWConfig, Schedule, TrainOptions};

/// How often something happens, as transformers' `*_strategy` + `*_steps` say it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Every {
    /// Never.
    No,
    /// At the end of each epoch.
    Epoch,
    /// Every N optimizer steps; below 1, that fraction of the run's steps (rounded up).
    Steps(f64),
}

impl Every {
    fn from_interval(i: Interval, steps: f64) -> Every {
        match i {
            Interval::No => Every::No,
            Interval::Epoch => Every::Epoch,
            Interval::Steps => Every::Steps(steps),
        }
    }

    /// The cadence in optimizer steps for a run of `total` steps, `steps_per_epoch` each epoch.
    pub(crate) fn steps(self, steps_per_epoch: u64, total: u64) -> Option<u64> {
        match self {
            Every::No => None,
            Every::Epoch => Some(steps_per_epoch),
            Every::Steps(f) if f < 1.0 => Some((f * total as f64).ceil() as u64),
            Every::Steps(f) => Some(f as u64),
        }
    }
}

/// The loop's settings from the recipe, before the data says how long an epoch is.
#[derive(Debug, Clone)]
pub(crate) struct TrainingPlan {
    /// `seed`: adapter init, dropout and (without `data_seed`) the data order.
    pub seed: u64,
    /// `data_seed`, else `seed`: the sampler's seed, as transformers seeds it.
    pub data_seed: u64,
    /// `ddp_timeout`: the bound on the rendezvous and every collective.
    pub ddp_timeout: Duration,
    /// `max_steps` when positive; else the run lasts `num_train_epochs`.
    pub max_steps: Option<u64>,
    /// `num_train_epochs` (fractions allowed).
    pub num_train_epochs: f64,
    /// `per_device_train_batch_size` (TrainerState's `train_batch_size`).
    pub train_batch_size: u64,
    /// `lr_scheduler_type`.
    pub scheduler: Scheduler,
    /// `lr_scheduler_kwargs`.
    pub scheduler_kwargs: Option<KwArgs>,
    /// `learning_rate`.
    pub learning_rate: f64,
    /// `warmup_steps` (below 1: a fraction of the run).
    pub warmup_steps: f64,
    /// AdamW's settings.
    pub adam: AdamWConfig,
    /// `max_grad_norm` (0: no clipping).
    pub max_grad_norm: f64,
    /// `logging_strategy` / `logging_steps`.
    pub logging: Every,
    /// `logging_first_step`.
    pub logging_first_step: bool,
    /// `save_strategy` / `save_steps`.
    pub save: Every,
    /// `save_total_limit`.
    pub save_total_limit: Option<usize>,
    /// `eval_strategy` / `eval_steps` (by default `logging_steps`, as transformers does).
    pub eval: Every,
    /// `eval_on_start`.
    pub eval_on_start: bool,
    /// `gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// `neftune_noise_alpha` when positive.
    pub neftune_noise_alpha: Option<f64>,
    /// `router_aux_loss_coef` (unset: a mixture of experts' config.json's).
    pub router_aux_loss_coef: Option<f64>,
    /// `chat_template`: saved beside the adapter, as TRL saves the tokenizer with it.
    pub chat_template: Option<String>,
    /// `metric_for_best_model` and what acts on it (`save_strategy: best`, `load_best_model_at_end`).
    pub best: Option<sft::train::BestModel>,
}

impl TrainingPlan {
    /// The recipe's training keys, checked by the plan before this is called.
    pub(crate) fn from_recipe(recipe: &Recipe) -> TrainingPlan {
        let t = &recipe.training;
        TrainingPlan {
            seed: t.seed,
            data_seed: t.data_seed.unwrap_or(t.seed),
            ddp_timeout: Duration::from_secs(u64::try_from(t.ddp_timeout).unwrap_or(0).max(1)),
            max_steps: u64::try_from(t.max_steps).ok().filter(|&s| s > 0),
            num_train_epochs: t.num_train_epochs,
            train_batch_size: u64::try_from(t.per_device_train_batch_size).unwrap_or(1),
            scheduler: t.lr_scheduler_type,
            scheduler_kwargs: t.lr_scheduler_kwargs.clone(),
            learning_rate: t.learning_rate,
            warmup_steps: t.warmup_steps,
            adam: AdamWConfig {
                beta1: t.adam_beta1,
                beta2: t.adam_beta2,
                eps: t.adam_epsilon,
                weight_decay: t.weight_decay,
                // transformers' default; `adamw_torch` (and the optimizers nibble runs as AdamW)
                // take torch's single-tensor loop.
                fused: t.optim == config::types::Optim::AdamwTorchFused,
            },
            max_grad_norm: t.max_grad_norm,
            logging: Every::from_interval(t.logging_strategy, t.logging_steps),
            logging_first_step: t.logging_first_step,
            save: match t.save_strategy {
                SaveStrategy::Steps => Every::Steps(t.save_steps),
                SaveStrategy::Epoch => Every::Epoch,
                // `best` is refused when the run is planned.
                SaveStrategy::No | SaveStrategy::Best => Every::No,
            },
            save_total_limit: t.save_total_limit.map(|l| l.max(1) as usize),
            eval: Every::from_interval(t.eval_strategy, t.eval_steps.unwrap_or(t.logging_steps)),
            eval_on_start: t.eval_on_start,
            gradient_checkpointing: t.gradient_checkpointing,
            neftune_noise_alpha: t.neftune_noise_alpha.filter(|a| *a > 0.0),
            router_aux_loss_coef: t.router_aux_loss_coef,
            chat_template: t.chat_template.clone(),
            best: best_model(t),
        }
    }

    /// Optimizer steps of the whole run, with `steps_per_epoch` steps in an epoch.
    pub(crate) fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.max_steps.unwrap_or_else(|| (self.num_train_epochs * steps_per_epoch as f64).ceil() as u64)
    }

    /// The schedule over `total` steps.
    pub(crate) fn schedule(&self, total: u64) -> Result<Schedule, sft::Error> {
        Schedule::new(
            &self.scheduler,
            self.scheduler_kwargs.as_ref(),
            self.learning_rate,
            self.warmup_steps,
            total,
        )
    }

    /// The loop's options once the data says how many optimizer steps an epoch has.
    pub(crate) fn options(
        &self,
        steps_per_epoch: u64,
        grad_accum: usize,
        output_dir: PathBuf,
    ) -> Result<TrainOptions, sft::Error> {
        let total_steps = self.total_steps(steps_per_epoch);
        let logging_steps = self.logging.steps(steps_per_epoch, total_steps).unwrap_or(0);
        let save_steps = self.save.steps(steps_per_epoch, total_steps);
        let eval_steps = self.eval.steps(steps_per_epoch, total_steps);
        let state = sft::train::state::StateInfo {
            max_steps: total_steps,
            steps_per_epoch,
            logging_steps,
            eval_steps: eval_steps.unwrap_or(0),
            save_steps: save_steps.unwrap_or(0),
            train_batch_size: self.train_batch_size,
            // As transformers records it: the epochs the steps span, rounded up.
            num_train_epochs: total_steps.div_ceil(steps_per_epoch.max(1)),
        };
        Ok(TrainOptions {
            total_steps,
            grad_accum,
            learning_rate: self.learning_rate,
            schedule: self.schedule(total_steps)?,
            adam: self.adam,
            max_grad_norm: self.max_grad_norm,
            logging_steps,
            logging_first_step: self.logging_first_step,
            save_steps,
            save_total_limit: self.save_total_limit,
            output_dir,
            gradient_checkpointing: self.gradient_checkpointing,
            seed: self.seed,
            eval_steps,
            eval_on_start: self.eval_on_start,
            neftune_noise_alpha: self.neftune_noise_alpha,
            router_aux_loss_coef: self.router_aux_loss_coef,
            state,
            best: self.best.clone(),
        })
    }
}

/// transformers' rules: the metric defaults to `loss` under `load_best_model_at_end`, gets an
/// `eval_` prefix, and higher is better unless its name ends with `loss`. `None` when no metric is
/// set (the plan refuses `save_strategy: best` without one).
pub(crate) fn best_model(t: &config::TrainingArgs) -> Option<sft::train::BestModel> {
    let metric =
        t.metric_for_best_model.clone().or_else(|| t.load_best_model_at_end.then(|| "loss".to_owned()))?;
    let greater_is_better = t.greater_is_better.unwrap_or(!metric.ends_with("loss"));
    let metric = if metric.starts_with("eval_") { metric } else { format!("eval_{metric}") };
    Some(sft::train::BestModel {
        metric,
        greater_is_better,
        save_on_best: t.save_strategy == SaveStrategy::Best,
        load_at_end: t.load_best_model_at_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(yaml: &str) -> Recipe {
        config::Loader::new()
            .yaml("r.yaml", format!("model_name_or_path: m\ndataset_name: d\n{yaml}"))
            .load()
            .expect("recipe")
    }

    #[test]
    fn cadences_resolve_against_the_run_length() {
        assert_eq!(Every::No.steps(7, 100), None);
        assert_eq!(Every::Epoch.steps(7, 100), Some(7));
        assert_eq!(Every::Steps(25.0).steps(7, 100), Some(25));
        assert_eq!(Every::Steps(0.25).steps(7, 10), Some(3), "a fraction of the run, rounded up");
    }

    #[test]
    fn the_recipe_gives_transformers_defaults_and_epochs_decide_the_length() {
        let r = recipe("num_train_epochs: 1.5\neval_strategy: steps\n");
        let plan = TrainingPlan::from_recipe(&r);
        assert_eq!(plan.max_steps, None);
        assert_eq!(plan.total_steps(10), 15);
        assert_eq!(plan.eval, Every::Steps(r.training.logging_steps), "eval_steps defaults to logging_steps");
        let opts = plan.options(10, 2, PathBuf::from("out")).expect("options");
        assert_eq!(
            (opts.total_steps, opts.grad_accum, opts.save_steps),
            (15, 2, Some(500)),
            "transformers saves every 500 steps by default"
        );
        let capped = recipe("max_steps: 4\nsave_strategy: epoch\n");
        let opts = TrainingPlan::from_recipe(&capped).options(10, 1, PathBuf::from("o")).expect("options");
        assert_eq!((opts.total_steps, opts.save_steps), (4, Some(10)));
    }
}
