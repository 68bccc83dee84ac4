//! Merging a trained LoRA adapter into its base model (`sft merge`), so the result is a plain
//! transformers checkpoint that needs neither PEFT nor bitsandbytes: each adapted weight becomes
//! `W + B A * scaling`, computed in f32 tensor by tensor (a 4-bit base dequantized exactly first),
//! then cast to the output dtype; everything else is cast and copied. A mixture's router and
//! expert banks adapted as parameters (PEFT's `target_parameters`) merge into the checkpoint's
//! own router and per-expert linears, each expert's slice of the bank's update (gate and up rows
//! apart).

use crate::Error;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use model_loader::export::{
    self, DEFAULT_MAX_SHARD_SIZE, ExportSummary, OutputDir, ShardWriter, TensorRef, python_json,
};
use model_loader::{Checkpoint, HfConfig, expected_shapes, kind_from_torch_name, torch_name};
use quant::linear::Linear;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// How [`merge`] writes the merged model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeOptions {
    /// dtype of every floating tensor written; `None`: the base's dtype (for a 4-bit base, its
    /// `bnb_4bit_compute_dtype`, else bfloat16).
    pub dtype: Option<Kind>,
    /// Largest shard in bytes.
    pub max_shard_size: u64,
    /// Replace a non-empty output directory instead of refusing.
    pub overwrite: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { dtype: None, max_shard_size: DEFAULT_MAX_SHARD_SIZE, overwrite: false }
    }
}

/// A linear offered to the adapter only for its shape, so the adapter's targets and tensors are
/// checked exactly as when training, without loading the model.
struct ShapeOnly {
    in_features: i64,
    out_features: i64,
}

