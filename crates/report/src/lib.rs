//! What a run logs while it trains (usable alone: it links no libtorch) and what it leaves in `output_dir` when done, as transformers'
//! Trainer and TRL's SFTTrainer do: `log.jsonl` (one flushed JSON line per log, the keys of
//! `trainer_state.json`'s `log_history`), TensorBoard event files with transformers'
//! `TensorBoardCallback` tags when `report_to` asks for them, and at the end `loss.png`, a
//! PEFT-style `README.md` model card, `train_results.json` / `all_results.json` and the resolved
//! `recipe.yaml`, each written atomically.
//!
//! ```text
//! Reporter::new(out, ReportOptions::from_recipe(..)) -> log_train / log_eval (per log)
//!                                                    -> finish(&RunSummary) (once, at the end)
//! ```

#![deny(missing_docs)]

mod card;
mod clock;
mod error;
mod files;
mod font;
mod plot;
pub mod tfevents;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use config::Recipe;
use config::types::ReportTo;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value as J};

pub use card::{LIBTORCH_VERSION, PEFT_VERSION, TAGS, TRL_VERSION, datasets, hyperparameters};
pub use clock::{hostname, logdir_stamp};
pub use error::ReportError;
pub use files::{TOKENIZER_FILES, copy_tokenizer_files, save_metrics, write_atomic};
pub use plot::{Curve, EVAL_COLOR, LossPlot, TRAIN_COLOR};

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
    /// Mean over the window's micro-batches of next-token accuracy (TRL's `mean_token_accuracy`),
    /// when the objective measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_token_accuracy: Option<f64>,
    /// Input tokens per second since the previous log.
    pub tokens_per_second: f64,
    /// Seconds since training started (this process).
    pub elapsed_s: f64,
    /// Estimated seconds to the end.
    pub eta_s: f64,
    /// The objective's own metrics under TRL's names (DPO's `rewards/chosen`, `logps/chosen`,
    /// ...), means over the micro-batches since the previous log.
    #[serde(default, flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
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
    /// The objective's own eval metrics under TRL's names (DPO's `eval_rewards/margins`, ...).
    #[serde(default, flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// The JSON Lines log in `output_dir`, one object per log call.
pub const LOG_FILE: &str = "log.jsonl";
/// The loss plot in `output_dir`.
pub const PLOT_FILE: &str = "loss.png";
/// The reward-margin plot a DPO run leaves beside the loss plot.
pub const REWARDS_PLOT_FILE: &str = "rewards.png";
/// The metric [`REWARDS_PLOT_FILE`] draws (TRL's name).
pub const MARGIN_METRIC: &str = "rewards/margins";
/// The model card in `output_dir`.
pub const CARD_FILE: &str = "README.md";
/// The resolved recipe in `output_dir`, so the folder says how it was made.
pub const RECIPE_FILE: &str = "recipe.yaml";

/// Keys of a log line that are bookkeeping, not metrics: never sent to TensorBoard.
const NOT_SCALARS: [&str; 3] = ["step", "elapsed_s", "eta_s"];

