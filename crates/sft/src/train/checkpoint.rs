//! Checkpoints as transformers lays them out (`<output_dir>/checkpoint-<step>/` with the adapter
//! files, optimizer state and `trainer_state.json` in TrainerState's shape, `state.rs`), written
//! into a temporary directory and renamed into place, so an interrupted save never leaves a
//! half-written checkpoint.

use crate::Error;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{AdamW, Progress};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::CheckpointIo { path: path.to_owned(), source }
}

/// The moments of checkpoints written before nibble took the Trainer's layout (read only).
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";

/// A checkpoint directory's contents.
#[derive(Debug)]
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Where the run stood.
    pub progress: Progress,
    /// Optimizer moments by name.
    pub optimizer: Vec<(String, Tensor)>,
    /// Optimizer steps taken.
    pub optimizer_step: u64,
    /// Who wrote it: a Trainer's checkpoint records only the step, not the data position.
    pub origin: super::state::Origin,
    /// Why its optimizer state could not be used (a Trainer's `optimizer.pt` missing or in a form
    /// nibble does not read); the run then resumes with fresh moments.
    pub optimizer_problem: Option<String>,
}

impl Checkpoint {
    /// Write `checkpoint-<step>` under `output_dir` as the Trainer lays it out: the adapter files
    /// (`save_adapter(dir)`), `optimizer.pt` and `scheduler.pt` (torch's AdamW and LambdaLR
    /// state dicts, so TRL resumes from it too) and `trainer_state.json`. `lr` is the base
    /// learning rate and the one the next step takes.
    pub fn save(
        output_dir: &Path,
        progress: &Progress,
        optimizer: &AdamW,
        info: &super::state::StateInfo,
        lr: (f64, f64),
        save_adapter: &dyn Fn(&Path) -> Result<(), String>,
    ) -> Result<PathBuf, Error> {
        let name = format!("checkpoint-{}", progress.global_step);
        let dest = output_dir.join(&name);
        let tmp = output_dir.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        save_adapter(&tmp).map_err(|message| Error::BadCheckpoint { path: tmp.clone(), message })?;
        let step = optimizer.steps();
        write_torch_optimizer(&tmp.join(TORCH_OPTIMIZER), optimizer, lr)?;
        write_torch_scheduler(&tmp.join(TORCH_SCHEDULER), progress.global_step, lr)?;
        // transformers' TrainerState shape, nibble's resume fields in a callback entry of their own.
        let state = super::state::to_json(progress, info, Some(step));
        let text = serde_json::to_string_pretty(&state).unwrap_or_default();
        pyfiles::write_atomic(&tmp.join(STATE), text.as_bytes()).map_err(io(&tmp.join(STATE)))?;
        // Every entry on disk before the folder gets its real name, and the name before we go on.
        pyfiles::atomic::sync_dir(&tmp).map_err(io(&tmp))?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        pyfiles::atomic::sync_dir(output_dir).map_err(io(output_dir))?;
        tracing::info!(checkpoint = %dest.display(), "saved checkpoint");
        Ok(dest)
    }

    /// Read a checkpoint directory written by [`Checkpoint::save`].
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let state_path = dir.join(STATE);
        let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
        let bad = |message: String| Error::BadCheckpoint { path: state_path.clone(), message };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (progress, optimizer_step, origin) = super::state::from_json(&value).map_err(bad)?;
        let (optimizer, optimizer_step, optimizer_problem) = if origin == super::state::Origin::Transformers {
            // A Trainer's optimizer.pt that nibble cannot use leaves fresh moments, not an error.
            match torch_optimizer(&dir.join(TORCH_OPTIMIZER)) {
                Ok((tensors, step)) => (tensors, step, None),
                Err(problem) => (Vec::new(), 0, Some(problem)),
            }
        } else {
            let step = optimizer_step.ok_or_else(|| bad("no `optimizer_step`".into()))?;
            // Checkpoints before the Trainer's layout kept the moments in a safetensors file.
            let old_path = dir.join(OPTIMIZER);
            let tensors = if old_path.is_file() {
                Tensor::read_safetensors(&old_path)
                    .map_err(|e| Error::BadCheckpoint { path: old_path.clone(), message: e.to_string() })?
            } else {
                let path = dir.join(TORCH_OPTIMIZER);
                torch_optimizer(&path).map_err(|message| Error::BadCheckpoint { path, message })?.0
            };
            (tensors, step, None)
        };
        Ok(Checkpoint { dir: dir.to_owned(), progress, optimizer, optimizer_step, origin, optimizer_problem })
    }

    /// Where a Trainer's checkpoint leaves the data, as the Trainer computes it on resume: whole
    /// epochs of `steps_per_epoch` steps, then `grad_accum` micro-batches per step into the next.
    /// A nibble checkpoint records its own position and is left as it is.
    pub fn place(&mut self, steps_per_epoch: u64, grad_accum: usize, world_size: u64) {
        if self.origin != super::state::Origin::Transformers || steps_per_epoch == 0 {
            return;
        }
        let gs = self.progress.global_step;
        self.progress.epoch = gs / steps_per_epoch;
        self.progress.batch_in_epoch = usize::try_from(gs % steps_per_epoch).unwrap_or(0) * grad_accum;
        self.progress.world_size = world_size;
    }
}

