//! Putting adapters on a model and keeping hold of them: the trainable tensors for the optimizer
//! (A, B and DoRA's magnitude per adapted linear, the full copies of `modules_to_save`), the
//! train/eval switch, and PEFT's adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`) written and read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quant::linear::Linear;
use quant::state::RawTensor;
use tch::{Device, Kind, Tensor};

use crate::dora::{BaseStats, Dora};
use crate::layer::{Flags, LoraLinear, Taken};
use crate::{CONFIG_FILE, Error, LoraConfig, TargetModules, WEIGHTS_FILE, init, target};

/// The prefix PEFT's `PeftModelForCausalLM` puts before module names in its state dict.
const KEY_PREFIX: &str = "base_model.model.";

/// One adapted module's trainable tensors (shallow copies: same storage and gradient as the
/// [`LoraLinear`]'s).
#[derive(Debug)]
pub struct AdapterModule {
    name: String,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Option<Tensor>,
    /// For an adapted parameter (PEFT's `ParamWrapper`), which one; `None` for a linear.
    param: Option<ParamSlot>,
}

/// The parameters `cfg.target_parameters` selects among `slots`, each with its PEFT module key
/// (of several adapted parameters of one module, each earlier one sits one `base_layer` deeper),
/// rank and scaling.
fn param_plan<'s>(
    cfg: &LoraConfig,
    slots: &'s [ParamSlot],
) -> Result<Vec<(String, &'s ParamSlot, usize, f64)>, Error> {
    let chosen: Vec<&ParamSlot> =
        slots.iter().filter(|s| cfg.adapts_param(&format!("{}.{}", s.module, s.param))).collect();
    if !cfg.target_parameters.is_empty() && chosen.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "target_parameters {:?} match no parameter of the model",
            cfg.target_parameters
        )));
    }
    Ok(chosen
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let (r, _, scaling) = cfg.rank_of(&format!("{}.{}", slot.module, slot.param));
            let deeper = chosen[i + 1..].iter().filter(|o| o.module == slot.module).count();
            (format!("{}{}", slot.module, ".base_layer".repeat(deeper)), *slot, r, scaling)
        })
        .collect())
}

/// A model parameter PEFT's `target_parameters` can adapt: a mixture of experts' router weight
/// (2-D) or an expert bank (3-D, one matrix per expert), with its layout as an update sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlot {
    /// The module holding it (`model.layers.0.mlp.experts`, `model.layers.0.mlp.gate`).
    pub module: String,
    /// Its name in the module (`gate_up_proj`, `down_proj`, `weight`).
    pub param: String,
    /// Experts in the bank (`None` for a 2-D weight).
    pub experts: Option<i64>,
    /// Input features of one matrix.
    pub in_features: i64,
    /// Output features of one matrix.
    pub out_features: i64,
    /// Where the parameter computes.
    pub device: Device,
}

/// An adapted parameter, for the model to compute with: `delta = scaling * B A` (a 2-D weight),
/// or for expert `e` of a bank `scaling * B[:, e::E] A[e*r .. (e+1)*r]` (PEFT's layout: A's rows
/// blocked by expert, B's columns interleaved).
#[derive(Debug)]
pub struct ParamAdapter {
    /// The parameter, as offered.
    pub slot: ParamSlot,
    /// A, `[experts * r, in_features]` (`[r, in_features]` for a 2-D weight); shares storage
    /// and gradient with the adapters'.
    pub lora_a: Tensor,
    /// B, `[out_features, experts * r]`.
    pub lora_b: Tensor,
    /// The update's factor.
    pub scaling: f64,
    /// Off inside [`Adapters::without_adapters`].
    pub enabled: Arc<AtomicBool>,
}

impl AdapterModule {
    /// The module's name in the model (`model.layers.0.self_attn.q_proj`; for an adapted
    /// parameter its PEFT module key, `model.layers.0.mlp.experts.base_layer`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The adapted parameter, when this is one.
    pub fn param(&self) -> Option<&ParamSlot> {
        self.param.as_ref()
    }
    /// A, `[r, in_features]`.
    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }
    /// B, `[out_features, r]`.
    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }
    /// DoRA's magnitude, `[out_features]`; `None` without DoRA.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.magnitude.as_ref()
    }
    /// The key PEFT saves A under (`base_model.model.<name>.lora_A.weight`).
    pub fn key_a(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_A.weight", self.name)
    }
    /// The key PEFT saves B under.
    pub fn key_b(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_B.weight", self.name)
    }
    /// The key PEFT saves DoRA's magnitude under (`base_model.model.<name>.lora_magnitude_vector`,
    /// without `.weight`).
    pub fn key_magnitude(&self) -> String {
        format!("{KEY_PREFIX}{}.lora_magnitude_vector", self.name)
    }
}

/// One tensor of a module trained in full (PEFT's `modules_to_save`): the frozen original, kept
/// as PEFT's `ModulesToSaveWrapper` keeps its `original_module`, and the trainable copy the model
/// now computes with (the same storage and gradient as the model's slot).
#[derive(Debug)]
pub struct SavedTensor {
    name: String,
    original: Tensor,
    trainable: Tensor,
}

impl SavedTensor {
    /// The parameter's name in the model (`lm_head.weight`, `model.embed_tokens.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The frozen original (no gradient).
    pub fn original(&self) -> &Tensor {
        &self.original
    }
    /// The trainable copy.
    pub fn trainable(&self) -> &Tensor {
        &self.trainable
    }
    /// The key PEFT saves the copy under: `base_model.model.<name>` (PEFT drops its
    /// `modules_to_save.default.` infix when saving).
    pub fn key(&self) -> String {
        format!("{KEY_PREFIX}{}", self.name)
    }
}

/// The adapters [`inject`] put on a model: their config, their tensors in module order, the full
/// copies of `modules_to_save`, and the train/eval flag every [`LoraLinear`] reads.
#[derive(Debug)]
pub struct Adapters {
    config: LoraConfig,
    modules: Vec<AdapterModule>,
    saved: Vec<SavedTensor>,
    training: Arc<AtomicBool>,
    enabled: Arc<AtomicBool>,
}

/// Wrap each linear `cfg` targets in a [`LoraLinear`] with fresh A and B drawn as PEFT draws them
/// after `set_seed(seed)` (libtorch's global generator is reseeded with `seed`, then consumed in
/// module order; hold [`crate::global_rng`] around other draws that must not interleave), in training mode; with
/// `use_dora`, each also gets DoRA's magnitude, `||W + scaling * B A||` per output row as PEFT
/// initialises it.
///
/// `linears` are the model's linears by module name (transformers' names); an untargeted one is
/// left as it is. `cfg.modules_to_save` must be empty: modules trained in full are offered
/// through [`inject_with_modules`]. Nothing is changed if an error is returned.
pub fn inject<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<Adapters, Error> {
    inject_with(linears.into_iter().collect(), Vec::new(), cfg, Some(seed), true)
}

/// [`inject`], and PEFT's `modules_to_save`: `tensors` are the model's other parameters by
/// transformers name (`lm_head.weight`, `model.embed_tokens.weight`; a module's name is the
/// parameter's without its last part). Every parameter of a module whose name ends with a
/// `modules_to_save` entry (PEFT's rule) is replaced in its slot by a trainable copy, the original
/// kept frozen; an entry that matches no offered module, or that names a linear, is an error.
///
/// Tied tensors (the same storage in two slots, as a tied output head and embedding) are untied
/// as PEFT 0.21.2 unties them without `ensure_weight_tying`: each saved slot gets its own copy,
/// and a slot not saved keeps the frozen original (a warning says so).
pub fn inject_with_modules<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    tensors: impl IntoIterator<Item = (String, &'a mut Tensor)>,
    cfg: &LoraConfig,
    seed: u64,
) -> Result<Adapters, Error> {
    inject_with(linears.into_iter().collect(), tensors.into_iter().collect(), cfg, Some(seed), true)
}