/// `null` (how serde_json writes NaN and infinities) reads back as NaN, so a diverged value
/// does not make its line unreadable.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One training log, with the keys transformers and TRL log (`loss`, `grad_norm`,
/// `learning_rate`, `num_tokens`, `mean_token_accuracy`, `epoch`, `step`) plus nibble's
/// throughput and timing, so the JSONL line, TensorBoard and the terminal show the same numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// Mean loss over the optimizer steps since the previous log.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Gradient norm before clipping, at this step.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Learning rate used at this step.
    #[serde(deserialize_with = "nan_if_null")]
    pub learning_rate: f64,
    /// Mean entropy of the predicted token distributions (TRL logs it), when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
    /// Tokens trained on so far (nibble's loop counts loss-bearing label tokens).
    pub num_tokens: u64,
    /// Fraction of label tokens predicted right (TRL's `mean_token_accuracy`), when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_token_accuracy: Option<f64>,
    /// Fractional epoch.
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch: f64,
    /// Optimizer steps done.
    pub step: u64,
    /// Tokens per second since this process started training.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_second: f64,
    /// Seconds since this process started training.
    #[serde(deserialize_with = "nan_if_null")]
    pub elapsed_s: f64,
    /// Estimated seconds to the last step, at this process's pace.
    #[serde(deserialize_with = "nan_if_null")]
    pub eta_s: f64,
    /// The objective's own metrics (DPO's rewards and log-probs), under TRL's names.
    #[serde(default, flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl From<&LogEntry> for TrainLog {
    /// The loop's log entry as a report line.
    fn from(e: &LogEntry) -> TrainLog {
        // TRL's `entropy` has its own field (DPO's objective reports it with its metrics).
        let mut metrics = e.metrics.clone();
        let entropy = metrics.remove("entropy");
        TrainLog {
            loss: e.loss,
            grad_norm: e.grad_norm,
            learning_rate: e.learning_rate,
            entropy,
            num_tokens: e.num_tokens,
            mean_token_accuracy: e.mean_token_accuracy,
            epoch: e.epoch,
            step: e.step,
            tokens_per_second: e.tokens_per_second,
            elapsed_s: e.elapsed_s,
            eta_s: e.eta_s,
            metrics,
        }
    }
}

/// One evaluation, with the keys transformers logs for it (`eval_loss`, `eval_runtime`,
/// TRL's `eval_mean_token_accuracy`, `epoch`, `step`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalLog {
    /// Mean loss over the evaluation set's label tokens.
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_loss: f64,
    /// Seconds the evaluation took.
    #[serde(deserialize_with = "nan_if_null")]
    pub eval_runtime: f64,
    /// Fraction of label tokens predicted right, when computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_mean_token_accuracy: Option<f64>,
    /// Fractional epoch at the evaluation.
    #[serde(deserialize_with = "nan_if_null")]
    pub epoch: f64,
    /// Optimizer steps done at the evaluation.
    pub step: u64,
    /// The objective's own eval metrics (DPO's `eval_rewards/margins`, ...).
    #[serde(default, flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

impl From<&EvalEntry> for EvalLog {
    /// The loop's evaluation as a report line.
    fn from(e: &EvalEntry) -> EvalLog {
        EvalLog {
            eval_loss: e.eval_loss,
            eval_runtime: e.eval_runtime,
            eval_mean_token_accuracy: Some(e.eval_mean_token_accuracy),
            epoch: e.epoch,
            step: e.step,
            metrics: e.metrics.clone(),
        }
    }
}

/// True when `report_to` asks for TensorBoard (`tensorboard` or `all`), the one integration
/// nibble writes besides its own JSONL.
pub fn wants_tensorboard(report_to: &ReportTo) -> bool {
    let has = |s: &str| s == "tensorboard" || s == "all";
    match report_to {
        ReportTo::One(s) => has(s),
        ReportTo::Many(v) => v.iter().any(|s| has(s)),
    }
}

/// The integrations `report_to` names that nibble does not write (`wandb`, `trackio`, ...), so
/// the run can say they are not acted on.
pub fn unsupported_integrations(report_to: &ReportTo) -> Vec<String> {
    let names = match report_to {
        ReportTo::One(s) => vec![s.clone()],
        ReportTo::Many(v) => v.clone(),
    };
    names.into_iter().filter(|s| !matches!(s.as_str(), "none" | "all" | "tensorboard")).collect()
}

/// Which sinks a [`Reporter`] writes and where; plain data resolved from the recipe.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReportOptions {
    /// Also write TensorBoard event files.
    pub tensorboard: bool,
    /// Folder of the event files; default `<output_dir>/runs/<%b%d_%H-%M-%S>_<host>` as
    /// transformers (which reads `TENSORBOARD_LOGGING_DIR`; nibble's binary may pass it here).
    pub logging_dir: Option<PathBuf>,
    /// Run name (title of the plot, the card's `model_name`); default the output folder's name.
    pub run_name: Option<String>,
    /// Resuming from this step: `log.jsonl` keeps its lines up to it and drops later ones (they
    /// belong to steps about to be redone). `None`: a fresh run, `log.jsonl` starts empty.
    pub resume_from_step: Option<u64>,
}

