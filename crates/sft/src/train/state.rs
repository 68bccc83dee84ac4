//! `trainer_state.json` in transformers' `TrainerState` shape, so that
//! `TrainerState.load_from_json` reads the file a run leaves and every checkpoint's: its own keys
//! only (the dataclass refuses any other), evaluations inside `log_history` as the Trainer logs
//! them, and nibble's resume fields (the epoch index, the micro-batch within it, the token count,
//! the world size, the optimizer step) in a `stateful_callbacks` entry of their own, which
//! transformers ignores with a warning when it resumes.

use serde_json::{Map, Value, json};

use super::Progress;
use report::{EvalEntry, LogEntry};

/// The `stateful_callbacks` entry holding nibble's resume fields.
pub const NIBBLE_STATE: &str = "NibbleProgress";

/// The run's settings TrainerState records beside its progress.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StateInfo {
    /// Optimizer steps of the whole run (`max_steps`).
    pub max_steps: u64,
    /// Optimizer steps per epoch (for the fractional `epoch`).
    pub steps_per_epoch: u64,
    /// `logging_steps` (0: never).
    pub logging_steps: u64,
    /// `eval_steps` (0: never).
    pub eval_steps: u64,
    /// `save_steps` (0: never).
    pub save_steps: u64,
    /// Sequences per device per micro-batch.
    pub train_batch_size: u64,
    /// Epochs the run lasts (transformers records a whole number, rounded up).
    pub num_train_epochs: u64,
}

/// The file's JSON: TrainerState's keys, `log_history` with the evaluations in step order (each
/// after the training log of its step), nibble's resume fields under [`NIBBLE_STATE`].
pub fn to_json(p: &Progress, info: &StateInfo, optimizer_step: Option<u64>) -> Value {
    let mut history: Vec<(u64, u8, Value)> = Vec::new();
    for e in &p.log_history {
        history.push((e.step, 0, serde_json::to_value(e).unwrap_or(Value::Null)));
    }
    for e in &p.eval_history {
        history.push((e.step, 1, serde_json::to_value(e).unwrap_or(Value::Null)));
    }
    history.sort_by_key(|(step, kind, _)| (*step, *kind));
    let epoch = if info.steps_per_epoch > 0 {
        p.global_step as f64 / info.steps_per_epoch as f64
    } else {
        p.log_history.last().map_or(0.0, |e| e.epoch)
    };
    let mut attributes = json!({
        "epoch_index": p.epoch,
        "batch_in_epoch": p.batch_in_epoch,
        "num_tokens": p.num_tokens,
        "world_size": p.world_size,
    });
    if let Some(step) = optimizer_step {
        attributes["optimizer_step"] = json!(step);
    }
    json!({
        "best_global_step": p.best_global_step,
        "best_metric": p.best_metric,
        "best_model_checkpoint": p.best_model_checkpoint,
        "epoch": epoch,
        "eval_steps": info.eval_steps,
        "global_step": p.global_step,
        "is_hyper_param_search": false,
        "is_local_process_zero": true,
        "is_world_process_zero": true,
        "log_history": history.into_iter().map(|(_, _, v)| v).collect::<Vec<_>>(),
        "logging_steps": info.logging_steps,
        "max_steps": info.max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": info.num_train_epochs,
        "save_steps": info.save_steps,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": false,
                    "should_evaluate": false,
                    "should_log": false,
                    "should_save": true,
                    "should_training_stop": p.global_step >= info.max_steps && info.max_steps > 0,
                },
                "attributes": {},
            },
            NIBBLE_STATE: { "args": {}, "attributes": attributes },
        },
        "total_flos": 0.0,
        "train_batch_size": info.train_batch_size,
        "trial_name": null,
        "trial_params": null,
    })
}

/// Who wrote a `trainer_state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// nibble: the data position (epoch, micro-batch) is recorded exactly.
    Nibble,
    /// transformers' Trainer (TRL): only `global_step`; the position follows from it as the
    /// Trainer computes it on resume, and `Progress::epoch` / `batch_in_epoch` are 0 until then.
    Transformers,
}

