//! The run plan: the validated recipe plus what the machine says (GPUs, torchrun's variables),
//! resolved once into what a run decides before it reads data or weights: the model and how it
//! loads, where it goes, the LoRA adapter (targets resolved once, on the model's own module
//! names), the matmul policy, the output folder and the checkpoint to resume from. Every problem
//! found here joins config's report (key, file:line:column, all at once, exit 2) before anything
//! is tokenized, loaded or written. The run and `--estimate-memory` read the plan; nothing here
//! changes the process (the matmul policy is applied by the run).
//!
//! The data section ([`DataSetup`]: sources found and fingerprinted, tokenizer and chat template
//! loaded, tokenize and batch options) and the report options are part of the plan, so a missing
//! dataset file or an unknown `pad_token` is reported with the recipe's other problems.

use std::path::{Path, PathBuf};

use config::types::{Dtype, ResumeFrom, SamplingStrategy, SaveStrategy, TargetModules};
use config::{Diagnostic, Kind as Problem, Recipe};
use device_map::estimate::{BaseWeights, RunShape, decoder_linears};
use model_loader::{Architecture, HfConfig, HubCache, LoadOptions, resolve_model};
use quant::ops::{CpuMatmul, QuantizeOptions};
use report::ReportOptions;
use sft::train::dpo::DpoObjective;
use sft::train::{Schedule, checkpoint};
use tch::{Device, Kind};

use crate::prepare::DataSetup;
use crate::training::TrainingPlan;

/// What this machine and process offer a run.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    /// Whether libtorch sees a CUDA GPU.
    pub cuda: bool,
    /// GPUs libtorch sees.
    pub cuda_devices: usize,
    /// torchrun's variables, when this process is one rank of a group.
    pub dist: Option<dist::DistEnv>,
}

impl Machine {
    /// This process alone on this machine's devices, whatever torchrun's variables say (for the
    /// commands that do not train: `--print-config`, `--estimate-memory`).
    pub fn alone() -> Machine {
        let cuda = tch::Cuda::is_available();
        let cuda_devices = if cuda { usize::try_from(tch::Cuda::device_count()).unwrap_or(0) } else { 0 };
        Machine { cuda, cuda_devices, dist: None }
    }

    /// The machine as libtorch and the environment describe it.
    pub fn probe() -> Result<Machine, dist::DistError> {
        Ok(Machine { dist: dist::DistEnv::from_env()?, ..Machine::alone() })
    }

    /// Ranks in the group (1 without torchrun's variables).
    pub fn world_size(&self) -> usize {
        self.dist.as_ref().map_or(1, |e| e.world_size)
    }
}

/// Why an NVIDIA GPU on this machine goes unused, if one does: the driver lists GPUs under
/// `root`/proc/driver/nvidia/gpus (or `root`/dev/nvidia0 exists) while libtorch sees no CUDA
/// device, because this `sft` was built without CUDA (`cuda_build` false) or its CUDA runtime
/// does not load.
pub fn unused_gpu(root: &std::path::Path, cuda_build: bool, cuda_available: bool) -> Option<String> {
    if cuda_available {
        return None;
    }
    let gpus = std::fs::read_dir(root.join("proc/driver/nvidia/gpus")).map(|d| d.count()).unwrap_or(0);
    if gpus == 0 && !root.join("dev/nvidia0").exists() {
        return None;
    }
    let seen = if gpus > 0 {
        format!("{gpus} NVIDIA GPU(s) visible")
    } else {
        "an NVIDIA device node visible".to_owned()
    };
    Some(if cuda_build {
        format!(
            "{seen}, but libtorch finds no CUDA device: check that the driver supports the CUDA runtime of libtorch \
             (`sft env`, `nvidia-smi`); training runs on the CPU"
        )
    } else {
        format!(
            "{seen}, but this sft was built without CUDA: build the kernels with `cargo xtask cuda` and the binary with \
             `--features cuda` to train on the GPU; training runs on the CPU"
        )
    })
}

/// What the plan is for: a training run checks its output folder and checkpoint too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// The main job.
    Train,
    /// `--estimate-memory`: nothing is written, so the output folder does not matter.
    Estimate,
}

/// Everything a run decides before data or weights are read.
pub(crate) struct RunPlan {
    /// The recipe the plan was made from (the training keys the loop reads, the card's
    /// hyperparameters and the `recipe.yaml` a run leaves).
    pub recipe: Recipe,
    /// Where the data comes from and how it becomes batches (`None` for the memory estimate,
    /// which reads no data).
    pub data: Option<DataSetup>,
    /// Which report sinks the run writes.
    pub report: ReportOptions,
    /// The loop's settings.
    pub training: TrainingPlan,
    /// `model_init_kwargs.device_map` / `max_memory`, when the recipe spreads the model.
    pub device_map: Option<crate::place::DeviceMap>,
    /// What the end-of-run files say of the run (its length is set when the data is ready).
    pub summary: report::RunSummary,
    /// `model_name_or_path` as given (the adapter's `base_model_name_or_path`).
    pub model_id: String,
    /// The model's local directory (a hub-cache snapshot for a hub id).
    pub model_dir: PathBuf,
    /// Its config.json.
    pub model_config: HfConfig,
    /// How the checkpoint loads, placement included.
    pub load: LoadOptions,
    /// The process's 16-bit CPU matmul policy (`cpu_matmul`), applied by the run.
    pub cpu_matmul: CpuMatmul,
    /// The device this process trains on.
    pub device: Device,
    /// The adapter to train, with its targets resolved.
    pub lora: lora::LoraConfig,
    /// The names of layer 0's linears the adapter targets (what the estimate counts per layer).
    pub lora_linears: Vec<String>,
    /// `lora_init_adapter`: a PEFT adapter to start from.
    pub lora_init_adapter: Option<PathBuf>,
    /// `output_dir`.
    pub output_dir: PathBuf,
    /// Whether `output_dir` holds a previous run that a fresh run replaces.
    pub replaces_previous: bool,
    /// The checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// DPO's loss and reference, for a DPO recipe (`sft dpo`).
    pub dpo: Option<DpoPlan>,
}

/// What a DPO run adds to the plan.
#[derive(Debug, Clone)]
pub(crate) struct DpoPlan {
    /// The loss, built and checked as DPOTrainer checks it when it starts.
    pub objective: DpoObjective,
    /// `precompute_ref_log_probs`: the reference's log-probs computed once over the data.
    pub precompute: bool,
    /// `precompute_ref_batch_size`: that pass's batch size (else the train / eval batch size).
    pub precompute_batch_size: Option<usize>,
    /// `disable_dropout`: the adapters' dropout stays off while training.
    pub disable_dropout: bool,
}