impl ReportOptions {
    /// From the recipe's `report_to` and `run_name` (a fresh run; set `resume_from_step` and
    /// `logging_dir` afterwards if needed). Warns about integrations nibble does not write.
    pub fn from_recipe(recipe: &Recipe) -> ReportOptions {
        let unsupported = unsupported_integrations(&recipe.training.report_to);
        if !unsupported.is_empty() {
            tracing::warn!(
                "report_to: {} not supported; nibble writes log.jsonl and, with `tensorboard`, TensorBoard events",
                unsupported.join(", ")
            );
        }
        ReportOptions {
            tensorboard: wants_tensorboard(&recipe.training.report_to),
            logging_dir: None,
            run_name: recipe.training.run_name.clone(),
            resume_from_step: None,
        }
    }
}

/// What the end-of-run files say beyond the logs: the card's facts and the numbers
/// transformers' speed metrics need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Base model id or path (`base_model` in the card).
    pub base_model: String,
    /// The card's title and `model_name`.
    pub model_name: String,
    /// Datasets trained on.
    pub datasets: Vec<String>,
    /// Hyperparameters listed in the card, in order.
    pub hyperparameters: Vec<(String, String)>,
    /// The resolved recipe (`Recipe::to_yaml`), written to `recipe.yaml`.
    pub recipe_yaml: String,
    /// Optimizer steps of the whole schedule.
    pub max_steps: u64,
    /// Samples of the whole schedule, as transformers counts them (`max_steps * batch * accum`
    /// with `max_steps`, else `rows * num_train_epochs`); 0 omits `train_samples_per_second`.
    pub num_train_samples: f64,
    /// Rows of the training set (the handbook's `train_samples` metric).
    pub train_rows: Option<u64>,
    /// Floating-point operations, when counted (`total_flos`).
    pub total_flos: Option<f64>,
    /// How transformers counts samples once the run's length is known
    /// ([`RunSummary::set_run_length`]): `Some(batch * accumulation)` per step when the recipe
    /// sets `max_steps`, else `None` (rows times `epochs`).
    pub samples_per_step: Option<f64>,
    /// `num_train_epochs`.
    pub epochs: f64,
    /// Which trainer made the adapter (the card's method and tags).
    pub trainer: config::Trainer,
}

impl RunSummary {
    /// The summary of a run of `recipe` with `max_steps` optimizer steps over `train_rows` rows.
    pub fn from_recipe(recipe: &Recipe, max_steps: u64, train_rows: u64) -> RunSummary {
        let mut s = Self::for_recipe(recipe);
        s.set_run_length(max_steps, train_rows);
        s
    }

    /// Set the run's length once the data is prepared: `max_steps` optimizer steps over
    /// `train_rows` rows (and the sample count transformers derives from them).
    pub fn set_run_length(&mut self, max_steps: u64, train_rows: u64) {
        self.max_steps = max_steps;
        self.train_rows = Some(train_rows);
        self.num_train_samples = match self.samples_per_step {
            Some(per_step) => max_steps as f64 * per_step,
            None => train_rows as f64 * self.epochs,
        };
    }

    /// What the recipe says of the run before its length is known (the run plan holds it).
    pub fn for_recipe(recipe: &Recipe) -> RunSummary {
        let t = &recipe.training;
        let out = t.output_dir.as_deref().unwrap_or("trainer_output");
        let model_name = t.run_name.clone().unwrap_or_else(|| folder_name(Path::new(out)));
        RunSummary {
            base_model: recipe.model.model_name_or_path.clone().unwrap_or_default(),
            model_name,
            datasets: datasets(recipe),
            hyperparameters: hyperparameters(recipe),
            recipe_yaml: recipe.to_yaml(),
            max_steps: 0,
            num_train_samples: 0.0,
            train_rows: None,
            total_flos: None,
            samples_per_step: (t.max_steps > 0)
                .then(|| (t.per_device_train_batch_size * t.gradient_accumulation_steps) as f64),
            epochs: t.num_train_epochs,
            trainer: recipe.trainer,
        }
    }
}

fn folder_name(p: &Path) -> String {
    std::path::absolute(p)
        .ok()
        .and_then(|a| a.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "nibble-adapter".to_owned())
}