/// The progress and optimizer step a `trainer_state.json` records, and who wrote it: nibble
/// (TrainerState shape, or the flat shape of checkpoints written before it) or transformers.
pub fn from_json(v: &Value) -> Result<(Progress, Option<u64>, Origin), String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let Some(ours) = obj.get("stateful_callbacks").and_then(|c| c.get(NIBBLE_STATE)) else {
        if !obj.contains_key("batch_in_epoch") && obj.contains_key("log_history") {
            return Ok((from_transformers(obj)?, None, Origin::Transformers));
        }
        // Written before the TrainerState shape: the progress itself, plus `optimizer_step`.
        let step = obj.get("optimizer_step").and_then(Value::as_u64);
        let p: Progress = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        return Ok((p, step, Origin::Nibble));
    };
    let a = ours.get("attributes").and_then(Value::as_object).ok_or("no attributes in NibbleProgress")?;
    let num =
        |k: &str| a.get(k).and_then(Value::as_u64).ok_or_else(|| format!("NibbleProgress has no `{k}`"));
    let global_step = obj.get("global_step").and_then(Value::as_u64).ok_or("no `global_step`")?;
    let mut log_history = Vec::new();
    let mut eval_history = Vec::new();
    for (i, e) in obj.get("log_history").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let is_eval = e.get("eval_loss").is_some();
        let bad = |err: serde_json::Error| format!("log_history[{i}]: {err}");
        if is_eval {
            eval_history.push(serde_json::from_value::<EvalEntry>(e.clone()).map_err(bad)?);
        } else {
            log_history.push(serde_json::from_value::<LogEntry>(e.clone()).map_err(bad)?);
        }
    }
    let progress = Progress {
        global_step,
        epoch: num("epoch_index")?,
        batch_in_epoch: usize::try_from(num("batch_in_epoch")?).map_err(|e| e.to_string())?,
        num_tokens: num("num_tokens")?,
        log_history,
        eval_history,
        world_size: num("world_size")?,
        best_metric: obj.get("best_metric").and_then(Value::as_f64),
        best_global_step: obj.get("best_global_step").and_then(Value::as_u64),
        best_model_checkpoint: obj.get("best_model_checkpoint").and_then(Value::as_str).map(str::to_owned),
    };
    Ok((progress, a.get("optimizer_step").and_then(Value::as_u64), Origin::Nibble))
}

/// The TrainerState keys of a file (for tests and tools that check the shape).
pub fn keys(v: &Value) -> Vec<String> {
    v.as_object().map(Map::keys).into_iter().flatten().cloned().collect()
}