impl Linear for ShapeOnly {
    fn forward(&self, _x: &Tensor) -> Result<Tensor, quant::Error> {
        Err(quant::Error::BadTensor { what: "merge", problem: "a shape-only layer does not compute".into() })
    }
    fn in_features(&self) -> i64 {
        self.in_features
    }
    fn out_features(&self) -> i64 {
        self.out_features
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
}

/// How one checkpoint weight changes: `(B A) * scaling` with A `[r, in]`, B `[out, r]` (Float);
/// for one expert of a bank adapted as a parameter, that expert's factors (`A[e*r..(e+1)*r]`,
/// `B[:, e::E]`, PEFT's layout) and, where the bank fuses two of the checkpoint's linears
/// (gate then up), the rows of this one.
struct Delta {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    expert: Option<(i64, i64)>,
    rows: Option<(i64, i64)>,
}

impl Delta {
    /// `(B A) * scaling` in f32, PEFT's order.
    fn weight(&self) -> Result<Tensor, tch::TchError> {
        let (a, b) = match self.expert {
            None => (self.a.shallow_clone(), self.b.shallow_clone()),
            Some((e, n)) => {
                let r = self.a.size()[0] / n;
                let cols = Tensor::f_arange_start_step(e, n * r, n, (Kind::Int64, self.b.device()))?;
                (self.a.f_narrow(0, e * r, r)?, self.b.f_index_select(1, &cols)?)
            }
        };
        let d = b.f_matmul(&a)?.f_mul_scalar(self.scaling)?;
        match self.rows {
            None => Ok(d),
            Some((start, len)) => d.f_narrow(0, start, len),
        }
    }
}

/// Read the adapter in `dir` for the decoder linears (and a mixture's router and expert banks)
/// `cfg` implies: each adapted checkpoint weight's delta by its module name.
fn read_adapter(cfg: &HfConfig, dir: &Path) -> Result<HashMap<String, Delta>, Error> {
    let mut stubs: Vec<(String, Box<dyn Linear>)> = expected_shapes(cfg)
        .into_iter()
        .filter_map(|(name, shape)| {
            let prefix = export::decoder_linear_prefix(&name)?.to_owned();
            let layer: Box<dyn Linear> =
                Box::new(ShapeOnly { in_features: shape[1] as i64, out_features: shape[0] as i64 });
            Some((prefix, layer))
        })
        .collect();
    let lcfg = lora::LoraConfig::read(dir)?;
    if lcfg.use_dora || !lcfg.modules_to_save.is_empty() {
        return Err(Error::Config {
            path: dir.join(lora::CONFIG_FILE),
            message: "merging DoRA adapters or modules_to_save copies is not supported yet (plain LoRA only)"
                .into(),
        });
    }
    let slots = crate::params::slots_of(cfg);
    let (adapters, _) = lora::inject_from_with_params(
        stubs.iter_mut().map(|(n, l)| (n.clone(), l)),
        Vec::new(),
        &slots,
        dir,
    )?;
    let mut deltas = HashMap::new();
    for m in adapters.modules() {
        let (a, b) = (m.lora_a().detach(), m.lora_b().detach());
        let Some(slot) = m.param() else {
            let scaling = lcfg.rank_of(m.name()).2;
            deltas.insert(m.name().to_owned(), Delta { a, b, scaling, expert: None, rows: None });
            continue;
        };
        let scaling = lcfg.rank_of(&format!("{}.{}", slot.module, slot.param)).2;
        let Some(moe) = &cfg.moe else { continue };
        // transformers 5's module (`model.layers.N.mlp`) under the checkpoint's own block name.
        let block = slot
            .module
            .rsplit_once(".mlp.")
            .map_or(slot.module.clone(), |(layer, _)| format!("{layer}.{}", moe.names.block));
        let [gate, up, down] = moe.names.linears;
        let share =
            |expert, rows| Delta { a: a.shallow_clone(), b: b.shallow_clone(), scaling, expert, rows };
        match (slot.param.as_str(), slot.experts) {
            ("weight", _) => {
                deltas.insert(format!("{block}.gate"), share(None, None));
            }
            (param, Some(n)) => {
                let inter = slot.out_features / 2;
                for e in 0..n {
                    let x = format!("{block}.experts.{e}");
                    if param == "gate_up_proj" {
                        deltas.insert(format!("{x}.{gate}"), share(Some((e, n)), Some((0, inter))));
                        deltas.insert(format!("{x}.{up}"), share(Some((e, n)), Some((inter, inter))));
                    } else {
                        deltas.insert(format!("{x}.{down}"), share(Some((e, n)), None));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(deltas)
}

/// The dtype to write when none is asked for.
fn default_dtype(
    cfg: &HfConfig,
    config: &serde_json::Map<String, Value>,
    ck: &Checkpoint,
    path: &Path,
) -> Result<Kind, Error> {
    let unknown = |what: &str, name: &str| Error::Config {
        path: path.to_owned(),
        message: format!("{what} `{name}` is not float32, float16 or bfloat16; pass --dtype"),
    };
    if cfg.prequantized {
        let compute = config.get("quantization_config").and_then(|q| q.get("bnb_4bit_compute_dtype"));
        return match compute.and_then(Value::as_str) {
            Some(name) => kind_from_torch_name(name).ok_or_else(|| unknown("bnb_4bit_compute_dtype", name)),
            None => Ok(Kind::BFloat16),
        };
    }
    if let Some(name) = &cfg.dtype {
        return kind_from_torch_name(name).ok_or_else(|| unknown("dtype", name));
    }
    let embed = ck.tensor("model.embed_tokens.weight")?;
    Ok(embed.to_tensor()?.kind())
}

/// A contiguous CPU tensor's bytes.
fn bytes_of(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let t = t.f_contiguous()?;
    let n = t.numel();
    let mut out = vec![0u8; n * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut out, n)?;
    Ok(out)
}

fn st_dtype(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        _ => "F32",
    }
}

/// Base tensor `name` in f32: dequantized exactly if it is a 4-bit weight (`quantized` holds
/// the 4-bit module prefixes); `None` for a tensor that is not floating.
fn base_weight(ck: &Checkpoint, name: &str, quantized: &HashSet<String>) -> Result<Option<Tensor>, Error> {
    let quant_err = |source| model_loader::Error::Quant { name: name.to_owned(), source };
    if let Some(p) = name.strip_suffix(".weight").filter(|p| quantized.contains(*p)) {
        return Ok(Some(ck.quantized_weight(p)?.dequantize(Kind::Float).map_err(quant_err)?));
    }
    let view = ck.tensor(name)?;
    if view.kind().is_none() {
        return Ok(None);
    }
    let w = view.to_tensor()?;
    Ok(Some(w.f_to_kind(Kind::Float).map_err(|e| tensor_error(name, e))?))
}

fn tensor_error(name: &str, e: tch::TchError) -> Error {
    Error::Tensor { name: name.to_owned(), message: e.to_string() }
}

/// `w + B A * scaling`, all f32, in PEFT's order (`(B @ A) * scaling`, then added).
fn add_delta(name: &str, w: Tensor, d: &Delta) -> Result<Tensor, Error> {
    let delta = d.weight().map_err(|e| tensor_error(name, e))?;
    if delta.size() != w.size() {
        return Err(Error::Tensor {
            name: name.to_owned(),
            message: format!("shape {:?}, but the adapter's B A is {:?}", w.size(), delta.size()),
        });
    }
    w.f_add(&delta).map_err(|e| tensor_error(name, e))
}

/// Merge the PEFT adapter in `adapter` into the base model in `base` and write the result to
/// `out` as transformers saves a model (sharded safetensors, config.json without
/// `quantization_config` and with the written `dtype`, tokenizer and generation files copied).
/// The output appears only once complete; `progress(done, total)` is called after each base
/// tensor.
pub fn merge(
    base: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExportSummary, Error> {
    let cfg = HfConfig::from_dir(base)?;
    let mut config = export::read_config_json(base)?;
    let ck = Checkpoint::open(base)?;
    ck.check_against(&cfg)?;
    let deltas = read_adapter(&cfg, adapter)?;
    let config_path = base.join("config.json");
    let dtype = match opts.dtype {
        Some(k) => k,
        None => default_dtype(&cfg, &config, &ck, &config_path)?,
    };
    let dtype_name = torch_name(dtype).ok_or_else(|| Error::Config {
        path: config_path.clone(),
        message: format!("output dtype {dtype:?} is not float32, float16 or bfloat16"),
    })?;
    export::check_distinct(base, out)?;
    export::check_distinct(adapter, out)?;

    let quantized: HashSet<String> =
        if cfg.prequantized { ck.quantized_prefixes().into_iter().collect() } else { HashSet::new() };
    let output = OutputDir::create(out, opts.overwrite)?;
    let mut writer = ShardWriter::new(output.path(), opts.max_shard_size);
    let mut names: Vec<&str> = ck.names().collect();
    names.sort_by(|a, b| export::natural_cmp(a, b));
    let total = names.len();
    let mut merged = 0usize;
    for (i, name) in names.iter().enumerate() {
        let tensor_err = |e| tensor_error(name, e);
        // A 4-bit weight's state tensors go with it.
        let is_state = name.find(".weight.").is_some_and(|at| quantized.contains(&name[..at]));
        if is_state {
            progress(i + 1, total);
            continue;
        }
        let w = match base_weight(&ck, name, &quantized)? {
            Some(w) => w,
            None => {
                // Not a floating tensor: copied as it is.
                let view = ck.tensor(name)?;
                let dtype = format!("{:?}", view.dtype);
                let t = TensorRef { name, dtype: &dtype, shape: view.shape, data: view.data };
                writer.add_group(&[t], view.shape.iter().product::<usize>() as u64)?;
                progress(i + 1, total);
                continue;
            }
        };
        let w = match name.strip_suffix(".weight").and_then(|p| deltas.get(p)) {
            Some(d) => {
                merged += 1;
                add_delta(name, w, d)?
            }
            None => w,
        };
        let w = w.f_to_kind(dtype).map_err(tensor_err)?;
        let shape: Vec<usize> = w.size().iter().map(|&d| d as usize).collect();
        let data = bytes_of(&w).map_err(tensor_err)?;
        let t = TensorRef { name, dtype: st_dtype(dtype), shape: &shape, data: &data };
        writer.add_group(&[t], w.numel() as u64)?;
        progress(i + 1, total);
    }
    if merged != deltas.len() {
        return Err(Error::Config {
            path: adapter.to_owned(),
            message: format!("merged {merged} of the adapter's {} modules", deltas.len()),
        });
    }
    let written = writer.finish()?;
    config.remove("quantization_config");
    config.remove("torch_dtype");
    config.insert("dtype".into(), Value::from(dtype_name));
    let text = python_json(&Value::Object(config)) + "\n";
    export::write_file(&output.path().join("config.json"), text.as_bytes())?;
    let copied = export::copy_model_files(base, output.path())?;
    let dir = output.commit()?;
    tracing::info!(
        dir = %dir.display(),
        merged,
        dtype = dtype_name,
        size = %device_map::format_bytes(written.total_size),
        files = written.shards.len(),
        "adapter merged into the base model"
    );
    Ok(ExportSummary::new(dir, written, copied))
}