/// What [`Reporter::finish`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Every file written, in order.
    pub files: Vec<PathBuf>,
    /// The final train metrics (`train_loss`, `train_runtime`, ...), as in `train_results.json`.
    pub metrics: BTreeMap<String, f64>,
}

/// Writes a run's logs as they come (JSONL always, TensorBoard when asked) and its final files.
#[derive(Debug)]
pub struct Reporter {
    output_dir: PathBuf,
    log_path: PathBuf,
    log: File,
    tb: Option<tfevents::EventWriter>,
    logging_dir: Option<PathBuf>,
    run_name: String,
    train: Vec<TrainLog>,
    eval: Vec<EvalLog>,
    /// Index in `train` of this process's first log.
    session_from: usize,
    start_step: u64,
    created: Instant,
}

impl Reporter {
    /// Start reporting into `output_dir` (created if missing): open `log.jsonl` (emptied, or on
    /// resume cut back to the resumed step) and, when asked, a TensorBoard event file.
    pub fn new(output_dir: &Path, opts: ReportOptions) -> Result<Reporter, ReportError> {
        std::fs::create_dir_all(output_dir).map_err(ReportError::io("creating", output_dir))?;
        let log_path = output_dir.join(LOG_FILE);
        let (mut train, mut eval) = (Vec::new(), Vec::new());
        let log = match opts.resume_from_step {
            None => File::create(&log_path).map_err(ReportError::io("creating", &log_path))?,
            Some(step) => {
                let kept = earlier_lines(&log_path, step)?;
                let mut text = String::new();
                for v in &kept {
                    text.push_str(&v.to_string());
                    text.push('\n');
                    if v.get("loss").is_some() {
                        train.extend(serde_json::from_value::<TrainLog>(v.clone()).ok());
                    } else if v.get("eval_loss").is_some() {
                        eval.extend(serde_json::from_value::<EvalLog>(v.clone()).ok());
                    }
                }
                write_atomic(&log_path, text.as_bytes())?;
                OpenOptions::new()
                    .append(true)
                    .open(&log_path)
                    .map_err(ReportError::io("opening", &log_path))?
            }
        };
        let (tb, logging_dir) = if opts.tensorboard {
            let dir = opts.logging_dir.clone().unwrap_or_else(|| {
                let stamp = logdir_stamp(clock::unix_now() as i64);
                output_dir.join("runs").join(format!("{stamp}_{}", hostname()))
            });
            (Some(tfevents::EventWriter::create(&dir)?), Some(dir))
        } else {
            (None, None)
        };
        let run_name = opts.run_name.clone().unwrap_or_else(|| folder_name(output_dir));
        let session_from = train.len();
        Ok(Reporter {
            output_dir: output_dir.to_owned(),
            log_path,
            log,
            tb,
            logging_dir,
            run_name,
            train,
            eval,
            session_from,
            start_step: opts.resume_from_step.unwrap_or(0),
            created: Instant::now(),
        })
    }

    /// Where TensorBoard events go (`None` without TensorBoard), to tell the user what to open.
    pub fn logging_dir(&self) -> Option<&Path> {
        self.logging_dir.as_deref()
    }

    /// The event file being written, if any.
    pub fn event_file(&self) -> Option<&Path> {
        self.tb.as_ref().map(|t| t.path())
    }

    /// Every train log of the run (those kept from before a resume included).
    pub fn train_history(&self) -> &[TrainLog] {
        &self.train
    }

    /// Every eval log of the run.
    pub fn eval_history(&self) -> &[EvalLog] {
        &self.eval
    }

    /// Append one train log: a `log.jsonl` line and the `train/*` scalars.
    pub fn log_train(&mut self, log: &TrainLog) -> Result<(), ReportError> {
        self.emit(log.step, &to_map(log))?;
        self.train.push(log.clone());
        Ok(())
    }

    /// Append one eval log: a `log.jsonl` line and the `eval/*` scalars.
    pub fn log_eval(&mut self, log: &EvalLog) -> Result<(), ReportError> {
        self.emit(log.step, &to_map(log))?;
        self.eval.push(log.clone());
        Ok(())
    }