/// A Trainer's own state: `global_step`, the best-checkpoint fields, and `log_history` read
/// leniently (its entries carry what TRL logged: `num_tokens` as a float, `entropy`, no timing).
fn from_transformers(obj: &Map<String, Value>) -> Result<Progress, String> {
    let global_step = obj.get("global_step").and_then(Value::as_u64).ok_or("no `global_step`")?;
    let f = |e: &Map<String, Value>, k: &str| e.get(k).and_then(Value::as_f64);
    let mut log_history = Vec::new();
    let mut eval_history = Vec::new();
    for e in
        obj.get("log_history").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_object)
    {
        let step = e.get("step").and_then(Value::as_u64).unwrap_or(0);
        let epoch = f(e, "epoch").unwrap_or(0.0);
        let rest = |skip: &[&str]| -> std::collections::BTreeMap<String, f64> {
            e.iter()
                .filter(|(k, _)| !skip.contains(&k.as_str()))
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect()
        };
        if let Some(eval_loss) = f(e, "eval_loss") {
            eval_history.push(EvalEntry {
                step,
                epoch,
                eval_loss,
                eval_mean_token_accuracy: f(e, "eval_mean_token_accuracy").unwrap_or(0.0),
                eval_runtime: f(e, "eval_runtime").unwrap_or(0.0),
                metrics: rest(&["step", "epoch", "eval_loss", "eval_mean_token_accuracy", "eval_runtime"]),
            });
        } else if let Some(loss) = f(e, "loss") {
            let known =
                ["step", "epoch", "loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy"];
            log_history.push(LogEntry {
                step,
                epoch,
                loss,
                grad_norm: f(e, "grad_norm").unwrap_or(0.0),
                learning_rate: f(e, "learning_rate").unwrap_or(0.0),
                num_tokens: f(e, "num_tokens").map_or(0, |n| n.max(0.0) as u64),
                mean_token_accuracy: f(e, "mean_token_accuracy"),
                tokens_per_second: 0.0,
                elapsed_s: 0.0,
                eta_s: 0.0,
                metrics: rest(&known),
            });
        }
        // (The closing summary, `train_runtime` and friends, is the Trainer's and not progress.)
    }
    Ok(Progress {
        global_step,
        epoch: 0,
        batch_in_epoch: 0,
        num_tokens: log_history.last().map_or(0, |e| e.num_tokens),
        log_history,
        eval_history,
        world_size: 0,
        best_metric: obj.get("best_metric").and_then(Value::as_f64),
        best_global_step: obj.get("best_global_step").and_then(Value::as_u64),
        best_model_checkpoint: obj.get("best_model_checkpoint").and_then(Value::as_str).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn progress() -> Progress {
        let log = |step: u64| LogEntry {
            step,
            epoch: step as f64 / 4.0,
            loss: 1.0 / step as f64,
            grad_norm: 0.5,
            learning_rate: 1e-3,
            num_tokens: 100 * step,
            mean_token_accuracy: Some(0.5),
            tokens_per_second: 10.0,
            elapsed_s: 1.0,
            eta_s: 2.0,
            metrics: BTreeMap::from([("rewards/margins".to_owned(), 0.25)]),
        };
        let eval = EvalEntry {
            step: 2,
            epoch: 0.5,
            eval_loss: 1.5,
            eval_mean_token_accuracy: 0.4,
            eval_runtime: 0.1,
            metrics: BTreeMap::new(),
        };
        Progress {
            global_step: 3,
            epoch: 0,
            batch_in_epoch: 6,
            num_tokens: 300,
            log_history: vec![log(1), log(2), log(3)],
            eval_history: vec![eval],
            world_size: 2,
            best_metric: Some(1.5),
            best_global_step: Some(2),
            best_model_checkpoint: Some("out/checkpoint-2".into()),
        }
    }

    /// A Trainer's own state file (TRL wrote it): the step and the best checkpoint read, the log
    /// read leniently (a float `num_tokens`, `entropy` kept as a metric, the closing summary
    /// skipped), the data position left for the loop to derive.
    #[test]
    fn a_trainers_state_is_read_as_transformers_wrote_it() {
        let v = json!({
            "best_global_step": 2, "best_metric": 1.25, "best_model_checkpoint": "out/checkpoint-2",
            "epoch": 0.5, "global_step": 4, "max_steps": 8,
            "log_history": [
                {"step": 2, "epoch": 0.25, "loss": 3.5, "grad_norm": 1.5, "learning_rate": 1e-3,
                 "num_tokens": 640.0, "mean_token_accuracy": 0.3, "entropy": 2.75},
                {"step": 2, "epoch": 0.25, "eval_loss": 1.25, "eval_runtime": 0.5, "eval_entropy": 2.5},
                {"step": 4, "epoch": 0.5, "train_runtime": 3.0, "train_loss": 3.0}
            ],
            "stateful_callbacks": {"TrainerControl": {"args": {}, "attributes": {}}}
        });
        let (p, step, origin) = from_json(&v).expect("a Trainer's state");
        assert_eq!(
            (origin, step, p.global_step, p.epoch, p.batch_in_epoch),
            (Origin::Transformers, None, 4, 0, 0)
        );
        assert_eq!((p.log_history.len(), p.eval_history.len(), p.num_tokens), (1, 1, 640));
        assert_eq!(p.log_history[0].metrics.get("entropy"), Some(&2.75));
        assert_eq!(p.eval_history[0].metrics.get("eval_entropy"), Some(&2.5));
        assert_eq!((p.best_metric, p.best_global_step), (Some(1.25), Some(2)));
        assert_eq!(p.best_model_checkpoint.as_deref(), Some("out/checkpoint-2"));
    }

    #[test]
    fn the_state_reads_back_and_has_trainer_states_keys_only() {
        let info = StateInfo {
            max_steps: 8,
            steps_per_epoch: 4,
            logging_steps: 1,
            eval_steps: 2,
            save_steps: 3,
            train_batch_size: 2,
            num_train_epochs: 2,
        };
        let p = progress();
        let v = to_json(&p, &info, Some(3));
        let mut want = vec![
            "best_global_step",
            "best_metric",
            "best_model_checkpoint",
            "epoch",
            "eval_steps",
            "global_step",
            "is_hyper_param_search",
            "is_local_process_zero",
            "is_world_process_zero",
            "log_history",
            "logging_steps",
            "max_steps",
            "num_input_tokens_seen",
            "num_train_epochs",
            "save_steps",
            "stateful_callbacks",
            "total_flos",
            "train_batch_size",
            "trial_name",
            "trial_params",
        ];
        want.sort_unstable();
        assert_eq!(keys(&v), want);
        // The evaluation sits after the training log of its step.
        let steps: Vec<(u64, bool)> = v["log_history"]
            .as_array()
            .expect("list")
            .iter()
            .map(|e| (e["step"].as_u64().expect("step"), e.get("eval_loss").is_some()))
            .collect();
        assert_eq!(steps, [(1, false), (2, false), (2, true), (3, false)]);
        assert_eq!(v["epoch"], 0.75);
        let (back, step, _) = from_json(&v).expect("reads back");
        assert_eq!(back, p);
        assert_eq!(step, Some(3));
        // A checkpoint written before this shape still reads.
        let mut old = serde_json::to_value(&p).expect("json");
        old["optimizer_step"] = json!(3);
        assert_eq!(from_json(&old).expect("old shape"), (p, Some(3), Origin::Nibble));
    }
}