impl DpoPlan {
    /// The recipe's DPO keys as a plan, or their problems.
    fn resolve(p: &mut Problems<'_>, recipe: &Recipe) -> Option<DpoPlan> {
        let d = recipe.dpo.as_ref()?;
        let weights = d.loss_weights.clone().unwrap_or_else(|| vec![1.0; d.loss_type.len()]);
        let objective = DpoObjective {
            beta: d.beta,
            label_smoothing: d.label_smoothing,
            discopop_tau: d.discopop_tau,
            f_divergence: d.f_divergence_type,
            alpha_coef: d.f_alpha_divergence_coef,
            losses: d.loss_type.iter().copied().zip(weights).collect(),
            use_weighting: d.use_weighting,
            ld_alpha: d.ld_alpha,
        };
        if let Err(e) = objective.check() {
            p.add(Problem::Conflict, "loss_type", e);
        }
        if recipe.training.padding_free {
            // TRL 1.16's DPOTrainer turns padding_free off and pads; nibble keeps the padded
            // layout for attention only (see `train::dpo::DpoBatch::skip_padding`).
            tracing::info!(
                "padding_free: the layers skip each DPO batch's padding (attention keeps the padded layout); \
                 TRL 1.16's DPOTrainer turns padding_free off and pads, so products round differently than there"
            );
        }
        if recipe.training.neftune_noise_alpha.is_some() {
            p.add(
                Problem::Conflict,
                "neftune_noise_alpha",
                "NEFTune is not supported for DPO yet (TRL also perturbs its reference pass); unset it",
            );
        }
        Some(DpoPlan {
            objective,
            precompute: d.precompute_ref_log_probs,
            precompute_batch_size: d
                .precompute_ref_batch_size
                .map(|b| usize::try_from(b).unwrap_or(1).max(1)),
            disable_dropout: d.disable_dropout,
        })
    }
}

/// Problems found while planning, each pointing at its recipe key.
struct Problems<'a> {
    recipe: &'a Recipe,
    found: Vec<Diagnostic>,
}

impl Problems<'_> {
    fn add(&mut self, kind: Problem, key: &str, message: impl Into<String>) {
        self.found.push(self.recipe.problem(kind, key, message));
    }

    /// `value`, or the problem it reports under `key`.
    fn take<T, E: std::fmt::Display>(&mut self, key: &str, value: Result<T, E>) -> Option<T> {
        value.map_err(|e| self.add(Problem::OutOfRange, key, e.to_string())).ok()
    }
}