    /// A text summary in TensorBoard (transformers logs its arguments as `args`); no-op without
    /// TensorBoard.
    pub fn log_text(&mut self, tag: &str, text: &str) -> Result<(), ReportError> {
        let step = self.train.last().map_or(self.start_step, |l| l.step) as i64;
        match &mut self.tb {
            Some(tb) => tb.add_text(step, clock::unix_now(), tag, text),
            None => Ok(()),
        }
    }

    /// A line to `log.jsonl` (flushed) and its numbers to TensorBoard under transformers' tags.
    fn emit(&mut self, step: u64, map: &Map<String, J>) -> Result<(), ReportError> {
        let mut line = serde_json::to_string(map).map_err(|source| ReportError::Json {
            path: self.log_path.clone(),
            line: None,
            source,
        })?;
        line.push('\n');
        self.log.write_all(line.as_bytes()).map_err(ReportError::io("writing", &self.log_path))?;
        self.log.flush().map_err(ReportError::io("flushing", &self.log_path))?;
        if let Some(tb) = &mut self.tb {
            let scalars: Vec<(String, f64)> = map
                .iter()
                .filter(|(k, _)| !NOT_SCALARS.contains(&k.as_str()))
                .filter_map(|(k, v)| v.as_f64().map(|x| (tensorboard_tag(k), x)))
                .collect();
            tb.add_scalars(step as i64, clock::unix_now(), &scalars)?;
        }
        Ok(())
    }

    /// This process's mean train loss per optimizer step (transformers' `train_loss`): each
    /// log's loss weighted by the steps it covers.
    pub fn train_loss(&self) -> Option<f64> {
        let logs = &self.train[self.session_from..];
        let (mut prev, mut sum) = (self.start_step, 0.0);
        for l in logs {
            sum += l.loss * l.step.saturating_sub(prev) as f64;
            prev = prev.max(l.step);
        }
        let steps = prev.saturating_sub(self.start_step);
        (steps > 0).then(|| sum / steps as f64)
    }

    /// The final metrics as transformers' `_finalize_training` computes them.
    fn final_metrics(&self, s: &RunSummary) -> BTreeMap<String, f64> {
        let session = &self.train[self.session_from..];
        let runtime = session.last().map_or_else(|| self.created.elapsed().as_secs_f64(), |l| l.elapsed_s);
        let steps_run = session.last().map_or(0, |l| l.step.saturating_sub(self.start_step));
        let mut m = BTreeMap::new();
        m.insert("train_runtime".to_owned(), round(runtime, 4));
        if runtime > 0.0 {
            if s.num_train_samples > 0.0 && s.max_steps > 0 {
                let samples = s.num_train_samples * steps_run as f64 / s.max_steps as f64;
                m.insert("train_samples_per_second".to_owned(), round(samples / runtime, 3));
            }
            m.insert("train_steps_per_second".to_owned(), round(steps_run as f64 / runtime, 3));
        }
        if let Some(f) = s.total_flos {
            m.insert("total_flos".to_owned(), f);
        }
        if let Some(l) = self.train_loss() {
            m.insert("train_loss".to_owned(), l);
        }
        let epoch = self.train.last().map(|l| l.epoch).into_iter().chain(self.eval.last().map(|e| e.epoch));
        if let Some(e) = epoch.fold(None, |a: Option<f64>, e| Some(a.map_or(e, |a| a.max(e)))) {
            m.insert("epoch".to_owned(), e);
        }
        m
    }