/// Wrap the linears a PEFT adapter directory targets and load its tensors, in eval mode, with
/// Float adapters (PEFT's default); for another dtype, [`LoraConfig::read`] the directory, set
/// `dtype`, [`inject`], then [`Adapters::load_into`]. An adapter with `modules_to_save` needs
/// [`inject_from_with_modules`].
pub fn inject_from<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    dir: &Path,
) -> Result<Adapters, Error> {
    inject_from_with_modules(linears, Vec::new(), dir)
}

/// [`inject_from`] with the model's other parameters offered for `modules_to_save`, as in
/// [`inject_with_modules`]; the saved copies are loaded from the file.
pub fn inject_from_with_modules<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    tensors: impl IntoIterator<Item = (String, &'a mut Tensor)>,
    dir: &Path,
) -> Result<Adapters, Error> {
    inject_from_with_params(linears, tensors, &[], dir).map(|(adapters, _)| adapters)
}

/// [`inject_from_with_modules`] for an adapter that may also adapt parameters (PEFT's
/// `target_parameters`, a mixture's router and experts): `params` are the model's adaptable
/// parameters; the file is read and checked against linears and parameters before the model is
/// touched. Returns the parameter adapters for the model to compute with.
pub fn inject_from_with_params<'a>(
    linears: impl IntoIterator<Item = (String, &'a mut Box<dyn Linear>)>,
    tensors: impl IntoIterator<Item = (String, &'a mut Tensor)>,
    params: &[ParamSlot],
    dir: &Path,
) -> Result<(Adapters, Vec<ParamAdapter>), Error> {
    let cfg = LoraConfig::read(dir)?;
    let linears: Vec<(String, &'a mut Box<dyn Linear>)> = linears.into_iter().collect();
    let tensors: Vec<(String, &'a mut Tensor)> = tensors.into_iter().collect();
    // Check the file against the targets before touching the model.
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = selected_linears(&names, &cfg)?;
    let tensor_names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let saved = target::select_saved(&names, &tensor_names, &cfg)?;
    let mut shapes: Vec<(String, i64, i64, i64)> = linears
        .iter()
        .zip(&selected)
        .filter(|(_, s)| **s)
        .map(|((n, l), _)| (n.clone(), cfg.rank_of(n).0 as i64, l.in_features(), l.out_features()))
        .collect();
    for (name, slot, r, _) in param_plan(&cfg, params)? {
        let rows = r as i64 * slot.experts.unwrap_or(1);
        shapes.push((name, rows, slot.in_features, slot.out_features));
    }
    let saved_shapes: Vec<(String, Vec<i64>)> =
        tensors.iter().zip(&saved).filter(|(_, s)| **s).map(|((n, t), _)| (n.clone(), t.size())).collect();
    let weights = read_weights(dir, &cfg, &shapes, &saved_shapes)?;
    let mut adapters = inject_with(linears, tensors, &cfg, None, false)?;
    let made = adapters.add_params(params, None)?;
    adapters.copy_in(&weights)?;
    Ok((adapters, made))
}

/// Which of the linears `names` `cfg` targets: PEFT's rules, or none when it adapts only
/// parameters (`target_parameters` with an empty `target_modules`).
fn selected_linears(names: &[String], cfg: &LoraConfig) -> Result<Vec<bool>, Error> {
    let only_params = matches!(&cfg.target_modules, TargetModules::List(l) if l.is_empty())
        && !cfg.target_parameters.is_empty();
    if only_params { Ok(vec![false; names.len()]) } else { target::select(names, cfg) }
}

/// The other offered tensors that share storage with tensor `i` (tied weights), by name.
fn tied_with(tensors: &[(String, &mut Tensor)], i: usize) -> Vec<String> {
    let ptr = tensors[i].1.data_ptr() as usize;
    tensors
        .iter()
        .enumerate()
        .filter(|(j, (_, t))| *j != i && t.data_ptr() as usize == ptr && ptr != 0)
        .map(|(_, (n, _))| n.clone())
        .collect()
}

fn inject_with<'a>(
    linears: Vec<(String, &'a mut Box<dyn Linear>)>,
    tensors: Vec<(String, &'a mut Tensor)>,
    cfg: &LoraConfig,
    seed: Option<u64>,
    training: bool,
) -> Result<Adapters, Error> {
    cfg.validate()?;
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = selected_linears(&names, cfg)?;
    let tensor_names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let saved = target::select_saved(&names, &tensor_names, cfg)?;
    for (i, _) in saved.iter().enumerate().filter(|(_, s)| **s) {
        let tied = tied_with(&tensors, i);
        if !tied.is_empty() {
            tracing::warn!(
                saved = %tensors[i].0,
                tied_to = ?tied,
                "modules_to_save unties tied weights as PEFT does without ensure_weight_tying: the trained copy \
                 is used only here, the tied slots keep the frozen original (or their own copy)"
            );
        }
    }
    let training = Arc::new(AtomicBool::new(training));
    let enabled = Arc::new(AtomicBool::new(true));
    // Make every tensor first, so an error leaves the model untouched. Seeded draws come from
    // libtorch's global generator in module order, as PEFT draws them after `set_seed`.
    let rng = seed.map(|seed| {
        let guard = init::global_rng();
        tch::manual_seed(seed as i64);
        guard
    });
    let mut made = Vec::new();
    for ((name, slot), _) in linears.into_iter().zip(&selected).filter(|(_, s)| **s) {
        let (inp, out, device) = (slot.in_features(), slot.out_features(), slot.device());
        let (r, _, scaling) = cfg.rank_of(&name);
        let r = r as i64;
        let (a, b) = match seed {
            Some(_) => init::initial(cfg.init, r, inp, out)?,
            None => (
                Tensor::f_zeros([r, inp], (Kind::Float, Device::Cpu))?,
                Tensor::f_zeros([out, r], (Kind::Float, Device::Cpu))?,
            ),
        };
        let param = |t: Tensor| -> Result<Tensor, Error> {
            Ok(t.f_to_kind(cfg.dtype)?.f_to_device(device)?.set_requires_grad(true))
        };
        let lora_a = param(a)?;
        let lora_b = param(b)?;
        let dora = if cfg.use_dora {
            let stats = BaseStats::measure(&name, slot.as_ref())?;
            let magnitude = stats
                .weight_norm(slot.as_ref(), &lora_a, &lora_b, scaling)
                .map_err(|source| Error::Base { module: name.clone(), source })?;
            Some(Dora { magnitude: magnitude.set_requires_grad(true), stats })
        } else {
            None
        };
        made.push((name, slot, lora_a, lora_b, dora, scaling));
    }
    drop(rng);
    let mut copies = Vec::new();
    for ((name, slot), _) in tensors.into_iter().zip(&saved).filter(|(_, s)| **s) {
        let copy = tch::no_grad(|| -> Result<Tensor, Error> {
            let mut c = slot.f_empty_like()?;
            c.f_copy_(slot)?;
            Ok(c)
        })?;
        copies.push((name, slot, copy.set_requires_grad(true)));
    }
    let mut modules = Vec::with_capacity(made.len());
    for (name, slot, lora_a, lora_b, dora, scaling) in made {
        let module = AdapterModule {
            name,
            lora_a: lora_a.shallow_clone(),
            lora_b: lora_b.shallow_clone(),
            magnitude: dora.as_ref().map(|d| d.magnitude.shallow_clone()),
            param: None,
        };
        let base = std::mem::replace(slot, Box::new(Taken));
        *slot = Box::new(LoraLinear::new(
            base,
            lora_a,
            lora_b,
            scaling,
            cfg.dropout,
            Flags { training: training.clone(), enabled: enabled.clone() },
            dora,
        ));
        modules.push(module);
    }
    let saved: Vec<SavedTensor> = copies
        .into_iter()
        .map(|(name, slot, copy)| {
            let original = std::mem::replace(slot, copy.shallow_clone());
            SavedTensor { name, original, trainable: copy }
        })
        .collect();
    let adapters = Adapters { config: cfg.clone(), modules, saved, training, enabled };
    tracing::info!(
        modules = adapters.modules.len(),
        r = cfg.r,
        alpha = cfg.alpha,
        scaling = cfg.scaling(),
        dora = cfg.use_dora,
        saved = ?adapters.saved.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        trainable = adapters.num_trainable(),
        "LoRA adapters injected"
    );
    Ok(adapters)
}

impl Adapters {
    /// Adapt the parameters `cfg.target_parameters` selects among `slots` (PEFT's
    /// `ParamWrapper`: a parameter's `<module>.<param>` ends with an entry), each with its rank
    /// and alpha from the patterns, A and B drawn as for a linear of `[experts * r, in]` and
    /// `[out, experts * r]` after `seed` (or zeros, for a file to fill: `None`). Their keys
    /// follow PEFT's nesting: of several adapted parameters of one module, each earlier one
    /// (in the module's order) sits one `base_layer` deeper. Returns them for the model.
    pub fn add_params(&mut self, slots: &[ParamSlot], seed: Option<u64>) -> Result<Vec<ParamAdapter>, Error> {
        let cfg = &self.config;
        let plan = param_plan(cfg, slots)?;
        let rng = seed.map(|seed| {
            let guard = init::global_rng();
            tch::manual_seed(seed.wrapping_add(1) as i64);
            guard
        });
        let mut made = Vec::with_capacity(plan.len());
        for (name, slot, r, scaling) in plan {
            let rows = r as i64 * slot.experts.unwrap_or(1);
            let (a, b) = match seed {
                Some(_) => init::initial(cfg.init, rows, slot.in_features, slot.out_features)?,
                None => (
                    Tensor::f_zeros([rows, slot.in_features], (Kind::Float, Device::Cpu))?,
                    Tensor::f_zeros([slot.out_features, rows], (Kind::Float, Device::Cpu))?,
                ),
            };
            let param = |t: Tensor| -> Result<Tensor, Error> {
                Ok(t.f_to_kind(cfg.dtype)?.f_to_device(slot.device)?.set_requires_grad(true))
            };
            made.push((name, slot.clone(), param(a)?, param(b)?, scaling));
        }
        drop(rng);
        let mut out = Vec::with_capacity(made.len());
        for (name, slot, lora_a, lora_b, scaling) in made {
            self.modules.push(AdapterModule {
                name,
                lora_a: lora_a.shallow_clone(),
                lora_b: lora_b.shallow_clone(),
                magnitude: None,
                param: Some(slot.clone()),
            });
            out.push(ParamAdapter { slot, lora_a, lora_b, scaling, enabled: self.enabled.clone() });
        }
        tracing::info!(parameters = out.len(), "LoRA adapters on parameters (target_parameters) added");
        Ok(out)
    }

    /// The settings the adapters were made with.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Every adapted module, in the order the model offered them.
    pub fn modules(&self) -> &[AdapterModule] {
        &self.modules
    }

    /// The tensors trained in full (`modules_to_save`), in the order the model offered them.
    pub fn saved(&self) -> &[SavedTensor] {
        &self.saved
    }

    /// The tensors to optimize, sharing storage and gradients with the model: per adapted module
    /// A, B (and DoRA's magnitude), then the `modules_to_save` copies.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters().into_iter().map(|(_, t)| t).collect()
    }

    /// [`Adapters::parameters`] with the keys PEFT saves them under, for checkpoints.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.modules.len() + self.saved.len());
        for m in &self.modules {
            out.push((m.key_a(), m.lora_a.shallow_clone()));
            out.push((m.key_b(), m.lora_b.shallow_clone()));
            if let Some(mag) = &m.magnitude {
                out.push((m.key_magnitude(), mag.shallow_clone()));
            }
        }
        out.extend(self.saved.iter().map(|s| (s.key(), s.trainable.shallow_clone())));
        out
    }

    /// Turn dropout on (training) or off (evaluation) in every adapted layer.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Whether dropout is on.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Run `f` on the base model alone, as PEFT's `disable_adapter()` context does (DPO's
    /// reference model without a second copy of the base): every adapted layer computes its base
    /// output only, and each `modules_to_save` tensor holds its frozen original's values (the
    /// trained values are put back afterwards, also when `f` panics). Meant for forwards without
    /// gradients; the adapters are switched back on before this returns.
    pub fn without_adapters<R>(&self, f: impl FnOnce() -> R) -> Result<R, Error> {
        /// Puts the adapters back when dropped.
        struct Restore<'a> {
            adapters: &'a Adapters,
            trained: Vec<Tensor>,
        }
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                tch::no_grad(|| {
                    for (s, t) in self.adapters.saved.iter().zip(&self.trained) {
                        let mut dst = s.trainable.shallow_clone();
                        if let Err(e) = dst.f_copy_(t) {
                            tracing::error!(tensor = s.name, "restoring a modules_to_save tensor: {e}");
                        }
                    }
                });
                self.adapters.enabled.store(true, Ordering::Relaxed);
            }
        }
        let trained = tch::no_grad(|| -> Result<Vec<Tensor>, Error> {
            self.saved.iter().map(|s| Ok(s.trainable.f_detach_copy()?)).collect()
        })?;
        // From here on, whatever happens, the trained values and the adapters come back.
        let _restore = Restore { adapters: self, trained };
        self.enabled.store(false, Ordering::Relaxed);
        tch::no_grad(|| -> Result<(), Error> {
            for s in &self.saved {
                s.trainable.shallow_clone().f_copy_(&s.original)?;
            }
            Ok(())
        })?;
        Ok(f())
    }

    /// Run `f` with `values` (one per [`Adapters::parameters`] tensor, e.g. a frozen copy of the
    /// adapter a DPO run started from: TRL's "ref" adapter) in place of the trained values, which
    /// are put back afterwards, also when `f` panics. Meant for forwards without gradients. A
    /// value of another dtype (TRL's f32 "ref" copy beside bf16 adapters) is swapped in as it is,
    /// so the layers compute in its dtype, as PEFT's do.
    pub fn with_values<R>(&self, values: &[Tensor], f: impl FnOnce() -> R) -> Result<R, Error> {
        /// `v` into the parameter `p`: copied in place when the dtypes agree, else swapped in as
        /// `p`'s data, so every handle of the parameter (the layer's, the optimizer's) sees it.
        fn put(p: &mut Tensor, v: &Tensor) -> Result<(), tch::TchError> {
            if p.kind() == v.kind() {
                p.shallow_clone().f_copy_(v).map(|_| ())
            } else {
                p.f_set_data(&v.f_detach_copy()?)
            }
        }
        /// Puts the trained values (and dtypes) back when dropped.
        struct Restore {
            params: Vec<Tensor>,
            trained: Vec<Tensor>,
        }
        impl Drop for Restore {
            fn drop(&mut self) {
                tch::no_grad(|| {
                    for (p, t) in self.params.iter_mut().zip(&self.trained) {
                        if let Err(e) = put(p, t) {
                            tracing::error!("restoring a trained adapter tensor: {e}");
                        }
                    }
                });
            }
        }
        let params = self.parameters();
        if values.len() != params.len() {
            return Err(Error::InvalidConfig(format!(
                "{} reference tensors for {} adapter tensors",
                values.len(),
                params.len()
            )));
        }
        let trained = tch::no_grad(|| -> Result<Vec<Tensor>, Error> {
            params.iter().map(|p| Ok(p.f_detach_copy()?)).collect()
        })?;
        let mut restore = Restore { params, trained };
        tch::no_grad(|| -> Result<(), Error> {
            for (p, v) in restore.params.iter_mut().zip(values) {
                put(p, v)?;
            }
            Ok(())
        })?;
        let out = f();
        drop(restore);
        Ok(out)
    }

    /// Frozen copies of the adapter's current values, for [`Adapters::with_values`].
    pub fn snapshot(&self) -> Result<Vec<Tensor>, Error> {
        tch::no_grad(|| self.parameters().iter().map(|p| Ok(p.f_detach_copy()?)).collect())
    }

    /// Whether the adapters are on (off only inside [`Adapters::without_adapters`]).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The number of trainable elements (A, B and magnitude of every module, and the full copies).
    pub fn num_trainable(&self) -> u64 {
        self.named_parameters().iter().map(|(_, t)| t.numel() as u64).sum()
    }

    /// PEFT's `print_trainable_parameters` line:
    /// `trainable params: 1,024 || all params: 1,001,024 || trainable%: 0.1023`.
    ///
    /// `base_params` is the model's own parameter count, without adapters, counted as PEFT
    /// counts it: a 4-bit weight (bitsandbytes `Params4bit`) at its unpacked element count
    /// (packed bytes x 2), its quantization state not at all, tied weights once. The trainable
    /// tensors are added to it: PEFT counts a `modules_to_save` copy beside its frozen original.
    pub fn trainable_report(&self, base_params: u64) -> String {
        let trainable = self.num_trainable();
        let all = base_params + trainable;
        let percent = if all == 0 { f64::NAN } else { 100.0 * trainable as f64 / all as f64 };
        format!(
            "trainable params: {} || all params: {} || trainable%: {percent:.4}",
            thousands(trainable),
            thousands(all)
        )
    }

    /// `target_modules` as PEFT records it once resolved against a model: all-linear becomes
    /// the list of the adapted modules' full names.
    fn written_targets(&self) -> TargetModules {
        match &self.config.target_modules {
            TargetModules::AllLinear => TargetModules::List(
                self.modules.iter().filter(|m| m.param.is_none()).map(|m| m.name.clone()).collect(),
            ),
            other => other.clone(),
        }
    }

    /// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors` as
    /// `PeftModel.save_pretrained` does (keys without the adapter name, tensors in their dtype,
    /// `inference_mode: true`); each file atomically, with the same bytes for the same adapters.
    /// Creates `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let mut tensors = Vec::with_capacity(3 * self.modules.len() + self.saved.len());
        for (key, t) in self.named_parameters() {
            tensors.push(raw_tensor(key, &t)?);
        }
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        quant::file::write(&dir.join(WEIGHTS_FILE), &tensors, &meta)?;
        let text = self.config.to_json_with(&self.written_targets(), true);
        write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
        tracing::info!(dir = %dir.display(), modules = self.modules.len(), saved = self.saved.len(), "LoRA adapter saved");
        Ok(())
    }

    /// Load A and B (DoRA's magnitudes, the `modules_to_save` copies) from a PEFT adapter
    /// directory into these adapters (e.g. to resume). The directory's r, alpha, rsLoRA and DoRA
    /// settings must equal this config's; its tensors must be exactly this set's (with or without
    /// the `.default` adapter name), in F32, F16 or BF16, each of its module's shape. Nothing is
    /// changed if an error is returned.
    pub fn load_into(&mut self, dir: &Path) -> Result<(), Error> {
        let weights = self.read_file(dir)?;
        self.copy_in(&weights)
    }

    /// An adapter directory's tensors for these adapters: its config checked against theirs (r,
    /// alpha, rsLoRA, DoRA), every tensor taken with its shape and dtype checked.
    fn read_file(&self, dir: &Path) -> Result<Weights, Error> {
        let file_cfg = LoraConfig::read(dir)?;
        let path = dir.join(CONFIG_FILE);
        let mismatch = |what: &str, file: String, ours: String| Error::Config {
            path: path.clone(),
            problem: format!("{what} is {file}, but these adapters have {ours}"),
        };
        if file_cfg.r != self.config.r {
            return Err(mismatch("r", file_cfg.r.to_string(), self.config.r.to_string()));
        }
        if file_cfg.alpha != self.config.alpha {
            return Err(mismatch("lora_alpha", file_cfg.alpha.to_string(), self.config.alpha.to_string()));
        }
        for (what, file, ours) in [
            ("use_rslora", file_cfg.use_rslora, self.config.use_rslora),
            ("use_dora", file_cfg.use_dora, self.config.use_dora),
        ] {
            if file != ours {
                return Err(mismatch(what, file.to_string(), ours.to_string()));
            }
        }
        let shapes: Vec<(String, i64, i64, i64)> = self
            .modules
            .iter()
            .map(|m| (m.name.clone(), m.lora_a.size()[0], m.lora_a.size()[1], m.lora_b.size()[0]))
            .collect();
        let saved: Vec<(String, Vec<i64>)> =
            self.saved.iter().map(|s| (s.name.clone(), s.trainable.size())).collect();
        read_weights(dir, &self.config, &shapes, &saved)
    }

    /// The adapter file's values in `dir` as [`Adapters::parameters`] orders them, in the file's
    /// own dtype (not rounded to these adapters' dtype), on the parameters' devices: TRL's
    /// "ref" adapter, which copies the starting adapter before the trained one is cast to bf16.
    /// [`Adapters::load_into`]'s checks apply.
    pub fn file_values(&self, dir: &Path) -> Result<Vec<Tensor>, Error> {
        // The checks and the reading are load_into's; the values are taken before any cast.
        let w = self.read_file(dir)?;
        let params = self.parameters();
        let mut file = Vec::with_capacity(params.len());
        for (m, t) in self.modules.iter().zip(&w.modules) {
            file.push(t.a.shallow_clone());
            file.push(t.b.shallow_clone());
            if let (Some(_), Some(mag)) = (m.magnitude.as_ref(), t.magnitude.as_ref()) {
                file.push(mag.shallow_clone());
            }
        }
        file.extend(w.saved.iter().map(Tensor::shallow_clone));
        if file.len() != params.len() {
            return Err(Error::InvalidConfig(format!(
                "{} file tensors for {} adapter tensors",
                file.len(),
                params.len()
            )));
        }
        file.iter().zip(&params).map(|(f, p)| Ok(f.f_to_device(p.device())?)).collect()
    }

    /// Copy checked tensors (in module order, then saved order) into the parameters.
    fn copy_in(&mut self, w: &Weights) -> Result<(), Error> {
        tch::no_grad(|| -> Result<(), Error> {
            for (m, t) in self.modules.iter_mut().zip(&w.modules) {
                m.lora_a.f_copy_(&t.a)?;
                m.lora_b.f_copy_(&t.b)?;
                if let (Some(mag), Some(from)) = (m.magnitude.as_mut(), t.magnitude.as_ref()) {
                    mag.f_copy_(from)?;
                }
            }
            for (s, t) in self.saved.iter_mut().zip(&w.saved) {
                s.trainable.f_copy_(t)?;
            }
            Ok(())
        })
    }
}