/// A Trainer checkpoint's optimizer file (torch's pickle).
const TORCH_OPTIMIZER: &str = "optimizer.pt";
/// A Trainer checkpoint's learning-rate scheduler file (torch's pickle).
const TORCH_SCHEDULER: &str = "scheduler.pt";

fn pickle_err(e: pyfiles::torch_save::Error) -> Error {
    Error::BadCheckpoint { path: e.path, message: e.message }
}

/// torch's `AdamW.state_dict()` as the Trainer's optimizer holds it: one param group with decay
/// (every adapter tensor: transformers exempts only biases and norms) and an empty one without,
/// each parameter's moments and f32 step, the moments written from host memory one at a time.
fn write_torch_optimizer(path: &Path, optimizer: &AdamW, (base, next): (f64, f64)) -> Result<(), Error> {
    use pyfiles::torch_save::{Value, Writer};
    let bad = |message: String| Error::BadCheckpoint { path: path.to_owned(), message };
    let mut w = Writer::create(path).map_err(pickle_err)?;
    let (tensors, step) = optimizer.state();
    let cfg = *optimizer.config();
    let mut store = |t: &Tensor| -> Result<Value, Error> {
        let host =
            t.f_to_device(tch::Device::Cpu).and_then(|t| t.f_contiguous()).map_err(|e| bad(e.to_string()))?;
        let dtype = match host.kind() {
            tch::Kind::Float => "F32",
            tch::Kind::BFloat16 => "BF16",
            tch::Kind::Half => "F16",
            tch::Kind::Double => "F64",
            other => return Err(bad(format!("optimizer state of kind {other:?}"))),
        };
        let shape: Vec<usize> = host.size().iter().map(|&d| d as usize).collect();
        let numel = shape.iter().product::<usize>();
        let mut bytes = vec![0u8; numel * host.kind().elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, numel).map_err(|e| bad(e.to_string()))?;
        w.tensor(dtype, &shape, &bytes).map_err(pickle_err)
    };
    let str_ = |s: &str| Value::Str(s.to_owned());
    let n = tensors.len() / 2;
    let mut state = Vec::with_capacity(n);
    for i in 0..n {
        let step_t = store(&Tensor::from(step as f32))?;
        let m = store(&tensors[2 * i].1)?;
        let v = store(&tensors[2 * i + 1].1)?;
        state.push((
            Value::Int(i as i64),
            Value::Dict(vec![(str_("step"), step_t), (str_("exp_avg"), m), (str_("exp_avg_sq"), v)]),
        ));
    }
    let group = |weight_decay: f64, params: Vec<Value>| {
        Value::Dict(vec![
            (str_("weight_decay"), Value::Float(weight_decay)),
            (str_("lr"), Value::Float(next)),
            (str_("betas"), Value::Tuple(vec![Value::Float(cfg.beta1), Value::Float(cfg.beta2)])),
            (str_("eps"), Value::Float(cfg.eps)),
            (str_("amsgrad"), Value::Bool(false)),
            (str_("maximize"), Value::Bool(false)),
            (str_("foreach"), Value::None),
            (str_("capturable"), Value::Bool(false)),
            (str_("differentiable"), Value::Bool(false)),
            (str_("fused"), if cfg.fused { Value::Bool(true) } else { Value::None }),
            (str_("decoupled_weight_decay"), Value::Bool(true)),
            (str_("initial_lr"), Value::Float(base)),
            (str_("params"), Value::List(params)),
        ])
    };
    let groups =
        vec![group(cfg.weight_decay, (0..n as i64).map(Value::Int).collect()), group(0.0, Vec::new())];
    w.finish(&Value::Dict(vec![
        (str_("state"), Value::Dict(state)),
        (str_("param_groups"), Value::List(groups)),
    ]))
    .map_err(pickle_err)
}

/// torch's `LambdaLR.state_dict()` after `global_step` steps, for the Trainer's two param groups.
fn write_torch_scheduler(path: &Path, global_step: u64, (base, next): (f64, f64)) -> Result<(), Error> {
    use pyfiles::torch_save::{Value, Writer};
    let str_ = |s: &str| Value::Str(s.to_owned());
    let two = |v: f64| Value::List(vec![Value::Float(v), Value::Float(v)]);
    let gs = i64::try_from(global_step).unwrap_or(i64::MAX);
    let state = Value::Dict(vec![
        (str_("base_lrs"), two(base)),
        (str_("last_epoch"), Value::Int(gs)),
        (str_("_step_count"), Value::Int(gs.saturating_add(1))),
        (str_("_is_initial"), Value::Bool(false)),
        (str_("_get_lr_called_within_step"), Value::Bool(false)),
        (str_("_last_lr"), two(next)),
        (str_("lr_lambdas"), Value::List(vec![Value::Dict(Vec::new()), Value::Dict(Vec::new())])),
    ]);
    Writer::create(path).map_err(pickle_err)?.finish(&state).map_err(pickle_err)
}