    /// End of run: log the final metrics (JSONL and TensorBoard, as `Trainer.log(metrics)`), then
    /// write atomically `recipe.yaml`, `train_results.json` / `all_results.json` (and
    /// `eval_results.json` after an evaluation), `loss.png` and `README.md`.
    pub fn finish(mut self, summary: &RunSummary) -> Result<Finished, ReportError> {
        let metrics = self.final_metrics(summary);
        let step = self.train.last().map_or(self.start_step, |l| l.step);
        let mut line = Map::new();
        for key in [
            "train_runtime",
            "train_samples_per_second",
            "train_steps_per_second",
            "total_flos",
            "train_loss",
            "epoch",
        ] {
            if let Some(v) = metrics.get(key) {
                line.insert(key.to_owned(), json_f64(*v));
            }
        }
        line.insert("step".to_owned(), J::from(step));
        self.emit(step, &line)?;

        let out = self.output_dir.clone();
        let mut files = Vec::new();
        let recipe = out.join(RECIPE_FILE);
        write_atomic(&recipe, summary.recipe_yaml.as_bytes())?;
        files.push(recipe);

        let mut train_metrics: BTreeMap<String, J> =
            metrics.iter().map(|(k, v)| (k.clone(), json_f64(*v))).collect();
        if let Some(rows) = summary.train_rows {
            train_metrics.insert("train_samples".to_owned(), J::from(rows));
        }
        files.extend(save_metrics(&out, "train", &train_metrics)?);
        if let Some(e) = self.eval.last() {
            let mut em: BTreeMap<String, J> = to_map(e).into_iter().filter(|(k, _)| k != "step").collect();
            em.retain(|_, v| !v.is_null());
            files.extend(
                save_metrics(&out, "eval", &em)?
                    .into_iter()
                    .filter(|p| !files.contains(p))
                    .collect::<Vec<_>>(),
            );
        }

        let train_pts: Vec<(f64, f64)> = self.train.iter().map(|l| (l.step as f64, l.loss)).collect();
        let eval_pts: Vec<(f64, f64)> = self.eval.iter().map(|l| (l.step as f64, l.eval_loss)).collect();
        let title = if summary.model_name.is_empty() { &self.run_name } else { &summary.model_name };
        let plot = LossPlot::render(&format!("{title}: loss"), &train_pts, &eval_pts);
        let png_path = out.join(PLOT_FILE);
        let png = plot.to_png().map_err(|source| ReportError::Png { path: png_path.clone(), source })?;
        write_atomic(&png_path, &png)?;
        files.push(png_path);
        let margins: Vec<(f64, f64)> = self
            .train
            .iter()
            .filter_map(|l| l.metrics.get(MARGIN_METRIC).map(|m| (l.step as f64, *m)))
            .collect();
        if !margins.is_empty() {
            let curve = Curve {
                label: "train reward margin".into(),
                color: TRAIN_COLOR,
                points: margins,
                markers: false,
            };
            let plot = LossPlot::render_curves(&format!("{title}: reward margin"), "margin", &[curve]);
            let path = out.join(REWARDS_PLOT_FILE);
            let png = plot.to_png().map_err(|source| ReportError::Png { path: path.clone(), source })?;
            write_atomic(&path, &png)?;
            files.push(path);
        }

        let tensorboard = self.logging_dir.as_ref().map(|d| {
            d.strip_prefix(&out).map_or_else(|_| d.display().to_string(), |r| r.display().to_string())
        });
        let card = card::render(&card::CardInput {
            summary,
            output_dir: &out.display().to_string(),
            train: &self.train,
            eval: &self.eval,
            metrics: &metrics,
            tensorboard,
        });
        let card_path = out.join(CARD_FILE);
        write_atomic(&card_path, card.as_bytes())?;
        files.push(card_path);
        Ok(Finished { files, metrics })
    }
}

/// transformers' `rewrite_logs`: `eval_x` -> `eval/x`, `test_x` -> `test/x`, else `train/x`.
pub fn tensorboard_tag(key: &str) -> String {
    if let Some(k) = key.strip_prefix("eval_") {
        format!("eval/{k}")
    } else if let Some(k) = key.strip_prefix("test_") {
        format!("test/{k}")
    } else {
        format!("train/{key}")
    }
}

fn to_map(v: &impl Serialize) -> Map<String, J> {
    match serde_json::to_value(v) {
        Ok(J::Object(m)) => m,
        _ => Map::new(),
    }
}

fn json_f64(v: f64) -> J {
    serde_json::Number::from_f64(v).map_or(J::Null, J::Number)
}

/// Python's `round(x, digits)` closely enough for speed metrics.
fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// The lines of an existing `log.jsonl` up to `step` (unreadable lines, such as one cut short by
/// a crash, are dropped with a warning).
fn earlier_lines(path: &Path, step: u64) -> Result<Vec<J>, ReportError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ReportError::io("reading", path)(e)),
    };
    let mut kept = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<J>(line) {
            Ok(v) if v.get("step").and_then(J::as_u64).is_some_and(|s| s <= step) => kept.push(v),
            Ok(_) => {}
            Err(e) => tracing::warn!("{}, line {}: dropped unreadable log line ({e})", path.display(), i + 1),
        }
    }
    Ok(kept)
}