/// One adapted module's tensors as read from a file (Float/Half/BFloat16, CPU).
struct ModuleWeights {
    a: Tensor,
    b: Tensor,
    magnitude: Option<Tensor>,
}

/// An adapter file's tensors, checked, in module order and saved order.
struct Weights {
    modules: Vec<ModuleWeights>,
    saved: Vec<Tensor>,
}

/// Which tensor of an adapted module a key holds.
#[derive(Clone, Copy)]
enum Part {
    A,
    B,
    Magnitude,
}

/// The key endings PEFT writes (and, with the adapter name, holds in memory) for each part.
const PARTS: [(&str, Part); 6] = [
    (".lora_A.weight", Part::A),
    (".lora_A.default.weight", Part::A),
    (".lora_B.weight", Part::B),
    (".lora_B.default.weight", Part::B),
    (".lora_magnitude_vector", Part::Magnitude),
    (".lora_magnitude_vector.default.weight", Part::Magnitude),
];

/// A safetensors entry as a tensor, its dtype (F32, F16, BF16) and shape checked.
fn checked(path: &Path, t: &RawTensor, expected: &[i64], dims: &str) -> Result<Tensor, Error> {
    let bad = |problem: String| Error::BadTensor { path: path.to_owned(), key: t.name.clone(), problem };
    let kind = match t.dtype.as_str() {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        other => return Err(bad(format!("dtype {other} (expected F32, F16 or BF16)"))),
    };
    let shape: Vec<i64> = t.shape.iter().map(|d| *d as i64).collect();
    if shape != expected {
        return Err(bad(format!("shape {shape:?}, expected {dims}")));
    }
    Ok(Tensor::f_from_data_size(&t.data, &shape, kind)?)
}