/// A Trainer's `optimizer.pt` (torch AdamW's `state_dict`) as [`AdamW::load_state`] takes it: the
/// moments of parameter `i` (torch's index over its param groups in order, which for adapters is
/// the module order with A before B, as nibble orders them) as `state.{i}.exp_avg` /
/// `exp_avg_sq`, and the step count. Shapes are checked when the state is loaded.
fn torch_optimizer(path: &Path) -> Result<(Vec<(String, Tensor)>, u64), String> {
    use pyfiles::torch_save::Value;
    if !path.is_file() {
        return Err(format!("{} is missing", path.display()));
    }
    let v = pyfiles::torch_save::read(path).map_err(|e| e.to_string())?;
    let at = |what: &str| format!("{}: {what}", path.display());
    let groups = match v.get_str("param_groups") {
        Some(Value::List(g)) => g,
        _ => return Err(at("no `param_groups` (not an optimizer's state_dict)")),
    };
    let state = v.get_str("state").ok_or_else(|| at("no `state`"))?;
    let mut out = Vec::new();
    let mut step = None;
    let mut index = 0usize;
    for g in groups {
        if !matches!(g.get_str("amsgrad"), None | Some(Value::Bool(false))) {
            return Err(at("amsgrad moments are not AdamW's"));
        }
        let Some(Value::List(params)) = g.get_str("params") else {
            return Err(at("a param group without `params`"));
        };
        for p in params {
            let Some(s) = state.get(p) else {
                // A parameter that never had a gradient: no state, as a fresh one.
                index += 1;
                continue;
            };
            for key in ["exp_avg", "exp_avg_sq"] {
                let Some(Value::Tensor(t)) = s.get_str(key) else {
                    return Err(at(&format!("parameter {p:?} has no `{key}`")));
                };
                out.push((format!("state.{index}.{key}"), tensor(t).map_err(|e| at(&e))?));
            }
            let this = match s.get_str("step") {
                Some(Value::Tensor(t)) => tensor(t).map_err(|e| at(&e))?.f_double_value(&[]).ok(),
                Some(Value::Float(f)) => Some(*f),
                Some(Value::Int(i)) => Some(*i as f64),
                _ => None,
            };
            step = step.or(this);
            index += 1;
        }
    }
    let step = step.ok_or_else(|| at("no parameter has a `step`"))?;
    Ok((out, step.max(0.0) as u64))
}

/// A tensor from the pickle's bytes.
fn tensor(t: &pyfiles::torch_save::TensorData) -> Result<Tensor, String> {
    let kind = match t.dtype {
        "F32" => tch::Kind::Float,
        "BF16" => tch::Kind::BFloat16,
        "F16" => tch::Kind::Half,
        "F64" => tch::Kind::Double,
        other => return Err(format!("optimizer tensors of dtype {other}")),
    };
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(&t.data, &shape, kind).map_err(|e| e.to_string())
}

/// Checkpoint directories under `output_dir`, oldest step first.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io(output_dir))?;
        let name = e.file_name();
        if let Some(step) =
            name.to_str().and_then(|n| n.strip_prefix("checkpoint-")).and_then(|s| s.parse().ok())
            && e.path().join(STATE).is_file()
        {
            out.push((step, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint under `output_dir`, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>, Error> {
    Ok(list(output_dir)?.pop().map(|(_, p)| p))
}

/// Delete the oldest checkpoints beyond `limit`, as transformers' `rotate_checkpoints`: the newest
/// (to resume from) and `best` (`best_model_checkpoint`) are never deleted, and the limit grows to
/// keep both.
pub fn rotate(output_dir: &Path, limit: Option<usize>, best: Option<&Path>) -> Result<(), Error> {
    let Some(limit) = limit.filter(|l| *l > 0) else { return Ok(()) };
    let all: Vec<PathBuf> = list(output_dir)?.into_iter().map(|(_, p)| p).collect();
    if all.len() <= limit {
        return Ok(());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let newest = all.last().cloned().unwrap_or_default();
    let protected = |p: &Path| same(p, &newest) || best.is_some_and(|b| same(p, b));
    let kept = 1 + usize::from(best.is_some_and(|b| all.iter().any(|p| same(p, b)) && !same(b, &newest)));
    let keep = limit.max(kept);
    let mut remaining = all.len();
    for dir in &all {
        if remaining <= keep {
            break;
        }
        if protected(dir) {
            continue;
        }
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
        tracing::info!(checkpoint = %dir.display(), "removed old checkpoint (save_total_limit)");
        remaining -= 1;
    }
    Ok(())
}