/// `h:mm:ss` (or `m:ss`) for the terminal.
fn clock_time(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The terminal line for a train log: step of total, loss, learning rate, gradient norm,
/// throughput, accuracy when known, epoch, elapsed time and ETA.
pub fn format_log_line(log: &TrainLog, total_steps: u64) -> String {
    let pct = if total_steps > 0 { 100.0 * log.step as f64 / total_steps as f64 } else { 0.0 };
    let width = total_steps.to_string().len();
    let mut s = format!(
        "step {:>width$}/{total_steps} ({pct:3.0}%) | loss {:.4} | lr {:.3e} | grad_norm {:.3} | {:.0} tok/s",
        log.step, log.loss, log.learning_rate, log.grad_norm, log.tokens_per_second
    );
    if let Some(a) = log.mean_token_accuracy {
        s.push_str(&format!(" | acc {:.1}%", a * 100.0));
    }
    if let (Some(m), Some(a)) = (log.metrics.get("rewards/margins"), log.metrics.get("rewards/accuracies")) {
        s.push_str(&format!(" | margin {m:.4} | pref acc {:.1}%", a * 100.0));
    }
    s.push_str(&format!(
        " | epoch {:.2} | {} elapsed | ETA {}",
        log.epoch,
        clock_time(log.elapsed_s),
        clock_time(log.eta_s)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> LogEntry {
        LogEntry {
            step: 50,
            epoch: 0.5,
            loss: 1.25,
            grad_norm: 0.5,
            learning_rate: 2e-4,
            num_tokens: 20000,
            mean_token_accuracy: Some(0.6123),
            tokens_per_second: 160.4,
            elapsed_s: 125.0,
            eta_s: 375.0,
            metrics: BTreeMap::new(),
        }
    }

    #[test]
    fn terminal_line_has_every_number() {
        let l = TrainLog::from(&entry());
        let s = format_log_line(&l, 200);
        for want in [
            "step  50/200",
            "( 25%)",
            "loss 1.2500",
            "lr 2.000e-4",
            "grad_norm 0.500",
            "160 tok/s",
            "acc 61.2%",
            "epoch 0.50",
            "2:05 elapsed",
            "ETA 6:15",
        ] {
            assert!(s.contains(want), "{want:?} missing from {s:?}");
        }
        assert_eq!(clock_time(3723.0), "1:02:03");
        let no_acc = TrainLog { mean_token_accuracy: None, ..l };
        assert!(!format_log_line(&no_acc, 200).contains("acc"));
    }

    #[test]
    fn tags_follow_transformers_rewrite_logs() {
        assert_eq!(tensorboard_tag("loss"), "train/loss");
        assert_eq!(tensorboard_tag("eval_loss"), "eval/loss");
        assert_eq!(tensorboard_tag("test_runtime"), "test/runtime");
        assert_eq!(tensorboard_tag("epoch"), "train/epoch");
    }

    #[test]
    fn report_to_selects_tensorboard() {
        assert!(wants_tensorboard(&ReportTo::One("tensorboard".into())));
        assert!(wants_tensorboard(&ReportTo::One("all".into())));
        assert!(wants_tensorboard(&ReportTo::Many(vec!["wandb".into(), "tensorboard".into()])));
        assert!(!wants_tensorboard(&ReportTo::One("none".into())));
        assert_eq!(
            unsupported_integrations(&ReportTo::Many(vec!["wandb".into(), "all".into()])),
            vec!["wandb"]
        );
    }

    #[test]
    fn null_reads_back_as_nan() {
        let l = TrainLog { loss: f64::NAN, ..TrainLog::default() };
        let line = serde_json::to_string(&l).expect("serializes");
        assert!(line.contains("\"loss\":null"));
        let back: TrainLog = serde_json::from_str(&line).expect("parses");
        assert!(back.loss.is_nan());
    }
}