impl RunPlan {
    /// Resolve `recipe` on `machine` for `purpose`; every problem at once in config's report.
    pub fn resolve(recipe: Recipe, machine: &Machine, purpose: Purpose) -> Result<RunPlan, config::Error> {
        let mut p = Problems { recipe: &recipe, found: Vec::new() };
        let m = &recipe.model;
        let t = &recipe.training;

        if !m.use_peft {
            p.add(
                Problem::OutOfRange,
                "use_peft",
                "full fine-tuning is not supported: set `use_peft: true` (nibble trains LoRA adapters)",
            );
        }
        if t.optim.low_bit_states() {
            tracing::warn!(
                "optim: {} keeps AdamW's moments in 8 or 4 bits; nibble runs the same update with 32-bit moments",
                t.optim
            );
        }
        if !t.optim.runs_as_adamw() {
            p.add(
                Problem::OutOfRange,
                "optim",
                format!(
                    "`{}` is not supported: nibble trains with AdamW ({})",
                    t.optim,
                    config::types::Optim::VALUES
                        .iter()
                        .filter(|o| o.runs_as_adamw())
                        .map(|o| o.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        if m.load_in_8bit && m.load_in_4bit {
            p.add(
                Problem::Conflict,
                "load_in_4bit",
                "load_in_8bit and load_in_4bit are exclusive: choose one",
            );
        }
        let cpu_matmul = match t.cpu_matmul {
            config::types::CpuMatmul::Auto => CpuMatmul::Auto,
            config::types::CpuMatmul::Native => CpuMatmul::Native,
            config::types::CpuMatmul::F32 => CpuMatmul::F32,
        };
        best_model_problems(&mut p, t);
        if !matches!(t.train_sampling_strategy, SamplingStrategy::Random | SamplingStrategy::Sequential) {
            p.add(
                Problem::OutOfRange,
                "train_sampling_strategy",
                format!(
                    "`{}` is not supported yet (supported: random, sequential)",
                    t.train_sampling_strategy
                ),
            );
        }
        // The schedule's name and kwargs, checked on a one-step run (the real length needs the data).
        p.take(
            "lr_scheduler_type",
            Schedule::new(
                &t.lr_scheduler_type,
                t.lr_scheduler_kwargs.as_ref(),
                t.learning_rate,
                t.warmup_steps,
                1,
            ),
        );
        let grad_accum = positive(&mut p, "gradient_accumulation_steps", t.gradient_accumulation_steps);
        let dpo = DpoPlan::resolve(&mut p, &recipe);
        positive(&mut p, "per_device_train_batch_size", t.per_device_train_batch_size);
        let lora_r = positive(&mut p, "lora_r", m.lora_r);
        // (`chat_template` itself wins over the path, as TRL takes them.)
        if let Some(path) = t.chat_template_path.as_ref().filter(|_| t.chat_template.is_none()) {
            let ok = Path::new(path).is_file() && (path.ends_with(".jinja") || path.ends_with(".j2"));
            if !ok {
                p.add(
                    Problem::OutOfRange,
                    "chat_template_path",
                    format!(
                        "`{path}`: nibble reads a local .jinja/.j2 file (cloning another tokenizer's \
                         template is not supported)"
                    ),
                );
            }
        }
        let lora_init_adapter = m.lora_init_adapter.as_ref().map(PathBuf::from);
        if let Some(dir) = &lora_init_adapter
            && !dir.join(lora::CONFIG_FILE).is_file()
        {
            p.add(
                Problem::OutOfRange,
                "lora_init_adapter",
                format!("{} holds no {}: not a PEFT adapter folder", dir.display(), lora::CONFIG_FILE),
            );
        }

        // The output folder and the checkpoint to resume from (a training run's concern only).
        let output_dir = PathBuf::from(t.output_dir.as_deref().unwrap_or("trainer_output"));
        let (mut resume, mut replaces_previous) = (None, false);
        if purpose == Purpose::Train {
            resume = resume_dir(&mut p, t.resume_from_checkpoint.as_ref(), &output_dir);
            let checkpoints = match checkpoint::list(&output_dir) {
                Ok(list) => list.len(),
                Err(e) => {
                    p.add(Problem::OutOfRange, "output_dir", format!("cannot list its checkpoints: {e}"));
                    0
                }
            };
            let previous = output_dir.join(lora::WEIGHTS_FILE).is_file() || checkpoints > 0;
            let resuming = t.resume_from_checkpoint.as_ref().is_some_and(|r| *r != ResumeFrom::No);
            if previous && !resuming {
                if t.overwrite_output_dir {
                    replaces_previous = true;
                } else {
                    p.add(
                        Problem::Conflict,
                        "output_dir",
                        format!(
                            "{} already holds a previous run (adapter or checkpoints); set \
                             `overwrite_output_dir: true` to replace it, `resume_from_checkpoint: true` to \
                             continue it, or choose another output_dir",
                            output_dir.display()
                        ),
                    );
                }
            }
        }

        // The model: where it is, what it is, how it loads and where it goes.
        let model_id = m.model_name_or_path.clone().unwrap_or_default();
        let model = if model_id.is_empty() {
            p.add(Problem::Missing, "model_name_or_path", "not set: name a model directory or hub id");
            None
        } else {
            let cache = HubCache::from_env(|k| std::env::var(k).ok());
            p.take("model_name_or_path", resolve_model(&model_id, &m.model_revision, &cache)).and_then(
                |dir| {
                    let mut cfg = p.take("model_name_or_path", HfConfig::from_dir(&dir))?;
                    if cfg.prequantized {
                        stored_dtype(&mut cfg, &dir, &recipe);
                    }
                    Some((dir, cfg))
                },
            )
        };
        let device = if t.use_cpu || !machine.cuda {
            Device::Cpu
        } else {
            Device::Cuda(machine.dist.as_ref().map_or(0, |e| e.local_rank))
        };
        let device_map = p
            .take("model_init_kwargs", crate::place::from_recipe(&recipe).map_err(|e| format!("{e:#}")))
            .flatten();
        let mut planned = None;
        if let Some((dir, cfg)) = model {
            let lora = lora_r.map(|r| lora_config(&recipe, &cfg, &model_id, r));
            let lora_linears = lora.as_ref().and_then(|l| layer_targets(&mut p, &cfg, l)).unwrap_or_default();
            if purpose == Purpose::Train {
                moe_problems(&mut p, &cfg, lora.as_ref());
                best_metric_problems(&mut p, &cfg);
            }
            let mut load = load_options(&recipe, &cfg, device);
            let shape =
                run_shape(&recipe, &cfg, lora.as_ref(), &lora_linears, cpu_matmul, device_map::Device::Cpu);
            // Where the model goes (the estimate splits its own figure per device instead: it plans
            // for the recipe's budgets, whether the GPUs are here or not).
            if purpose == Purpose::Train {
                let cuda_devices = if device.is_cuda() { machine.cuda_devices } else { 0 };
                let placement = crate::place::placement(
                    device_map.as_ref(),
                    &cfg,
                    &shape,
                    device,
                    cuda_devices,
                    machine.world_size(),
                );
                load.placement = p.take("model_init_kwargs", placement.map_err(|e| format!("{e:#}")));
            }
            planned = lora.map(|lora| (dir, cfg, load, lora, lora_linears));
        }
        // The data: every file found, the tokenizer and template loaded (a training run's concern).
        let data = if purpose == Purpose::Train {
            match DataSetup::resolve(&recipe, planned.as_ref().map(|(dir, ..)| dir.as_path())) {
                Ok(d) => Some(d),
                Err(problems) => {
                    for (key, message) in problems {
                        p.add(Problem::OutOfRange, key, message);
                    }
                    None
                }
            }
        } else {
            None
        };
        let mut report = ReportOptions::from_recipe(&recipe);
        // transformers' TensorBoard callback reads this variable; so does nibble.
        report.logging_dir = std::env::var_os("TENSORBOARD_LOGGING_DIR").map(PathBuf::from);
        if !p.found.is_empty() {
            return Err(config::Error::invalid(p.found));
        }
        let (Some((model_dir, model_config, load, lora, lora_linears)), Some(grad_accum)) =
            (planned, grad_accum)
        else {
            unreachable!("every missing part of the plan was reported as a problem")
        };
        Ok(RunPlan {
            model_id,
            model_dir,
            model_config,
            load,
            cpu_matmul,
            device,
            lora,
            lora_linears,
            lora_init_adapter,
            output_dir,
            replaces_previous,
            resume,
            grad_accum,
            dpo,
            data,
            report,
            training: TrainingPlan::from_recipe(&recipe),
            device_map,
            summary: report::RunSummary::for_recipe(&recipe),
            recipe,
        })
    }

    /// The plan as `--print-config` shows it, beside the recipe: what the run will do on this
    /// machine (the model found, how it loads and where, the adapter's resolved targets, the
    /// output folder and the checkpoint to resume from).
    pub fn to_json(&self) -> serde_json::Value {
        let kind = |k: Kind| match k {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        let device = |d: Device| match d {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".to_owned(),
        };
        let l = &self.lora;
        serde_json::json!({
            "model": {
                "id": self.model_id,
                "dir": self.model_dir,
                "architecture": format!("{:?}", self.model_config.architecture),
                "layers": self.model_config.shape.layers,
            },
            "device": device(self.device),
            "data": self.data.as_ref().map(DataSetup::to_json),
            "report": {
                "tensorboard": self.report.tensorboard,
                "logging_dir": self.report.logging_dir,
                "run_name": self.report.run_name,
            },
            "load": {
                "dtype": kind(self.load.dtype),
                "compute_dtype": kind(self.load.compute_dtype),
                "quantize_4bit": self.load.quantize.map(|q| serde_json::json!({
                    "quant_type": q.quant_type.as_str(),
                    "blocksize": q.blocksize,
                    "double_quant": q.double_quant,
                })),
                "int8": self.load.quantize_8bit.is_some(),
                "placement": self.load.placement.as_ref().map(model_loader::Placement::describe),
            },
            "cpu_matmul": self.recipe.training.cpu_matmul.as_str(),
            "lora": {
                "r": l.r,
                "alpha": l.alpha,
                "dropout": l.dropout,
                "targets_per_layer": self.lora_linears,
                "use_rslora": l.use_rslora,
                "use_dora": l.use_dora,
                "modules_to_save": l.modules_to_save,
                "init_adapter": self.lora_init_adapter,
            },
            "gradient_accumulation_steps": self.grad_accum,
            "dpo": self.dpo.as_ref().map(|d| serde_json::json!({
                "losses": d.objective.losses.iter().map(|(l, w)| serde_json::json!([l.as_str(), w])).collect::<Vec<_>>(),
                "beta": d.objective.beta,
                "reference": match (d.precompute, self.lora_init_adapter.is_some()) {
                    (true, true) => "precomputed before training (a frozen copy of the starting adapter)",
                    (true, false) => "precomputed before training (the base with the adapter off)",
                    (false, true) => "a frozen copy of the starting adapter, each step",
                    (false, false) => "the base with the adapter off, each step",
                },
                "precompute_batch_size": d.precompute_batch_size,
                "dropout": if d.disable_dropout { "off (disable_dropout)" } else { "as lora_dropout" },
            })),
            "output_dir": self.output_dir,
            "replaces_previous_run": self.replaces_previous,
            "resume_from": self.resume,
        })
    }

    /// The training device as the device map names it.
    pub fn map_device(&self) -> device_map::Device {
        match self.device {
            Device::Cuda(i) => device_map::Device::Cuda(u32::try_from(i).unwrap_or(0)),
            _ => device_map::Device::Cpu,
        }
    }

    /// The run's memory-driving settings for the estimate, training on `device`.
    pub fn run_shape(&self, device: device_map::Device) -> RunShape {
        let lora = self.recipe.model.use_peft.then_some(&self.lora);
        run_shape(&self.recipe, &self.model_config, lora, &self.lora_linears, self.cpu_matmul, device)
    }
}

/// `value` as a count of at least 1, or a problem under `key`.
fn positive(p: &mut Problems<'_>, key: &str, value: i64) -> Option<usize> {
    let n = usize::try_from(value).ok().filter(|&n| n > 0);
    if n.is_none() {
        p.add(Problem::OutOfRange, key, format!("must be a positive integer, got {value}"));
    }
    n
}

/// The checkpoint `resume_from_checkpoint` names: a folder, or `true`/`last` for the newest one in
/// `output_dir` (a problem when there is none, as in transformers).
fn resume_dir(p: &mut Problems<'_>, value: Option<&ResumeFrom>, output_dir: &Path) -> Option<PathBuf> {
    let key = "resume_from_checkpoint";
    match value {
        None | Some(ResumeFrom::No) => None,
        Some(ResumeFrom::Latest) => match checkpoint::latest(output_dir) {
            Ok(Some(dir)) => Some(dir),
            Ok(None) => {
                p.add(
                    Problem::OutOfRange,
                    key,
                    format!("no checkpoint-* folder in {}", output_dir.display()),
                );
                None
            }
            Err(e) => {
                p.add(Problem::OutOfRange, key, e.to_string());
                None
            }
        },
        Some(ResumeFrom::Dir(path)) => {
            let dir = PathBuf::from(path);
            if !dir.is_dir() {
                p.add(Problem::OutOfRange, key, format!("{} is not a checkpoint folder", dir.display()));
                return None;
            }
            Some(dir)
        }
    }
}

/// The dtype the recipe asks for (`auto` = config.json's, else float32).
fn model_kind(recipe: &Recipe, cfg: &HfConfig) -> Kind {
    let name = match recipe.model.dtype {
        // A pre-quantized checkpoint loads in the dtype its tensors are stored in (`stored_dtype`).
        _ if cfg.prequantized => cfg.dtype.as_deref().unwrap_or("float32"),
        Dtype::Auto => cfg.dtype.as_deref().unwrap_or("float32"),
        d => d.as_str(),
    };
    match name {
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float16" | "fp16" => Kind::Half,
        _ => Kind::Float,
    }
}

/// transformers 5.24 loads a pre-quantized bitsandbytes checkpoint in the dtype its unquantized
/// tensors are stored in, whatever `dtype` asks (and computes its 4-bit layers in the recorded
/// `bnb_4bit_compute_dtype`): `cfg.dtype` becomes the embedding's stored dtype, and a recipe
/// `dtype` that differs is named in a warning.
fn stored_dtype(cfg: &mut HfConfig, dir: &std::path::Path, recipe: &Recipe) {
    let stored = model_loader::Checkpoint::open(dir)
        .ok()
        .and_then(|ck| ck.tensor("model.embed_tokens.weight").ok().and_then(|t| t.kind()))
        .and_then(model_loader::torch_name);
    let Some(stored) = stored else { return };
    if recipe.model.dtype != Dtype::Auto && recipe.model.dtype.as_str() != stored {
        tracing::warn!(
            "dtype: {} is ignored for a pre-quantized checkpoint, which loads in the dtype it is stored in ({stored}), as transformers loads it",
            recipe.model.dtype.as_str()
        );
    }
    cfg.dtype = Some(stored.to_owned());
}

/// How the checkpoint loads on `device` (placement: the default single device, set by the plan).
fn load_options(recipe: &Recipe, cfg: &HfConfig, device: Device) -> LoadOptions {
    let m = &recipe.model;
    let dtype = model_kind(recipe, cfg);
    let quantize = m.load_in_4bit.then_some(QuantizeOptions {
        quant_type: match m.bnb_4bit_quant_type {
            config::types::QuantType::Fp4 => quant::QuantType::Fp4,
            config::types::QuantType::Nf4 => quant::QuantType::Nf4,
        },
        blocksize: 64,
        double_quant: m.use_bnb_nested_quant,
    });
    // TRL computes 4-bit layers in the model dtype (`bnb_4bit_compute_dtype = dtype`). With
    // `bf16: true` / `fp16: true` on an fp32 model, transformers autocasts: the big matmuls run in
    // 16 bits, norms and softmax in fp32. nibble does the same for the 4-bit linears (compute dtype
    // 16-bit, output back in the input's dtype); the output head stays fp32 (the adapters
    // follow `lora_dtype`: bf16 on a 4-bit base under `auto`, as TRL casts them).
    let t = &recipe.training;
    let recorded = match cfg.quantization {
        Some(model_loader::Prequantized::FourBit) => {
            cfg.bnb_compute_dtype.as_deref().and_then(model_loader::kind_from_torch_name)
        }
        _ => None,
    };
    let compute_dtype = match (dtype, t.bf16 == Some(true), t.fp16) {
        (Kind::Float, true, _) if quantize.is_some() => Kind::BFloat16,
        (Kind::Float, _, true) if quantize.is_some() => Kind::Half,
        // A pre-quantized checkpoint computes in what it recorded, as transformers reads it.
        _ => recorded.unwrap_or(dtype),
    };
    // LLM.int8 with bitsandbytes' default threshold (TRL's `BitsAndBytesConfig(load_in_8bit=True)`).
    // On the CPU bitsandbytes trains through the dequantized weight (`MatMul8bitFp`); nibble does
    // the same so losses match TRL's there.
    let quantize_8bit = m.load_in_8bit.then(|| quant::linear::Int8Options {
        matmul: quant::linear::Int8Matmul::Dequantized,
        ..quant::linear::Int8Options::default()
    });
    LoadOptions { dtype, quantize, quantize_8bit, compute_dtype, device, placement: None }
}

/// `metric_for_best_model` names a metric this run's evaluations report (as transformers takes
/// it: `eval_` prefixed where it is not), checked before training rather than at the first
/// evaluation.
fn best_metric_problems(p: &mut Problems<'_>, cfg: &HfConfig) {
    let recipe = p.recipe;
    let Some(metric) = recipe.training.metric_for_best_model.as_deref() else { return };
    let Some(best) = crate::training::best_model(&recipe.training) else { return };
    let config_coef = cfg.moe.as_ref().map(|m| m.router_aux_loss_coef);
    let routed = sft::train::router::coefficient(config_coef, recipe.training.router_aux_loss_coef).is_some();
    let names = sft::train::eval_metric_names(recipe.dpo.is_some(), routed);
    if !names.contains(&best.metric) {
        let names: Vec<&str> = names.iter().map(|n| n.trim_start_matches("eval_")).collect();
        p.add(
            Problem::OutOfRange,
            "metric_for_best_model",
            format!("`{metric}` is not among this run's evaluation metrics: {}", names.join(", ")),
        );
    }
}

/// transformers' checks of `save_strategy: best` and `load_best_model_at_end` (Trainer and
/// TrainingArguments): a metric to rank by, and checkpoints at evaluated steps.
fn best_model_problems(p: &mut Problems<'_>, t: &config::TrainingArgs) {
    if t.save_strategy == SaveStrategy::Best && t.metric_for_best_model.is_none() && !t.load_best_model_at_end
    {
        p.add(
            Problem::Conflict,
            "save_strategy",
            "`best` needs metric_for_best_model (the eval metric to rank by)",
        );
    }
    if !t.load_best_model_at_end || t.save_strategy == SaveStrategy::Best {
        return;
    }
    if t.eval_strategy.to_string() != t.save_strategy.to_string() {
        p.add(
            Problem::Conflict,
            "load_best_model_at_end",
            format!(
                "needs save_strategy and eval_strategy to match (or save_strategy: best), found eval_strategy {} and save_strategy {}",
                t.eval_strategy, t.save_strategy
            ),
        );
    } else if t.save_strategy == SaveStrategy::Steps {
        let eval = t.eval_steps.unwrap_or(t.logging_steps);
        let multiple = if eval < 1.0 && t.save_steps < 1.0 {
            // Both fractions of the run: compared in millionths, as transformers does.
            ((t.save_steps * 1e6).round() as i64) % ((eval * 1e6).round() as i64).max(1) == 0
        } else if eval >= 1.0 && t.save_steps >= 1.0 {
            (t.save_steps.round() as i64) % (eval.round() as i64).max(1) == 0
        } else {
            false
        };
        if !multiple {
            p.add(
                Problem::Conflict,
                "load_best_model_at_end",
                format!("needs save_steps ({}) to be a multiple of eval_steps ({eval})", t.save_steps),
            );
        }
    }
}

/// PEFT's default targets for the families nibble runs, when the recipe names none (none for
/// Phi-3: PEFT asks for `target_modules` there).
fn default_targets(arch: Architecture) -> Vec<String> {
    match arch {
        Architecture::Phi3 | Architecture::Qwen3Moe => Vec::new(),
        Architecture::Mixtral => vec!["q_proj".into(), "v_proj".into()],
        Architecture::Llama
        | Architecture::Mistral
        | Architecture::Qwen2
        | Architecture::Qwen3
        | Architecture::Gemma2
        | Architecture::Gemma3 => {
            vec!["q_proj".into(), "v_proj".into()]
        }
    }
}

/// The adapter the recipe asks for on this model.
fn lora_config(recipe: &Recipe, cfg: &HfConfig, model_id: &str, r: usize) -> lora::LoraConfig {
    let m = &recipe.model;
    let targets = match &m.lora_target_modules {
        None => lora::TargetModules::List(default_targets(cfg.architecture)),
        Some(TargetModules::List(l)) => lora::TargetModules::List(l.clone()),
        Some(TargetModules::Pattern(p)) if p == "all-linear" => lora::TargetModules::AllLinear,
        Some(TargetModules::Pattern(p)) => lora::TargetModules::Regex(p.clone()),
    };
    let mut c = lora::LoraConfig::new(r, m.lora_alpha as f64, targets);
    c.dropout = m.lora_dropout;
    c.use_rslora = m.use_rslora;
    c.use_dora = m.use_dora;
    c.modules_to_save = m.lora_modules_to_save.clone().unwrap_or_default();
    c.base_model_name_or_path = Some(model_id.to_owned());
    c.task_type = Some(m.lora_task_type.clone());
    c.dtype = adapter_kind(recipe, cfg);
    c.target_parameters = m.lora_target_parameters.clone().unwrap_or_default();
    if let Some(moe) = &cfg.moe {
        moe_targets(&mut c, moe);
    }
    c
}

/// Adapter parameters per layer on a mixture's router and expert banks (PEFT's
/// `target_parameters`): `r * (in + out)` per matrix, with each parameter's rank from the
/// patterns (the fused gate/up bank at twice the rank).
fn moe_adapter_params(cfg: &HfConfig, lora: &lora::LoraConfig) -> u64 {
    sft::params::slots_of(cfg)
        .iter()
        .filter(|s| s.module.starts_with("model.layers.0."))
        .map(|s| (format!("{}.{}", s.module, s.param), s))
        .filter(|(key, _)| lora.adapts_param(key))
        .map(|(key, s)| {
            let r = lora.rank_of(&key).0 as u64;
            r * s.experts.unwrap_or(1) as u64 * (s.in_features + s.out_features) as u64
        })
        .sum()
}

/// PEFT's rewrite of a mixture of experts' targets (transformers 5 keeps its experts as 3-D
/// parameters and its router as a parameter, out of reach of `target_modules`): `all-linear`
/// adapts the attention and, as parameters, the router (`gate.weight`) and both expert banks;
/// the hub names of the experts' linears become their banks (gate and up together, as
/// `gate_up_proj`, which then takes twice the rank and alpha: one update per fused linear's
/// rows), and the router's module name its weight. A name left alone is a linear target.
fn moe_targets(c: &mut lora::LoraConfig, moe: &model_loader::MoeConfig) {
    let [gate, up, down] = moe.names.linears;
    let mut params: Vec<String> = Vec::new();
    let mut fused = false;
    match &mut c.target_modules {
        lora::TargetModules::AllLinear => {
            params.extend(["gate_up_proj", "gate.weight", "down_proj"].map(String::from));
            fused = true;
        }
        lora::TargetModules::List(list) => {
            let has = |n: &str| list.iter().any(|t| t == n);
            if has(gate) && has(up) {
                params.push("gate_up_proj".into());
                fused = true;
            }
            if has(down) {
                params.push("down_proj".into());
            }
            if has("gate") {
                params.push("gate.weight".into());
            }
            // Half of a fused pair stays in the list, for the plan to refuse by name.
            list.retain(|t| !((fused && (t == gate || t == up)) || t == down || t == "gate"));
        }
        lora::TargetModules::Regex(_) => {}
    }
    for p in params {
        if !c.target_parameters.contains(&p) {
            c.target_parameters.push(p);
        }
    }
    if fused {
        let key = ".*\\.gate_up_proj".to_owned();
        c.rank_pattern.insert(key.clone(), 2 * c.r);
        c.alpha_pattern.insert(key, 2.0 * c.alpha);
    }
}

/// The trained adapters' dtype (`lora_dtype`). `auto` is TRL's rule: its SFT and DPO trainers cast a
/// 4-/8-bit model's trainable adapters to bf16 after `get_peft_model`. DoRA stays f32 under `auto`:
/// TRL keeps its magnitude in f32, and nibble keeps a DoRA layer in one dtype.
fn adapter_kind(recipe: &Recipe, cfg: &HfConfig) -> Kind {
    let m = &recipe.model;
    match m.lora_dtype {
        config::types::LoraDtype::Float32 => Kind::Float,
        config::types::LoraDtype::Bfloat16 => Kind::BFloat16,
        config::types::LoraDtype::Auto
            if !m.use_dora && (loads_4bit(recipe, cfg) || loads_8bit(recipe, cfg)) =>
        {
            Kind::BFloat16
        }
        config::types::LoraDtype::Auto => Kind::Float,
    }
}

/// The decoder linears of `cfg`'s model by PEFT module name (`model.layers.N.self_attn.q_proj`).
fn linear_names(cfg: &HfConfig) -> Vec<String> {
    (0..cfg.shape.layers)
        .flat_map(|layer| {
            decoder_linears(&cfg.shape).iter().map(move |path| format!("model.layers.{layer}.{path}"))
        })
        .collect()
}

/// Layer 0's linears that `lora` targets, checked by PEFT's rules against every linear of the
/// model (a target that matches nothing is a problem now, not after loading).
/// What nibble does not train yet on a mixture of experts, as recipe problems: TRL's
/// load-balancing loss (on by default there, with the model config's coefficient) and adapters
/// on experts or router, which PEFT makes for `all-linear` and the experts' and router's own
/// names (`target_parameters`); and a coefficient set for a model without experts, as TRL refuses.
fn moe_problems(p: &mut Problems<'_>, cfg: &HfConfig, lora: Option<&lora::LoraConfig>) {
    let recipe = p.recipe;
    let set = recipe.training.router_aux_loss_coef;
    let Some(moe) = &cfg.moe else {
        if let Some(c) = set.filter(|&c| c != 0.0) {
            p.add(
                Problem::Conflict,
                "router_aux_loss_coef",
                format!(
                    "is {c}, but {:?} is not a mixture-of-experts model: there is no router loss to weight",
                    cfg.architecture
                ),
            );
        }
        return;
    };
    if !recipe.model.use_peft {
        return;
    }
    // PEFT fuses the experts' gate and up linears into one bank: naming one alone is its error.
    let [gate, up, _] = moe.names.linears;
    if let Some(TargetModules::List(l)) = &recipe.model.lora_target_modules {
        let has = |n: &str| l.iter().any(|t| t == n);
        if has(gate) != has(up) {
            let (named, other) = if has(gate) { (gate, up) } else { (up, gate) };
            p.add(
                Problem::Conflict,
                "lora_target_modules",
                format!(
                    "names `{named}` without `{other}`: the experts' {gate} and {up} are one fused bank \
                     (`gate_up_proj`) in transformers, which PEFT adapts together; name both"
                ),
            );
        }
    }
    // The resolved adapter (`moe_targets` rewrote the targets as PEFT does).
    let params = lora.is_some_and(|l| !l.target_parameters.is_empty());
    if params && (recipe.model.lora_dropout != 0.0 || recipe.model.use_dora) {
        p.add(
            Problem::Conflict,
            "lora_dropout",
            "adapters on a mixture's router and experts (PEFT's ParamWrapper) have no dropout or DoRA: \
             set lora_dropout: 0 and use_dora: false, or target the attention only",
        );
    }
}

fn layer_targets(p: &mut Problems<'_>, cfg: &HfConfig, lora: &lora::LoraConfig) -> Option<Vec<String>> {
    let empty = matches!(&lora.target_modules, lora::TargetModules::List(l) if l.is_empty());
    if empty && !lora.target_parameters.is_empty() {
        return Some(Vec::new());
    }
    if empty && p.recipe.model.lora_target_modules.is_none() {
        p.add(
            Problem::Missing,
            "lora_target_modules",
            format!(
                "PEFT has no default LoRA targets for {:?} models; name them, e.g. `all-linear` or [{}]",
                cfg.architecture,
                device_map::estimate::block_linears(&cfg.shape)
                    .iter()
                    .map(|l| l.0)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        return None;
    }
    let names = linear_names(cfg);
    let selected = p.take("lora_target_modules", lora::select_targets(&names, lora))?;
    let prefix = "model.layers.0.";
    Some(
        names
            .iter()
            .zip(selected)
            .filter(|(n, s)| *s && n.starts_with(prefix))
            .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_owned))
            .collect(),
    )
}

/// Whether the decoder linears are 4-bit: quantized while loading, or read pre-quantized.
fn loads_4bit(recipe: &Recipe, cfg: &HfConfig) -> bool {
    recipe.model.load_in_4bit || cfg.quantization == Some(model_loader::Prequantized::FourBit)
}

fn loads_8bit(recipe: &Recipe, cfg: &HfConfig) -> bool {
    recipe.model.load_in_8bit || matches!(cfg.quantization, Some(model_loader::Prequantized::EightBit { .. }))
}

/// sft's resident memory when loading starts (libtorch, tokenizer, the process), measured on the
/// bench machine (docs/benchmarks.md).
const RUNTIME_BYTES: u64 = 170 << 20;

/// What oneDNN keeps per native 16-bit GEMM shape on a CPU (its cached primitive): 0.6-0.9 MiB
/// measured for shapes from 1024x2048 to 4096x14336 on an AVX512-BF16 host, docs/benchmarks.md.
const GEMM_KERNEL_BYTES: u64 = 768 << 10;

/// The oneDNN and ideep cache capacities sft sets unless the environment does: torch's default
/// of 1024 entries each holds ~0.75 GiB of kernels once GEMM shapes vary (a mixture's expert
/// rows, decoding's growing attention, batches of varying length); 256 still holds a step's.
pub const GEMM_KERNEL_CACHE_ENTRIES: u64 = 256;

/// The environment variables that size oneDNN's primitive cache and ideep's above it.
pub const GEMM_KERNEL_CACHE_VARS: [&str; 2] = ["ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"];

/// The kernels those caches keep at most: the larger capacity in effect (a kernel either holds
/// stays alive), torch's default 1024 where unset.
fn gemm_kernel_cache_entries() -> u64 {
    let capacity = |var: &str| std::env::var(var).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(1024);
    GEMM_KERNEL_CACHE_VARS.iter().map(|v| capacity(v)).max().unwrap_or(1024)
}

/// The run's memory-driving settings, training on `device`.
fn run_shape(
    recipe: &Recipe,
    cfg: &HfConfig,
    lora: Option<&lora::LoraConfig>,
    lora_linears: &[String],
    cpu_matmul: CpuMatmul,
    device: device_map::Device,
) -> RunShape {
    let base = if loads_4bit(recipe, cfg) {
        BaseWeights::FourBit { double_quant: recipe.model.use_bnb_nested_quant }
    } else if recipe.model.load_in_8bit {
        BaseWeights::EightBit
    } else {
        BaseWeights::Dense
    };
    let t = &recipe.training;
    let sixteen = if recipe.model.dtype == Dtype::Float16 { Kind::Half } else { Kind::BFloat16 };
    let on_cpu = device == device_map::Device::Cpu;
    let seq = t.max_length.and_then(|n| u64::try_from(n).ok()).unwrap_or(1024);
    let dtype_bytes = if model_kind(recipe, cfg) == Kind::Float { 4 } else { 2 };
    let matmul_in_f32 = on_cpu && quant::ops::matmul_in_f32_under(cpu_matmul, sixteen, Device::Cpu);
    RunShape {
        base,
        dtype_bytes,
        lora_r: if recipe.model.use_peft { u64::try_from(recipe.model.lora_r).unwrap_or(0) } else { 0 },
        lora_targets: lora_linears.to_vec(),
        lora_param_params: lora.map_or(0, |l| moe_adapter_params(cfg, l)),
        adapter_bytes: if adapter_kind(recipe, cfg) == Kind::BFloat16 { 2 } else { 4 },
        lora_dropout: recipe.model.use_peft && recipe.model.lora_dropout > 0.0,
        // DPO runs each pair's chosen and rejected sequences in one batch of 2B; its reference pass
        // (no graph, one layer's activations at a time) comes before the policy's and peaks lower.
        batch: u64::try_from(t.per_device_train_batch_size).unwrap_or(1)
            * if recipe.dpo.is_some() { 2 } else { 1 },
        seq,
        gradient_checkpointing: t.gradient_checkpointing,
        // Packed rows, and a sliding window shorter than the rows, attend through an explicit
        // mask, which keeps the probabilities; Gemma 2's eager attention always keeps them.
        attention_scores: t.packing
            || cfg.sliding_window.is_some_and(|w| w < seq)
            || cfg.architecture == Architecture::Gemma2,
        matmul_in_f32,
        logits_chunk_bytes: sft::train::HEAD_CHUNK_BYTES as u64,
        runtime: if on_cpu { RUNTIME_BYTES } else { 0 },
        gemm_kernel_bytes: if on_cpu && dtype_bytes == 2 && !matmul_in_f32 { GEMM_KERNEL_BYTES } else { 0 },
        gemm_kernel_cache: gemm_kernel_cache_entries(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::types::DpoLoss;

    fn recipe(yaml: &str) -> Recipe {
        config::Loader::new().yaml("r.yaml", format!("dataset_name: d\n{yaml}")).load().expect("recipe")
    }

    /// The estimate keeps attention's `seq x seq` probabilities where the model's attention
    /// materialises them: packed rows, a sliding window shorter than the rows, Gemma 2's eager
    /// attention; not for plain causal rows of Llama or Gemma 3 within the window.
    #[test]
    fn attention_scores_are_counted_where_the_attention_keeps_them() {
        let families = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families");
        let scores = |dir: &str, yaml: &str| {
            let cfg = HfConfig::from_dir(&families.join(dir).join("model")).expect("config");
            let r = recipe(&format!("model_name_or_path: m\n{yaml}"));
            run_shape(&r, &cfg, None, &[], CpuMatmul::Auto, device_map::Device::Cpu).attention_scores
        };
        // The tiny Gemma 3's window is 16 positions.
        assert!(!scores("gemma3", "max_length: 16\n"));
        assert!(scores("gemma3", "max_length: 17\n"));
        assert!(scores("gemma3", "max_length: 16\npacking: true\n"));
        assert!(scores("gemma2", "max_length: 8\n"), "eager attention");
    }

    /// On a mixture of experts what PEFT refuses is refused by key: half of a fused gate/up pair,
    /// dropout or DoRA on parameter adapters; the router loss trains and evaluates with any
    /// targets; a coefficient for a dense model is refused as TRL refuses it.
    #[test]
    fn moe_recipes_refuse_what_peft_refuses() {
        let families = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families");
        let cfg = HfConfig::from_dir(&families.join("mixtral/model")).expect("config");
        let keys = |yaml: &str| {
            let r = recipe(&format!("model_name_or_path: m\nuse_peft: true\n{yaml}"));
            let lora = lora_config(&r, &cfg, "m", 8);
            let mut p = Problems { recipe: &r, found: Vec::new() };
            moe_problems(&mut p, &cfg, Some(&lora));
            p.found.iter().map(|d| d.key.clone()).collect::<Vec<_>>()
        };
        // The router loss trains and evaluates.
        assert!(keys("lora_target_modules: [q_proj, v_proj]\n").is_empty());
        assert!(keys("lora_target_modules: [q_proj, v_proj]\neval_strategy: steps\n").is_empty());
        assert!(
            keys("router_aux_loss_coef: 0.01\nlora_target_modules: all-linear\neval_strategy: epoch\nlora_dropout: 0\n")
                .is_empty()
        );
        assert!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: [q_proj]\neval_strategy: steps\n").is_empty()
        );
        // Experts and router adapt as PEFT adapts them; half of the fused gate/up pair is refused
        // as PEFT refuses it, and so are dropout and DoRA on them.
        assert!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: [q_proj, w1, w3]\nlora_dropout: 0\n")
                .is_empty()
        );
        // TRL's default lora_dropout (0.05) on them is PEFT's error too.
        assert_eq!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: [q_proj, w1, w3]\n"),
            ["lora_dropout"]
        );
        assert_eq!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: [q_proj, w1]\nlora_dropout: 0\n"),
            ["lora_target_modules"]
        );
        assert_eq!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: all-linear\nlora_dropout: 0.05\n"),
            ["lora_dropout"]
        );
        assert!(
            keys("router_aux_loss_coef: 0\nlora_target_modules: [q_proj, k_proj, v_proj, o_proj]\n")
                .is_empty()
        );
        let dense = HfConfig::from_dir(&families.join("phi3/model")).expect("config");
        let r = recipe("model_name_or_path: m\nrouter_aux_loss_coef: 0.5\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        moe_problems(&mut p, &dense, None);
        assert_eq!(p.found.len(), 1);
        assert!(p.found[0].to_string().contains("not a mixture-of-experts model"), "{}", p.found[0]);
    }

    /// `metric_for_best_model` is checked against the run's evaluation metrics before training:
    /// with or without its `eval_` prefix; DPO's own only for DPO; the router loss only where a
    /// mixture's is on.
    #[test]
    fn the_best_model_metric_is_one_the_evaluation_reports() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dense = HfConfig::from_dir(&root.join("models/tiny-llama")).expect("config");
        let moe = HfConfig::from_dir(&root.join("tests/golden/families/mixtral/model")).expect("config");
        let problems = |trainer: config::Trainer, cfg: &HfConfig, yaml: &str| {
            let r = config::Loader::new()
                .trainer(trainer)
                .yaml("r.yaml", format!("dataset_name: d\nmodel_name_or_path: m\nuse_peft: true\n{yaml}"))
                .load()
                .expect("recipe");
            let mut p = Problems { recipe: &r, found: Vec::new() };
            best_metric_problems(&mut p, cfg);
            p.found.iter().map(|d| d.to_string()).collect::<Vec<_>>()
        };
        let sft = |cfg: &HfConfig, metric: &str| {
            problems(config::Trainer::Sft, cfg, &format!("metric_for_best_model: {metric}\n"))
        };
        let dpo = |metric: &str| {
            problems(config::Trainer::Dpo, &dense, &format!("metric_for_best_model: '{metric}'\n"))
        };
        for ok in ["loss", "eval_loss", "mean_token_accuracy", "eval_runtime"] {
            assert!(sft(&dense, ok).is_empty(), "{ok}");
            assert!(dpo(ok).is_empty(), "{ok}");
        }
        assert!(dpo("rewards/margins").is_empty() && dpo("eval_rewards/accuracies").is_empty());
        assert!(sft(&moe, "aux_loss").is_empty());
        let off = problems(
            config::Trainer::Sft,
            &moe,
            "metric_for_best_model: aux_loss\nrouter_aux_loss_coef: 0\n",
        );
        for wrong in [sft(&dense, "rewards/margins"), sft(&dense, "aux_loss"), sft(&dense, "acuracy"), off] {
            assert_eq!(wrong.len(), 1, "{wrong:?}");
            assert!(
                wrong[0].contains("metric_for_best_model") && wrong[0].contains("mean_token_accuracy"),
                "{}",
                wrong[0]
            );
        }
        assert!(problems(config::Trainer::Sft, &dense, "").is_empty());
    }

    /// PEFT's rewrite of a mixture's targets: all-linear adds the router and both expert banks
    /// as parameters, gate/up fused at twice the rank and alpha; hub names of expert linears
    /// become their banks.
    #[test]
    fn moe_targets_follow_peft() {
        let families = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families");
        for (family, gate, up, down) in
            [("mixtral", "w1", "w3", "w2"), ("qwen3moe", "gate_proj", "up_proj", "down_proj")]
        {
            let cfg = HfConfig::from_dir(&families.join(family).join("model")).expect("config");
            let all = recipe(
                "model_name_or_path: m\nuse_peft: true\nlora_target_modules: all-linear\nlora_alpha: 16\n",
            );
            let c = lora_config(&all, &cfg, "m", 4);
            assert_eq!(c.target_modules, lora::TargetModules::AllLinear);
            assert_eq!(c.target_parameters, ["gate_up_proj", "gate.weight", "down_proj"]);
            assert_eq!(c.rank_of("model.layers.0.mlp.experts.gate_up_proj"), (8, 32.0, 4.0));
            assert_eq!(c.rank_of("model.layers.0.mlp.experts.down_proj"), (4, 16.0, 4.0));
            // The estimate counts their parameters: router r(H + E), gate/up E 2r (H + 2I),
            // down E r (I + H), with r = 4, H = 64, I = 96, E = 4.
            let all4 = recipe(
                "model_name_or_path: m\nuse_peft: true\nlora_target_modules: all-linear\nlora_alpha: 16\nlora_r: 4\n",
            );
            assert_eq!(
                moe_adapter_params(&cfg, &lora_config(&all4, &cfg, "m", 4)),
                4 * (64 + 4) + 4 * 8 * (64 + 192) + 4 * 4 * (96 + 64)
            );
            let named = recipe(&format!(
                "model_name_or_path: m\nuse_peft: true\nlora_target_modules: [q_proj, {gate}, {up}, {down}, gate]\n"
            ));
            let c = lora_config(&named, &cfg, "m", 4);
            assert_eq!(c.target_modules, lora::TargetModules::List(vec!["q_proj".into()]), "{family}");
            assert_eq!(c.target_parameters, ["gate_up_proj", "down_proj", "gate.weight"], "{family}");
        }
    }

    /// PEFT has no default targets for Phi-3: a recipe without `lora_target_modules` is told to
    /// name them (with the model's own linears), and `all-linear` finds the fused ones.
    #[test]
    fn phi3_needs_named_targets_and_all_linear_finds_the_fused_linears() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families/phi3/model");
        let cfg = HfConfig::from_dir(&dir).expect("config");
        let r = recipe("model_name_or_path: m\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        assert_eq!(layer_targets(&mut p, &cfg, &lora_config(&r, &cfg, "m", 8)), None);
        assert_eq!(p.found.len(), 1);
        let message = p.found[0].to_string();
        assert!(
            message.contains("lora_target_modules") && message.contains("qkv_proj, o_proj, gate_up_proj"),
            "{message}"
        );
        let all = recipe("model_name_or_path: m\nlora_target_modules: all-linear\n");
        let mut p = Problems { recipe: &all, found: Vec::new() };
        let got = layer_targets(&mut p, &cfg, &lora_config(&all, &cfg, "m", 8));
        assert_eq!(
            got,
            Some(vec!["qkv_proj".into(), "o_proj".into(), "gate_up_proj".into(), "down_proj".into()])
        );
    }

    /// A pre-quantized checkpoint loads as transformers 5.24 loads it: in its stored dtype
    /// whatever `dtype` asks, its 4-bit layers computing in the recorded compute dtype; the
    /// adapters then bf16 under `lora_dtype: auto` (TRL's cast of a 4-bit model's adapters).
    #[test]
    fn a_prequantized_checkpoint_loads_in_its_stored_and_recorded_dtypes() {
        let golden =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../model-loader/tests/golden/llama-4bit-saved");
        let copy = std::env::temp_dir().join(format!("nibble-prequant-dtype-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).expect("copy");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden.join(f), copy.join(f)).expect("copy");
        }
        let text = std::fs::read_to_string(copy.join("config.json")).expect("config");
        let bf16 = text
            .replace("\"bnb_4bit_compute_dtype\": \"float32\"", "\"bnb_4bit_compute_dtype\": \"bfloat16\"");
        assert_ne!(text, bf16, "the golden config records a float32 compute dtype");
        std::fs::write(copy.join("config.json"), bf16).expect("write");
        for (dir, compute) in [(&golden, Kind::Float), (&copy, Kind::BFloat16)] {
            for asked in ["dtype: bfloat16\n", "dtype: float32\n", ""] {
                let r = recipe(&format!("model_name_or_path: m\nuse_peft: true\n{asked}"));
                let mut cfg = HfConfig::from_dir(dir).expect("config");
                stored_dtype(&mut cfg, dir, &r);
                let load = load_options(&r, &cfg, Device::Cpu);
                assert_eq!(
                    (load.dtype, load.compute_dtype),
                    (Kind::Float, compute),
                    "{} with `{asked}`",
                    dir.display()
                );
                assert_eq!(adapter_kind(&r, &cfg), Kind::BFloat16);
            }
        }
        let _ = std::fs::remove_dir_all(&copy);
    }

    #[test]
    fn a_gpu_without_cuda_is_named() {
        let root = std::env::temp_dir().join(format!("nibble-gpu-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(unused_gpu(&root, false, false), None, "no GPU, nothing to say");
        std::fs::create_dir_all(root.join("proc/driver/nvidia/gpus/0000:01:00.0")).expect("fake gpu");
        let m = unused_gpu(&root, false, false).expect("a GPU goes unused");
        assert!(m.contains("1 NVIDIA GPU(s)") && m.contains("--features cuda"), "{m}");
        let m = unused_gpu(&root, true, false).expect("a CUDA build that sees no device");
        assert!(m.contains("driver"), "{m}");
        assert_eq!(unused_gpu(&root, true, true), None, "the GPU is used");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn linear_names_follow_the_model_and_defaults_target_q_and_v() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let cfg = HfConfig::from_dir(&dir).expect("config");
        let names = linear_names(&cfg);
        assert_eq!(names.len(), 7 * cfg.shape.layers as usize);
        assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
        assert_eq!(names[6], "model.layers.0.mlp.down_proj");
        let r = recipe("model_name_or_path: m\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        let lora = lora_config(&r, &cfg, "m", 8);
        assert_eq!(layer_targets(&mut p, &cfg, &lora), Some(vec!["q_proj".into(), "v_proj".into()]));
        let all = recipe("model_name_or_path: m\nlora_target_modules: all-linear\n");
        assert_eq!(layer_targets(&mut p, &cfg, &lora_config(&all, &cfg, "m", 8)).map(|v| v.len()), Some(7));
        let typo = recipe("model_name_or_path: m\nlora_target_modules: [q_prj]\n");
        assert_eq!(layer_targets(&mut p, &cfg, &lora_config(&typo, &cfg, "m", 8)), None);
        assert_eq!(p.found.len(), 1);
        assert!(
            p.found[0].key == "lora_target_modules" && p.found[0].message.contains("q_prj"),
            "{:?}",
            p.found
        );
    }

    #[test]
    fn a_dpo_plan_builds_its_objective_and_counts_both_sequences_of_a_pair() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let cfg = HfConfig::from_dir(&dir).expect("config");
        let dpo = |yaml: &str| {
            config::Loader::new()
                .trainer(config::Trainer::Dpo)
                .yaml("r.yaml", format!("dataset_name: d\nmodel_name_or_path: m\nuse_peft: true\n{yaml}"))
                .load()
                .expect("DPO recipe")
        };
        let r = dpo("per_device_train_batch_size: 3\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        let plan = DpoPlan::resolve(&mut p, &r).expect("a DPO plan");
        assert!(p.found.is_empty(), "{:?}", p.found);
        assert_eq!(plan.objective.losses, vec![(DpoLoss::Sigmoid, 1.0), (DpoLoss::Sft, 0.5)]);
        assert!(plan.disable_dropout && !plan.precompute);
        let shape = run_shape(&r, &cfg, None, &[], CpuMatmul::Auto, device_map::Device::Cpu);
        assert_eq!(shape.batch, 6, "chosen and rejected run as one batch");
        // DPOTrainer's start-up checks become recipe problems on their keys.
        let r = dpo("loss_type: [exo_pair]\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        let _ = DpoPlan::resolve(&mut p, &r);
        let keys: Vec<&str> = p.found.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["loss_type"], "{:?}", p.found);
        // What nibble's DPO does not do yet is refused, not ignored.
        let r = dpo("loss_type: [sigmoid, sft]\nld_alpha: 0.5\nneftune_noise_alpha: 5\n");
        let mut p = Problems { recipe: &r, found: Vec::new() };
        let _ = DpoPlan::resolve(&mut p, &r);
        let keys: Vec<&str> = p.found.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["loss_type", "neftune_noise_alpha"], "{:?}", p.found);
        // An SFT recipe has no DPO plan.
        let sft = recipe("model_name_or_path: m\n");
        assert!(DpoPlan::resolve(&mut Problems { recipe: &sft, found: Vec::new() }, &sft).is_none());
    }
}