/// Read `dir/adapter_model.safetensors` for modules `(name, in, out)` and saved tensors `(name,
/// shape)`: every tensor taken, none missing, shapes and dtypes checked.
fn read_weights(
    dir: &Path,
    cfg: &LoraConfig,
    modules: &[(String, i64, i64, i64)],
    saved: &[(String, Vec<i64>)],
) -> Result<Weights, Error> {
    let path = dir.join(WEIGHTS_FILE);
    let (raw, _) = quant::file::read(&path)?;
    let index: HashMap<&str, usize> =
        modules.iter().enumerate().map(|(i, (n, ..))| (n.as_str(), i)).collect();
    let saved_index: HashMap<&str, usize> =
        saved.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let mut found: Vec<[Option<&RawTensor>; 3]> = vec![[None, None, None]; modules.len()];
    let mut found_saved: Vec<Option<&RawTensor>> = vec![None; saved.len()];
    for t in &raw {
        let unexpected =
            |why: &str| Error::UnexpectedTensor { path: path.clone(), key: t.name.clone(), why: why.into() };
        let rest = t
            .name
            .strip_prefix(KEY_PREFIX)
            .ok_or_else(|| unexpected("PEFT's keys start with `base_model.model.`"))?;
        if let Some(&i) = saved_index.get(rest) {
            found_saved[i] = Some(t);
            continue;
        }
        let (module, part) = PARTS
            .iter()
            .find_map(|(end, part)| rest.strip_suffix(end).map(|m| (m, *part)))
            .ok_or_else(|| {
                unexpected(
                    "not a LoRA A or B weight (`<module>.lora_A.weight`), a DoRA magnitude \
                     (`<module>.lora_magnitude_vector`) or a tensor of the modules_to_save offered",
                )
            })?;
        if matches!(part, Part::Magnitude) && !cfg.use_dora {
            return Err(unexpected("a DoRA magnitude, but use_dora is false"));
        }
        let i =
            *index.get(module).ok_or_else(|| unexpected("its module is not among the targeted linears"))?;
        if found[i][part as usize].replace(t).is_some() {
            return Err(unexpected("the same weight appears twice (with and without `.default`)"));
        }
    }
    let missing = |key: String| Error::MissingTensor { path: path.clone(), key };
    let mut out = Vec::with_capacity(modules.len());
    for ((name, r, inp, outf), parts) in modules.iter().zip(&found) {
        let r = *r;
        let get = |part: Part, key: String| parts[part as usize].ok_or_else(|| missing(key));
        let a = get(Part::A, format!("{KEY_PREFIX}{name}.lora_A.weight"))?;
        let b = get(Part::B, format!("{KEY_PREFIX}{name}.lora_B.weight"))?;
        let a = checked(&path, a, &[r, *inp], &format!("[r, in_features] = [{r}, {inp}]"))?;
        let b = checked(&path, b, &[*outf, r], &format!("[out_features, r] = [{outf}, {r}]"))?;
        let magnitude = if cfg.use_dora {
            let m = get(Part::Magnitude, format!("{KEY_PREFIX}{name}.lora_magnitude_vector"))?;
            Some(checked(&path, m, &[*outf], &format!("[out_features] = [{outf}]"))?)
        } else {
            None
        };
        out.push(ModuleWeights { a, b, magnitude });
    }
    let mut copies = Vec::with_capacity(saved.len());
    for ((name, shape), t) in saved.iter().zip(&found_saved) {
        let t = t.ok_or_else(|| missing(format!("{KEY_PREFIX}{name}")))?;
        copies.push(checked(&path, t, shape, &format!("{shape:?}, the shape of the model's `{name}`"))?);
    }
    tracing::debug!(file = %path.display(), tensors = raw.len(), "LoRA adapter weights read");
    Ok(Weights { modules: out, saved: copies })
}

/// A tensor's bytes as a safetensors entry (moved to the CPU, made contiguous).
fn raw_tensor(name: String, t: &Tensor) -> Result<RawTensor, Error> {
    let dtype = match t.kind() {
        Kind::Float => "F32",
        Kind::BFloat16 => "BF16",
        Kind::Half => "F16",
        other => return Err(Error::Torch(format!("{name}: cannot save dtype {other:?}"))),
    };
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(RawTensor {
        name,
        dtype: dtype.to_owned(),
        shape: t.size().iter().map(|d| *d as usize).collect(),
        data,
    })
}

/// Write a file atomically (quant's one atomic writer), naming it in the error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    quant::file::write_atomic(path, bytes).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// `1234567` -> `1,234,567` (Python's `{:,d}`).
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LoraInit;
    use quant::linear::Dense;
    use std::path::PathBuf;

    use crate::init::global_rng;

    fn dense(out: i64, inp: i64, seed: i64) -> Box<dyn Linear> {
        let w = Tensor::arange(out * inp, (Kind::Float, Device::Cpu))
            .view([out, inp])
            .f_mul_scalar(0.37)
            .and_then(|t| t.f_add_scalar(seed as f64))
            .and_then(|t| t.f_sin())
            .expect("weight");
        let b = Tensor::arange(out, (Kind::Float, Device::Cpu)).f_mul_scalar(0.1).expect("bias");
        Box::new(Dense::new(w, Some(b)).expect("dense"))
    }

    fn model() -> Vec<(String, Box<dyn Linear>)> {
        let mut v = Vec::new();
        for l in 0..2 {
            v.push((format!("model.layers.{l}.self_attn.q_proj"), dense(8, 8, 1 + l)));
            v.push((format!("model.layers.{l}.self_attn.v_proj"), dense(4, 8, 3 + l)));
            v.push((format!("model.layers.{l}.mlp.down_proj"), dense(8, 12, 5 + l)));
        }
        v
    }

    fn offer(m: &mut [(String, Box<dyn Linear>)]) -> Vec<(String, &mut Box<dyn Linear>)> {
        m.iter_mut().map(|(n, l)| (n.clone(), l)).collect()
    }

    fn list(keys: &[&str]) -> TargetModules {
        TargetModules::List(keys.iter().map(|s| s.to_string()).collect())
    }

    fn input(rows: i64, inp: i64) -> Tensor {
        Tensor::arange(rows * inp, (Kind::Float, Device::Cpu)).view([rows, inp]).f_cos().expect("x")
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-30)
    }

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nibble-lora-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn zero_b_adapter_is_the_identity_at_init() {
        let mut m = model();
        let x = input(3, 8);
        let before = m[0].1.forward(&x).expect("base");
        let a = inject(offer(&mut m), &LoraConfig::new(4, 8.0, list(&["q_proj"])), 0).expect("inject");
        assert_eq!(a.modules().len(), 2);
        let after = m[0].1.forward(&x).expect("adapted");
        assert!(after.equal(&before));
        assert!(a.modules()[0].lora_a().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn forward_equals_manual_math_and_scaling() {
        for rslora in [false, true] {
            let mut m = model();
            // m[2] is layer 0's down_proj, made from seed 5.
            let w = dense(8, 12, 5);
            let mut cfg = LoraConfig::new(4, 6.0, list(&["down_proj"]));
            cfg.init = LoraInit::False;
            cfg.use_rslora = rslora;
            let a = inject(offer(&mut m), &cfg, 42).expect("inject");
            let scaling = if rslora { 3.0 } else { 1.5 };
            assert_eq!(cfg.scaling(), scaling);
            let x = input(5, 12);
            let (la, lb) = (a.modules()[0].lora_a(), a.modules()[0].lora_b());
            let manual = w.forward(&x).expect("base") + x.matmul(&la.tr()).matmul(&lb.tr()) * scaling;
            let got = m[2].1.forward(&x).expect("adapted");
            assert!(max_rel(&got, &manual) < 1e-6, "rslora {rslora}");
            assert!(!got.allclose(&w.forward(&x).expect("base"), 1e-3, 1e-3, false));
        }
    }

    #[test]
    fn grads_reach_a_and_b_only() {
        let mut m = model();
        let mut cfg = LoraConfig::new(2, 4.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 1).expect("inject");
        let x = input(3, 8).set_requires_grad(true);
        m[0].1.forward(&x).expect("forward").sum(Kind::Float).backward();
        for p in a.parameters().iter().take(2) {
            let g = p.grad();
            assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        for p in a.parameters().iter().skip(2) {
            assert!(!p.grad().defined(), "the other layer's adapter took no part");
        }
        assert!(x.grad().defined(), "the input gets its gradient through base and adapter");
        // The frozen base weight stays without gradient.
        let w = Tensor::ones([8, 8], (Kind::Float, Device::Cpu));
        let base: Box<dyn Linear> = Box::new(Dense::new(w.shallow_clone(), None).expect("dense"));
        let mut one = vec![("q_proj".to_owned(), base)];
        let a = inject(offer(&mut one), &cfg, 1).expect("inject");
        one[0].1.forward(&input(2, 8)).expect("forward").sum(Kind::Float).backward();
        assert!(!w.grad().defined());
        assert!(a.parameters().iter().all(|p| p.grad().defined()));
    }

    #[test]
    fn dropout_only_while_training() {
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        cfg.dropout = 0.5;
        let a = inject(offer(&mut m), &cfg, 3).expect("inject");
        let _rng = global_rng();
        assert!(a.is_training());
        let x = input(16, 8);
        let y1 = m[0].1.forward(&x).expect("train");
        let y2 = m[0].1.forward(&x).expect("train");
        assert!(!y1.equal(&y2), "dropout draws a new mask each call");
        a.set_training(false);
        let y3 = m[0].1.forward(&x).expect("eval");
        assert!(y3.equal(&m[0].1.forward(&x).expect("eval")));
    }

    #[test]
    fn bf16_adapter_on_a_4bit_base_computes_in_bf16_and_returns_the_base_dtype() {
        let w = Tensor::arange(64 * 64, (Kind::Float, Device::Cpu)).view([64, 64]).f_sin().expect("w");
        let base =
            quant::linear::Linear4bit::quantize(&w, None, Default::default(), Kind::Float).expect("4bit");
        let mut one: Vec<(String, Box<dyn Linear>)> =
            vec![("model.layers.0.mlp.up_proj".into(), Box::new(base))];
        let mut cfg = LoraConfig::new(8, 16.0, TargetModules::AllLinear);
        cfg.dtype = Kind::BFloat16;
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut one), &cfg, 9).expect("inject");
        assert_eq!(a.modules()[0].lora_a().kind(), Kind::BFloat16);
        let x = input(4, 64);
        let y = one[0].1.forward(&x).expect("forward");
        assert_eq!(y.kind(), Kind::Float);
        y.sum(Kind::Float).backward();
        assert_eq!(a.modules()[0].lora_b().grad().kind(), Kind::BFloat16);
    }

    /// A base that cannot run (like `sft merge`'s shape-only stand-ins).
    struct Blind;

    impl Linear for Blind {
        fn forward(&self, _: &Tensor) -> Result<Tensor, quant::Error> {
            Err(quant::Error::Torch("cannot run".into()))
        }
        fn in_features(&self) -> i64 {
            8
        }
        fn out_features(&self) -> i64 {
            8
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
    }

    #[test]
    fn errors_leave_the_model_unchanged() {
        let mut m = model();
        let err =
            inject(offer(&mut m), &LoraConfig::new(4, 8.0, list(&["o_proj"])), 0).expect_err("no o_proj");
        assert!(err.to_string().contains("entry `o_proj` matches none of the 6 linear layers"), "{err}");
        // DoRA runs the base to measure it; a base that cannot run is named.
        m.push(("model.layers.2.self_attn.q_proj".into(), Box::new(Blind)));
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.use_dora = true;
        let err = inject(offer(&mut m), &cfg, 0).expect_err("blind base").to_string();
        assert_eq!(
            err,
            "module `model.layers.2.self_attn.q_proj`: DoRA could not run the base layer: libtorch: cannot run"
        );
        // The model still computes with its plain layers.
        let x = input(1, 8);
        assert!(m[0].1.forward(&x).expect("plain").equal(&dense(8, 8, 1).forward(&x).expect("base")));
    }

    /// `W + scaling * B A` and its row norms, computed directly.
    fn dora_reference(w: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
        let full = w + b.matmul(a) * scaling;
        full.square().sum_dim_intlist(1, false, Kind::Float).sqrt()
    }

    #[test]
    fn dora_starts_as_lora_and_follows_peft_formula() {
        for (bias, dropout) in [(true, 0.0), (false, 0.0), (true, 0.3)] {
            let w =
                Tensor::arange(8 * 12, (Kind::Float, Device::Cpu)).view([8, 12]).f_sin().expect("w") * 0.5;
            let bvec = bias.then(|| Tensor::arange(8, (Kind::Float, Device::Cpu)) * 0.1 - 0.3);
            let base: Box<dyn Linear> =
                Box::new(Dense::new(w.copy(), bvec.as_ref().map(Tensor::copy)).expect("d"));
            let mut one = vec![("model.layers.0.mlp.down_proj".to_owned(), base)];
            let mut cfg = LoraConfig::new(4, 6.0, TargetModules::AllLinear);
            cfg.init = LoraInit::False;
            cfg.use_dora = true;
            cfg.dropout = dropout;
            let a = inject(offer(&mut one), &cfg, 11).expect("inject");
            let _rng = global_rng();
            let md = &a.modules()[0];
            let (la, lb, mag) = (md.lora_a(), md.lora_b(), md.magnitude().expect("dora"));
            let s = cfg.scaling();
            // PEFT's init: the magnitude is the norm of W + s B A, so the layer starts as plain LoRA.
            let n = dora_reference(&w, la, lb, s);
            assert!(max_rel(mag, &n) < 1e-6, "magnitude at init");
            let x = input(5, 12);
            let plain = |x: &Tensor| {
                let y = x.matmul(&w.tr());
                match &bvec {
                    Some(b) => y + b,
                    None => y,
                }
            };
            a.set_training(false);
            let lora = plain(&x) + x.matmul(&la.tr()).matmul(&lb.tr()) * s;
            assert!(max_rel(&one[0].1.forward(&x).expect("dora"), &lora) < 1e-6, "starts as LoRA");
            // Another magnitude: base + (m/n - 1) * W x + (m/n) * s * B A x.
            tch::no_grad(|| {
                let mut m2 = mag.shallow_clone();
                m2.copy_(&(mag * (Tensor::arange(8, (Kind::Float, Device::Cpu)) * 0.1 + 0.7)));
            });
            let ratio = (mag / &n).view([1, -1]);
            let expect = |x: &Tensor, xd: &Tensor| {
                plain(x)
                    + (&ratio - 1.0) * xd.matmul(&w.tr())
                    + &ratio * xd.matmul(&la.tr()).matmul(&lb.tr()) * s
            };
            let got = one[0].1.forward(&x).expect("eval");
            assert!(max_rel(&got, &expect(&x, &x)) < 1e-6, "eval, bias {bias}");
            a.set_training(true);
            tch::manual_seed(5);
            let got = one[0].1.forward(&x).expect("train");
            tch::manual_seed(5);
            let xd = if dropout > 0.0 { x.dropout(dropout, true) } else { x.shallow_clone() };
            assert!(max_rel(&got, &expect(&x, &xd)) < 1e-6, "train, bias {bias}, dropout {dropout}");
            // The norm is detached: the magnitude's gradient is (base(x) - b + s B A x) / n, summed.
            got.sum(Kind::Float).backward();
            let per_row = (xd.matmul(&w.tr()) + xd.matmul(&la.tr()).matmul(&lb.tr()) * s).sum_dim_intlist(
                0,
                false,
                Kind::Float,
            ) / &n;
            assert!(max_rel(&mag.grad(), &per_row) < 1e-5, "magnitude grad");
            assert!(la.grad().defined() && lb.grad().defined());
        }
    }

    #[test]
    fn dora_measures_a_4bit_base_as_its_dequantized_weight() {
        let w = Tensor::arange(24 * 128, (Kind::Float, Device::Cpu)).view([24, 128]).f_cos().expect("w");
        let bias = Tensor::arange(24, (Kind::Float, Device::Cpu)) * 0.05;
        let q = quant::linear::Linear4bit::quantize(&w, Some(bias.copy()), Default::default(), Kind::Float)
            .expect("4bit");
        let deq = q.weight().dequantize(Kind::Float).expect("dequantize");
        let mut one: Vec<(String, Box<dyn Linear>)> =
            vec![("model.layers.0.mlp.up_proj".into(), Box::new(q))];
        let mut cfg = LoraConfig::new(3, 5.0, TargetModules::AllLinear);
        cfg.init = LoraInit::False;
        cfg.use_dora = true;
        let a = inject(offer(&mut one), &cfg, 2).expect("inject");
        let md = &a.modules()[0];
        let n = dora_reference(&deq, md.lora_a(), md.lora_b(), cfg.scaling());
        assert!(max_rel(md.magnitude().expect("dora"), &n) < 1e-6);
    }

    /// A toy model's embedding and head as named tensor slots, tied or not.
    fn head_and_embedding(tied: bool) -> Vec<(String, Tensor)> {
        let e = Tensor::arange(6 * 4, (Kind::Float, Device::Cpu)).view([6, 4]) * 0.01;
        let head = if tied { e.shallow_clone() } else { e.copy() + 1.0 };
        vec![("model.embed_tokens.weight".into(), e), ("lm_head.weight".into(), head)]
    }

    fn offer_tensors(t: &mut [(String, Tensor)]) -> Vec<(String, &mut Tensor)> {
        t.iter_mut().map(|(n, t)| (n.clone(), t)).collect()
    }

    #[test]
    fn without_adapters_runs_the_base_and_puts_everything_back() {
        let mut m = model();
        let mut t = head_and_embedding(false);
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        cfg.modules_to_save = vec!["lm_head".into()];
        let base_out = m[0].1.forward(&input(3, 8)).expect("base");
        let a = inject_with_modules(offer(&mut m), offer_tensors(&mut t), &cfg, 2).expect("inject");
        a.set_training(false);
        let x = input(3, 8);
        let adapted = m[0].1.forward(&x).expect("adapted");
        assert!(!adapted.equal(&base_out), "a non-zero B changes the output");
        // Train the head copy away from the original.
        tch::no_grad(|| {
            let _ = t[1].1.shallow_clone().f_add_scalar_(0.25);
        });
        let trained_head = t[1].1.detach_copy();
        let (off, head_inside) = a
            .without_adapters(|| (m[0].1.forward(&x).expect("off"), t[1].1.detach_copy()))
            .expect("switched off");
        assert!(off.equal(&base_out), "the base layer alone");
        assert!(head_inside.equal(a.saved()[0].original()), "the frozen original's values");
        assert!(a.enabled());
        assert!(m[0].1.forward(&x).expect("on again").equal(&adapted));
        assert!(t[1].1.equal(&trained_head) && t[1].1.requires_grad(), "the trained copy is back");
        // A panic inside still puts the adapters back.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = a.without_adapters(|| panic!("inside"));
        }));
        assert!(caught.is_err() && a.enabled());
        assert!(t[1].1.equal(&trained_head));
    }

    #[test]
    fn with_values_runs_other_adapter_values_and_puts_the_trained_ones_back() {
        let mut m = model();
        let mut t = head_and_embedding(false);
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        let a = inject_with_modules(offer(&mut m), offer_tensors(&mut t), &cfg, 2).expect("inject");
        a.set_training(false);
        let x = input(3, 8);
        let initial = a.snapshot().expect("snapshot");
        let at_start = m[0].1.forward(&x).expect("start");
        // Train away from the start.
        tch::no_grad(|| {
            for p in a.parameters() {
                let _ = p.shallow_clone().f_add_scalar_(0.1);
            }
        });
        let trained = m[0].1.forward(&x).expect("trained");
        assert!(!trained.equal(&at_start));
        let inside = a.with_values(&initial, || m[0].1.forward(&x).expect("inside")).expect("swapped");
        assert!(inside.equal(&at_start), "the initial adapter's output");
        assert!(m[0].1.forward(&x).expect("after").equal(&trained), "the trained values are back");
        assert!(a.parameters().iter().all(Tensor::requires_grad));
        assert!(a.with_values(&initial[1..], || ()).is_err(), "one value per parameter");
    }

    /// TRL's QLoRA DPO reference: f32 values beside bf16 adapters are swapped in as they are, so
    /// the layer computes in f32 inside (as PEFT's f32 "ref" adapter does), and the bf16 trained
    /// tensors, values and dtype, come back after.
    #[test]
    fn with_values_of_another_dtype_compute_in_that_dtype() {
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj"]));
        cfg.init = LoraInit::False;
        cfg.dtype = Kind::BFloat16;
        let a = inject(offer(&mut m), &cfg, 2).expect("inject");
        a.set_training(false);
        let x = input(3, 8);
        let f32_values: Vec<Tensor> =
            a.parameters().iter().map(|p| (p.to_kind(Kind::Float) * 1.001).detach()).collect();
        let trained: Vec<Tensor> = a.parameters().iter().map(Tensor::copy).collect();
        let before = m[0].1.forward(&x).expect("bf16");
        let inside = a
            .with_values(&f32_values, || {
                assert!(a.parameters().iter().all(|p| p.kind() == Kind::Float), "swapped in as f32");
                m[0].1.forward(&x).expect("inside")
            })
            .expect("swapped");
        // The f32 update by hand: base(x) + B(A(x)) * scaling, all in f32.
        let (la, lb) = (&f32_values[0], &f32_values[1]);
        let base = model();
        let want = base[0].1.forward(&x).expect("base") + x.matmul(&la.tr()).matmul(&lb.tr()) * cfg.scaling();
        assert!((&inside - &want).abs().max().double_value(&[]) < 1e-6, "computed in f32");
        for (p, t) in a.parameters().iter().zip(&trained) {
            assert!(p.kind() == Kind::BFloat16 && p.equal(t) && p.requires_grad(), "bf16 values back");
        }
        assert!(m[0].1.forward(&x).expect("after").equal(&before));
    }

    #[test]
    fn modules_to_save_get_trainable_copies_and_round_trip() {
        let dir = temp("mts");
        let mut m = model();
        let mut t = head_and_embedding(true);
        let mut cfg = LoraConfig::new(2, 4.0, list(&["q_proj"]));
        cfg.modules_to_save = vec!["lm_head".into()];
        let err = inject(offer(&mut m), &cfg, 1).expect_err("no tensors offered").to_string();
        assert_eq!(
            err,
            "modules_to_save entry `lm_head` matches none of the modules offered for full training: (none)"
        );
        let a = inject_with_modules(offer(&mut m), offer_tensors(&mut t), &cfg, 1).expect("inject");
        assert_eq!(a.saved().len(), 1);
        let s = &a.saved()[0];
        assert_eq!((s.name(), s.key().as_str()), ("lm_head.weight", "base_model.model.lm_head.weight"));
        // The head slot holds the trainable copy; the tied embedding keeps the frozen original.
        assert!(t[1].1.requires_grad() && !t[0].1.requires_grad() && !s.original().requires_grad());
        assert_ne!(t[1].1.data_ptr(), t[0].1.data_ptr());
        assert_eq!(t[1].1.data_ptr(), s.trainable().data_ptr());
        assert_eq!(s.original().data_ptr(), t[0].1.data_ptr());
        assert!(t[1].1.equal(&t[0].1));
        // PEFT counts the copy as trainable and beside the original: 2 * 2 * (8 + 8) + 24.
        assert_eq!(a.num_trainable(), 64 + 24);
        assert_eq!(a.parameters().len(), 5);
        tch::no_grad(|| {
            let mut h = t[1].1.shallow_clone();
            let _ = h.f_add_scalar_(0.5);
        });
        a.save(&dir).expect("save");
        let keys: Vec<String> =
            quant::file::read(&dir.join(WEIGHTS_FILE)).expect("read").0.into_iter().map(|t| t.name).collect();
        assert!(keys.contains(&"base_model.model.lm_head.weight".to_owned()) && keys.len() == 5, "{keys:?}");
        // Back in, through a fresh untied model.
        let mut m2 = model();
        let mut t2 = head_and_embedding(false);
        let b = inject_from_with_modules(offer(&mut m2), offer_tensors(&mut t2), &dir).expect("load");
        assert!(t2[1].1.equal(&t[1].1), "the saved head is the model's head");
        assert!(b.saved()[0].original().equal(&(t2[0].1.copy() + 1.0)), "the original is kept");
        // Without the tensors offered, or with another shape, loading is refused.
        let mut m3 = model();
        assert!(inject_from(offer(&mut m3), &dir).is_err());
        let mut t3 = vec![("lm_head.weight".to_owned(), Tensor::zeros([5, 4], (Kind::Float, Device::Cpu)))];
        let err = inject_from_with_modules(offer(&mut m3), offer_tensors(&mut t3), &dir).expect_err("shape");
        assert!(
            err.to_string()
                .ends_with("shape [6, 4], expected [5, 4], the shape of the model's `lm_head.weight`"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dora_adapters_save_and_load_their_magnitude() {
        let dir = temp("dora-rt");
        let mut m = model();
        let mut cfg = LoraConfig::new(2, 4.0, list(&["v_proj", "down_proj"]));
        cfg.init = LoraInit::False;
        cfg.use_dora = true;
        let a = inject(offer(&mut m), &cfg, 3).expect("inject");
        assert_eq!(a.num_trainable(), 2 * (2 * (8 + 4) + 4 + 2 * (12 + 8) + 8));
        a.save(&dir).expect("save");
        let (raw, _) = quant::file::read(&dir.join(WEIGHTS_FILE)).expect("read");
        let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector";
        assert_eq!(raw.iter().find(|t| t.name == key).expect("magnitude key").shape, [4]);
        let mut m2 = model();
        let b = inject_from(offer(&mut m2), &dir).expect("load");
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.equal(&y));
        }
        let x = input(3, 12);
        a.set_training(false);
        assert!(m[2].1.forward(&x).expect("a").allclose(&m2[2].1.forward(&x).expect("b"), 1e-6, 1e-6, false));
        // A plain LoRA adapter does not load DoRA tensors, and the other way round.
        let mut plain = cfg.clone();
        plain.use_dora = false;
        let mut m3 = model();
        let mut c = inject(offer(&mut m3), &plain, 3).expect("inject");
        let err = c.load_into(&dir).expect_err("dora file").to_string();
        assert!(err.ends_with("use_dora is true, but these adapters have false"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn report_matches_peft_format() {
        let mut m = model();
        let a =
            inject(offer(&mut m), &LoraConfig::new(8, 16.0, TargetModules::AllLinear), 0).expect("inject");
        // q: 8*(8+8), v: 8*(8+4), down: 8*(12+8), twice.
        assert_eq!(a.num_trainable(), 2 * (128 + 96 + 160));
        assert_eq!(
            a.trainable_report(1_234_000),
            "trainable params: 768 || all params: 1,234,768 || trainable%: 0.0622"
        );
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(7_241_732_096), "7,241,732,096");
    }

    #[test]
    fn save_then_load_restores_the_tensors_and_is_deterministic() {
        let dir = temp("rt");
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, TargetModules::AllLinear);
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 5).expect("inject");
        a.save(&dir).expect("save");
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).expect("read");
        a.save(&dir).expect("save again");
        assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).expect("read"), bytes);
        let written = LoraConfig::read(&dir).expect("config");
        let mut names: Vec<String> = m.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        assert_eq!(written.target_modules, TargetModules::List(names));
        let mut m2 = model();
        let b = inject_from(offer(&mut m2), &dir).expect("load");
        assert!(!b.is_training());
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.equal(&y));
        }
        let x = input(2, 12);
        assert!(m[2].1.forward(&x).expect("a").equal(&m2[2].1.forward(&x).expect("b")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Rewrite the adapter file of `dir` through `edit` on its tensors.
    fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<RawTensor>)) {
        let path = dir.join(WEIGHTS_FILE);
        let (mut t, meta) = quant::file::read(&path).expect("read");
        edit(&mut t);
        quant::file::write(&path, &t, &meta).expect("write");
    }

    fn saved(tag: &str) -> (PathBuf, Adapters) {
        let dir = temp(tag);
        let mut m = model();
        let mut cfg = LoraConfig::new(4, 8.0, list(&["q_proj", "v_proj"]));
        cfg.init = LoraInit::False;
        let a = inject(offer(&mut m), &cfg, 5).expect("inject");
        a.save(&dir).expect("save");
        (dir, a)
    }

    fn load_err(dir: &Path) -> String {
        let mut m = model();
        inject_from(offer(&mut m), dir).expect_err("must fail").to_string()
    }

    #[test]
    fn keys_with_the_default_adapter_name_load() {
        let (dir, a) = saved("default");
        edit_weights(&dir, |t| {
            for x in t.iter_mut() {
                x.name = x.name.replace(".weight", ".default.weight");
            }
        });
        let mut m = model();
        let b = inject_from(offer(&mut m), &dir).expect("load");
        for (x, y) in a.parameters().iter().zip(b.parameters()) {
            assert!(x.equal(&y));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_missing_and_misshapen_tensors_are_named() {
        let (dir, _) = saved("bad");
        let file = dir.join(WEIGHTS_FILE).display().to_string();
        let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";

        edit_weights(&dir, |t| {
            let mut extra = t[0].clone();
            extra.name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight".into();
            t.push(extra);
        });
        let err = load_err(&dir);
        assert_eq!(
            err,
            format!(
                "{file}: unexpected tensor `base_model.model.model.layers.0.mlp.down_proj.lora_A.weight` (its module is not among the targeted linears)"
            )
        );

        edit_weights(&dir, |t| t.retain(|x| !x.name.contains("down_proj") && x.name != key));
        assert_eq!(load_err(&dir), format!("{file}: missing tensor `{key}`"));

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            let x = t.iter_mut().find(|x| x.name == key).expect("key");
            x.shape = vec![2, 8];
        });
        assert_eq!(
            load_err(&dir),
            format!("{file}: tensor `{key}`: shape [2, 8], expected [out_features, r] = [4, 4]")
        );

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            t.push(RawTensor {
                name: "lm_head.weight".into(),
                dtype: "F32".into(),
                shape: vec![1],
                data: vec![0; 4],
            })
        });
        assert!(
            load_err(&dir)
                .contains("unexpected tensor `lm_head.weight` (PEFT's keys start with `base_model.model.`)")
        );

        let (dir, _) = saved("bad");
        edit_weights(&dir, |t| {
            let x = t.iter_mut().find(|x| x.name == key).expect("key");
            x.dtype = "I32".into();
        });
        assert!(load_err(&dir).contains("dtype I32 (expected F32, F16 or BF16)"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_into_checks_the_config_and_changes_nothing_on_error() {
        let (dir, a) = saved("into");
        let mut m = model();
        let mut cfg = a.config().clone();
        cfg.alpha = 16.0;
        let mut b = inject(offer(&mut m), &cfg, 77).expect("inject");
        let before: Vec<Tensor> = b.parameters().iter().map(|p| p.copy()).collect();
        let err = b.load_into(&dir).expect_err("alpha differs").to_string();
        assert!(err.ends_with("adapter_config.json: lora_alpha is 8, but these adapters have 16"), "{err}");
        assert!(before.iter().zip(b.parameters()).all(|(x, y)| x.equal(&y)));
        let mut m = model();
        let mut b = inject(offer(&mut m), a.config(), 77).expect("inject");
        b.load_into(&dir).expect("load");
        assert!(a.parameters().iter().zip(b.parameters()).all(|(x, y)| x.equal(&y)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
