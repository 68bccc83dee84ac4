//! The causal language model: built from a checkpoint tensor by tensor (each decoder linear
//! quantized to 4 or 8 bits as it is read, or taken pre-quantized), run as transformers runs it.
//!
//! The forward pass is exposed in steps ([`CausalLm::embed`], [`CausalLm::context`],
//! [`CausalLm::layer`], [`CausalLm::head`]) so a training loop can recompute one layer at a time
//! (gradient checkpointing) without this crate knowing about training.

mod blocks;
mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod placement;
mod qwen2;
mod qwen3;

use std::path::Path;

use quant::linear::{Dense, Int8Options, Linear, Linear4bit, Linear8bit};
use quant::ops::{QuantizeOptions, Quantized4bit, Quantized8bit};
use tch::{Device, Kind, Tensor};

pub use blocks::LayerContext;
pub use blocks::ParamLora;
use blocks::{
    Attention, DecoderLayer, DeviceContext, ExpertLora, Experts, FeedForward, GateUp, KvCache, Mlp, Qkv,
    RmsNorm, Rope, ScoreOptions,
};
pub use placement::{LayerPlacement, Placement};

use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::hf_config::{Architecture, HfConfig, MoeConfig, Prequantized, RopeScaling};

/// A parameter LoRA can adapt in place of a module (see [`CausalLm::param_slots`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSlotInfo {
    /// The module holding it, by transformers 5's name.
    pub module: String,
    /// Its name in the module.
    pub param: String,
    /// Experts in the bank (`None` for a 2-D weight).
    pub experts: Option<i64>,
    /// Input features of one matrix.
    pub in_features: i64,
    /// Output features of one matrix.
    pub out_features: i64,
    /// Where it computes.
    pub device: Device,
}

/// [`CausalLm::param_slots`] from config.json alone (devices: the CPU), for callers that do not
/// load the model (merging an adapter file).
pub fn param_slots_of(cfg: &HfConfig) -> Vec<ParamSlotInfo> {
    let Some(moe) = &cfg.moe else { return Vec::new() };
    let s = &cfg.shape;
    let (h, n, inter) = (s.hidden as i64, moe.experts as i64, moe.expert_intermediate as i64);
    let mut out = Vec::new();
    for l in 0..s.layers {
        let slot = |module: &str, param: &str, experts, in_features, out_features| ParamSlotInfo {
            module: format!("model.layers.{l}.mlp.{module}"),
            param: param.to_owned(),
            experts,
            in_features,
            out_features,
            device: Device::Cpu,
        };
        out.push(slot("gate", "weight", None, h, n));
        out.push(slot("experts", "gate_up_proj", Some(n), h, 2 * inter));
        out.push(slot("experts", "down_proj", Some(n), inter, h));
    }
    out
}

/// The layer index in `model.layers.N....`.
fn layer_of(module: &str) -> Option<usize> {
    module.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// What distinguishes a family's decoder from the shared Llama one.
pub(crate) struct DecoderSpec {
    qk_norm: bool,
    /// Every layer's attention window (Mistral).
    sliding_window: Option<u64>,
    rope_scaling: RopeScaling,
    /// Norms multiply by `1 + weight` in f32 (Gemma).
    norm_offset: bool,
    /// GeGLU instead of SwiGLU.
    gelu: bool,
    /// Norms after each sub-block too (Gemma's four per layer).
    feedforward_norms: bool,
    /// Embeddings times `sqrt(hidden_size)`, rounded to their dtype.
    embed_scale: bool,
    scores: ScoreOptions,
    /// Soft-capping of the output logits.
    final_softcap: Option<f64>,
    /// Sliding-window layers among global ones.
    alternating: Option<Alternating>,
}

impl DecoderSpec {
    /// The shared decoder as Llama runs it, with config.json's RoPE scaling.
    fn llama(cfg: &HfConfig) -> Self {
        DecoderSpec {
            qk_norm: false,
            sliding_window: None,
            rope_scaling: cfg.rope_scaling.clone(),
            norm_offset: false,
            gelu: false,
            feedforward_norms: false,
            embed_scale: false,
            scores: ScoreOptions::default(),
            final_softcap: None,
            alternating: None,
        }
    }
}

/// Layers that attend within a window among global ones (Gemma's `layer_types`).
pub(crate) struct Alternating {
    window: u64,
    /// Per layer, whether it is a sliding one.
    layers: Vec<bool>,
    /// The sliding layers' RoPE base and scaling, when not the global one.
    rope: Option<(f64, RopeScaling)>,
}

/// How to materialise a checkpoint: dtypes, 4- or 8-bit quantization, devices.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// dtype of every unquantized tensor (embeddings, norms, biases, head) and of dense linears.
    pub dtype: Kind,
    /// Quantize decoder linears to 4 bits while loading (`load_in_4bit`); ignored for a
    /// checkpoint that is already quantized.
    pub quantize: Option<QuantizeOptions>,
    /// Quantize decoder linears to 8 bits while loading (`load_in_8bit`, LLM.int8); exclusive
    /// with `quantize`. For a checkpoint already in 8 bits, its config.json's threshold is kept
    /// and only `matmul` is taken from here.
    pub quantize_8bit: Option<Int8Options>,
    /// dtype the 4-bit linears compute in (`bnb_4bit_compute_dtype`); 8-bit linears compute in
    /// their input's dtype, as bitsandbytes' do.
    pub compute_dtype: Kind,
    /// Where the model lives (when `placement` is not set).
    pub device: Device,
    /// Where each module lives and computes (a device map applied); `None`: all on `device`.
    pub placement: Option<Placement>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: Kind::Float,
            quantize: None,
            quantize_8bit: None,
            compute_dtype: Kind::Float,
            device: Device::Cpu,
            placement: None,
        }
    }
}

/// How [`CausalLm::generate`] picks tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = all).
    pub top_p: f64,
    /// Seeds torch's generator for sampling.
    pub seed: u64,
    /// Tokens that end generation (returned as the last token).
    pub stop_ids: Vec<i64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { max_new_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids: Vec::new() }
    }
}

/// What [`CausalLm::generate`] gives back.
#[derive(Debug)]
pub struct Generation {
    /// The new tokens.
    pub tokens: Vec<i64>,
    /// The prompt's logits `[T, vocab]`, f32 (for parity checks).
    pub prompt_logits: Tensor,
}

/// A generation's own random stream (SplitMix64 seeded by `Sampling::seed`): torch's global
/// generator is shared by the whole process, so another thread drawing from it (dropout, other
/// generations) would change a seeded sample.
struct SampleRng(u64);

impl SampleRng {
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Pick the next token from `logits [vocab]` (f32).
fn sample(logits: &Tensor, s: &Sampling, rng: &mut SampleRng) -> Result<i64, Error> {
    if s.temperature <= 0.0 {
        return Ok(logits.f_argmax(-1, false)?.f_int64_value(&[])?);
    }
    let probs = logits.f_div_scalar(s.temperature)?.f_softmax(-1, Kind::Float)?;
    let probs = if s.top_p < 1.0 {
        // Keep the most probable tokens up to mass top_p (at least one), as transformers' TopP.
        let (sorted, idx) = probs.f_sort(-1, true)?;
        let cum = sorted.f_cumsum(-1, Kind::Float)?;
        let before = cum.f_sub(&sorted)?;
        let keep = before.f_lt(s.top_p)?;
        let kept = sorted.f_mul(&keep.f_to_kind(Kind::Float)?)?;
        probs.f_zeros_like()?.f_scatter(-1, &idx, &kept)?
    } else {
        probs
    };
    // Inverse CDF over the (unnormalised) kept probabilities.
    let probs = Vec::<f32>::try_from(&probs.f_to_device(tch::Device::Cpu)?)?;
    let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    let u = rng.next_f64() * total;
    let mut cum = 0.0f64;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += f64::from(p);
            last = i;
            if cum > u {
                return Ok(i as i64);
            }
        }
    }
    Ok(last as i64)
}

/// A decoder-only language model of one of the supported families.
pub struct CausalLm {
    config: HfConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Dense,
    rope: Rope,
    sliding_window: Option<u64>,
    /// The sliding layers' window and, when they have their own, RoPE (Gemma).
    alternating: Option<(u64, Option<Rope>)>,
    /// `sqrt(hidden_size)` as f32, multiplied into embeddings in their dtype (Gemma).
    embed_scale: Option<f32>,
    final_softcap: Option<f64>,
    dtype: Kind,
    placement: Placement,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("architecture", &self.config.architecture)
            .field("layers", &self.layers.len())
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// A linear offered to adapters: its transformers module name and its slot.
pub type LinearSlot<'a> = (String, &'a mut Box<dyn Linear>);
/// A tensor offered to adapters: its transformers parameter name and its slot.
pub type TensorSlot<'a> = (String, &'a mut Tensor);

/// The decoder linears of `layers` by transformers module name.
fn decoder_linears(layers: &mut [DecoderLayer]) -> Vec<LinearSlot<'_>> {
    let mut out = Vec::with_capacity(layers.len() * 7);
    for (l, layer) in layers.iter_mut().enumerate() {
        for (name, lin) in layer.linears_mut() {
            out.push((format!("model.layers.{l}.{name}"), lin));
        }
    }
    out
}

/// The mask of `n` new queries after `past` cached positions: every cached key, causal among the
/// new ones, within `window`; `None` where that is plain causal attention (or everything).
fn cached_mask(past: i64, n: i64, window: Option<u64>, device: Device) -> Result<Option<Tensor>, Error> {
    match window.filter(|&w| (w as i64) < past + n) {
        None if past == 0 || n == 1 => Ok(None),
        window => {
            let q = Tensor::f_arange_start(past, past + n, (Kind::Int64, device))?.f_unsqueeze(1)?;
            let k = Tensor::f_arange(past + n, (Kind::Int64, device))?.f_unsqueeze(0)?;
            let mut allowed = k.f_le_tensor(&q)?;
            if let Some(w) = window {
                allowed = allowed.f_logical_and(&q.f_sub(&k)?.f_lt(w as i64)?)?;
            }
            Ok(Some(allowed.f_view([1, 1, n, past + n])?))
        }
    }
}

/// Return free heap memory to the OS (glibc's `malloc_trim`, which also releases free pages in
/// the middle of the heap); elsewhere a no-op.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns unused heap pages to the kernel.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Reads tensors out of a checkpoint into libtorch, naming the tensor in every error.
struct Reader<'a> {
    ck: &'a Checkpoint,
    opts: &'a LoadOptions,
    prequantized: Option<Prequantized>,
    /// A 4-bit checkpoint's own settings, for its float linears.
    bnb_4bit: Option<QuantizeOptions>,
}

impl Reader<'_> {
    /// A float tensor copied out of the checkpoint, whose mapped pages are then released.
    fn read(&self, name: &str) -> Result<Tensor, Error> {
        let t = self.ck.tensor(name)?.to_tensor()?;
        self.ck.release(name);
        Ok(t)
    }

    fn dense(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor, Error> {
        Ok(self.read(name)?.f_to_kind(kind)?.f_to_device(device)?)
    }

    fn norm(&self, name: &str, eps: f64, offset: bool, device: Device) -> Result<RmsNorm, Error> {
        Ok(RmsNorm { weight: self.dense(name, self.opts.dtype, device)?, eps, offset })
    }

    /// A decoder linear: pre-quantized, quantized now, or dense; stored and computing where
    /// `place` says (only 4-bit weights can be stored away from where they compute).
    fn linear(&self, prefix: &str, bias: bool, place: LayerPlacement) -> Result<Box<dyn Linear>, Error> {
        let quant_err = |source| Error::Quant { name: format!("{prefix}.weight"), source };
        let bias = if bias {
            Some(self.dense(&format!("{prefix}.bias"), self.opts.dtype, place.compute)?)
        } else {
            None
        };
        let name = format!("{prefix}.weight");
        let four_bit = |q: Result<Quantized4bit, quant::Error>| -> Result<Box<dyn Linear>, Error> {
            let q = q.and_then(|q| {
                if place.weights == Device::Cpu && place.compute.is_cuda() {
                    // Offloaded: page-locked host memory, so each copy to the GPU is async.
                    q.pin_memory(place.compute)
                } else {
                    q.to_device(place.weights)
                }
            });
            let bias = bias.as_ref().map(Tensor::shallow_clone);
            let layer =
                Linear4bit::new(q.map_err(quant_err)?, bias, self.opts.compute_dtype).map_err(quant_err)?;
            Ok(Box::new(layer.with_exec_device(place.compute).map_err(quant_err)?))
        };
        let is_4bit = self.prequantized == Some(Prequantized::FourBit)
            || (self.prequantized.is_none() && self.opts.quantize.is_some());
        if !is_4bit && place.weights != place.compute {
            return Err(Error::BadOption(format!(
                "{prefix}: only 4-bit layers can be stored on {:?} and computed on {:?} (CPU offload streams \
                 4-bit codes); place this layer's weights where it computes",
                place.weights, place.compute
            )));
        }
        let device = place.weights;
        match self.prequantized {
            // A float weight among a 4-bit checkpoint's linears: a mixture's expert, which
            // transformers + bitsandbytes keep in full precision; quantized now as the rest was.
            Some(Prequantized::FourBit) if self.ck.tensor(&name)?.kind().is_some() => {
                let q = self.bnb_4bit.unwrap_or_default();
                let w = self.read(&name)?.f_to_kind(self.opts.dtype)?;
                return four_bit(Quantized4bit::quantize(&w, q));
            }
            Some(Prequantized::FourBit) => return four_bit(Ok(self.ck.quantized_weight(prefix)?)),
            // A float weight in an 8-bit checkpoint is a module bitsandbytes skipped
            // (`llm_int8_skip_modules`): it stays dense.
            Some(Prequantized::EightBit { threshold }) if self.ck.tensor(&name)?.kind().is_none() => {
                let q = to_device_8bit(self.ck.int8_weight(prefix)?, device)?;
                let matmul = self.opts.quantize_8bit.unwrap_or_default().matmul;
                let layer = Linear8bit::new(q, bias, Int8Options { threshold, matmul }).map_err(quant_err)?;
                return Ok(Box::new(layer));
            }
            Some(Prequantized::EightBit { .. }) => {
                return Ok(Box::new(
                    Dense::new(self.dense(&name, self.opts.dtype, device)?, bias).map_err(quant_err)?,
                ));
            }
            None => {}
        }
        match (self.opts.quantize, self.opts.quantize_8bit) {
            (Some(q), _) => {
                // Quantize on the CPU from the load dtype, as transformers does after casting.
                // The codes and scales then move to the layer's device (a no-op on the CPU).
                let w = self.read(&name)?.f_to_kind(self.opts.dtype)?;
                four_bit(Quantized4bit::quantize(&w, q))
            }
            (None, Some(o)) => {
                // From the load dtype, through float16, as bitsandbytes' Int8Params does.
                let w = self.read(&name)?.f_to_kind(self.opts.dtype)?;
                let q = to_device_8bit(Quantized8bit::quantize(&w).map_err(quant_err)?, device)?;
                Ok(Box::new(Linear8bit::new(q, bias, o).map_err(quant_err)?))
            }
            (None, None) => Ok(Box::new(
                Dense::new(self.dense(&name, self.opts.dtype, device)?, bias).map_err(quant_err)?,
            )),
        }
    }
}

impl Reader<'_> {
    /// Layer `p`'s mixture of experts: its router (dense, in the load dtype) and each expert's
    /// gate/up/down linears under the checkpoint's per-expert names, each 4-bit like any
    /// other decoder linear.
    fn experts(&self, p: &str, moe: &MoeConfig, place: LayerPlacement) -> Result<Experts, Error> {
        let block = format!("{p}.{}", moe.names.block);
        let router = self.dense(&format!("{block}.gate.weight"), self.opts.dtype, place.compute)?;
        let router = Dense::new(router, None)
            .map_err(|source| Error::Quant { name: format!("{block}.gate.weight"), source })?;
        let [gate, up, down] = moe.names.linears;
        let experts = (0..moe.experts)
            .map(|e| {
                let x = format!("{block}.experts.{e}");
                Ok(Mlp {
                    gate_up: GateUp::Separate {
                        gate_proj: self.linear(&format!("{x}.{gate}"), false, place)?,
                        up_proj: self.linear(&format!("{x}.{up}"), false, place)?,
                    },
                    down_proj: self.linear(&format!("{x}.{down}"), false, place)?,
                    gelu: false,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Experts {
            router,
            lora: ExpertLora::default(),
            experts,
            top_k: moe.top_k as i64,
            norm_topk_prob: moe.norm_topk_prob,
            weights_in_f32: moe.weights_in_f32,
        })
    }
}

/// An int8 weight on `device` (its ops run on any device).
fn to_device_8bit(q: Quantized8bit, device: Device) -> Result<Quantized8bit, Error> {
    if device == Device::Cpu {
        return Ok(q);
    }
    Ok(Quantized8bit { codes: q.codes.f_to_device(device)?, scb: q.scb.f_to_device(device)? })
}

impl CausalLm {
    /// Load the model in `dir` (config.json + safetensors), calling `progress(done, total)` after
    /// each decoder layer so a caller can show progress.
    pub fn load(
        dir: &Path,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, Error> {
        let config = HfConfig::from_dir(dir)?;
        let ck = Checkpoint::open(dir)?;
        ck.check_against(&config)?;
        Self::from_checkpoint(config, &ck, opts, progress)
    }

    /// Build the model from an opened checkpoint whose tensors were checked against `config`.
    pub fn from_checkpoint(
        config: HfConfig,
        ck: &Checkpoint,
        opts: &LoadOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self, Error> {
        let spec = match config.architecture {
            Architecture::Llama => llama::spec(&config),
            Architecture::Mistral => mistral::spec(&config),
            Architecture::Qwen2 => qwen2::spec(&config),
            Architecture::Qwen3 | Architecture::Qwen3Moe => qwen3::spec(&config),
            Architecture::Mixtral => mistral::spec(&config),
            Architecture::Phi3 => phi3::spec(&config),
            Architecture::Gemma2 | Architecture::Gemma3 => {
                let Some(g) = config.gemma.as_ref() else {
                    return Err(Error::BadOption("a Gemma config without its Gemma options".into()));
                };
                if config.architecture == Architecture::Gemma2 {
                    gemma2::spec(&config, g)
                } else {
                    gemma3::spec(&config, g)
                }
            }
        };
        let offset = spec.norm_offset;
        if opts.quantize.is_some() && opts.quantize_8bit.is_some() {
            return Err(Error::BadOption(
                "4-bit (`quantize`) and 8-bit (`quantize_8bit`) quantization cannot both be set; pick one"
                    .into(),
            ));
        }
        let r = Reader { ck, opts, prequantized: config.quantization, bnb_4bit: config.bnb_4bit };
        let s = &config.shape;
        let eps = config.rms_norm_eps;
        let total = s.layers as usize;
        let placement = opts.placement.clone().unwrap_or_else(|| Placement::single(opts.device, total));
        if placement.layers.len() != total {
            return Err(Error::BadOption(format!(
                "the placement covers {} decoder layers, the model has {total}",
                placement.layers.len()
            )));
        }
        let embed_tokens = r.dense("model.embed_tokens.weight", opts.dtype, placement.embed)?;
        let mut layers = Vec::with_capacity(total);
        for (l, &place) in placement.layers.iter().enumerate() {
            let p = format!("model.layers.{l}");
            let head_norm = |which: &str| -> Result<Option<RmsNorm>, Error> {
                if spec.qk_norm {
                    Ok(Some(r.norm(&format!("{p}.self_attn.{which}.weight"), eps, offset, place.compute)?))
                } else {
                    Ok(None)
                }
            };
            let qkv = if s.fused_projections {
                Qkv::Fused { qkv_proj: r.linear(&format!("{p}.self_attn.qkv_proj"), config.qkv_bias, place)? }
            } else {
                Qkv::Separate {
                    q_proj: r.linear(&format!("{p}.self_attn.q_proj"), config.qkv_bias, place)?,
                    k_proj: r.linear(&format!("{p}.self_attn.k_proj"), config.qkv_bias, place)?,
                    v_proj: r.linear(&format!("{p}.self_attn.v_proj"), config.qkv_bias, place)?,
                }
            };
            let gate_up = if config.moe.is_some() {
                None
            } else if s.fused_projections {
                Some(GateUp::Fused {
                    gate_up_proj: r.linear(&format!("{p}.mlp.gate_up_proj"), config.mlp_bias, place)?,
                })
            } else {
                Some(GateUp::Separate {
                    gate_proj: r.linear(&format!("{p}.mlp.gate_proj"), config.mlp_bias, place)?,
                    up_proj: r.linear(&format!("{p}.mlp.up_proj"), config.mlp_bias, place)?,
                })
            };
            let self_attn = Attention {
                qkv,
                o_proj: r.linear(&format!("{p}.self_attn.o_proj"), config.o_bias, place)?,
                q_norm: head_norm("q_norm")?,
                k_norm: head_norm("k_norm")?,
                heads: s.heads as i64,
                kv_heads: s.kv_heads as i64,
                head_dim: s.head_dim as i64,
                scores: spec.scores,
            };
            let mlp = match (gate_up, &config.moe) {
                (Some(gate_up), _) => FeedForward::Mlp(Mlp {
                    gate_up,
                    down_proj: r.linear(&format!("{p}.mlp.down_proj"), config.mlp_bias, place)?,
                    gelu: spec.gelu,
                }),
                (None, Some(moe)) => FeedForward::Experts(r.experts(&p, moe, place)?),
                (None, None) => return Err(Error::BadOption("a dense layer without its MLP".into())),
            };
            let feedforward_norms = if spec.feedforward_norms {
                Some((
                    r.norm(&format!("{p}.pre_feedforward_layernorm.weight"), eps, offset, place.compute)?,
                    r.norm(&format!("{p}.post_feedforward_layernorm.weight"), eps, offset, place.compute)?,
                ))
            } else {
                None
            };
            let sliding =
                spec.alternating.as_ref().is_some_and(|a| a.layers.get(l).copied().unwrap_or(false));
            layers.push(DecoderLayer {
                input_layernorm: r.norm(
                    &format!("{p}.input_layernorm.weight"),
                    eps,
                    offset,
                    place.compute,
                )?,
                self_attn,
                post_attention_layernorm: r.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    eps,
                    offset,
                    place.compute,
                )?,
                mlp,
                feedforward_norms,
                sliding,
            });
            // The layer's temporaries (a float copy of each weight) were freed between the
            // quantized tensors it keeps; give those holes back so RSS tracks the model.
            trim_heap();
            tracing::debug!(layer = l, "loaded decoder layer");
            progress(l + 1, total);
        }
        let norm = r.norm("model.norm.weight", eps, offset, placement.norm)?;
        let head_weight = if s.tied_embeddings {
            // Tied: the same tensor, or its copy where the head computes.
            embed_tokens.f_to_device(placement.head)?
        } else {
            r.dense("lm_head.weight", opts.dtype, placement.head)?
        };
        let lm_head = Dense::new(head_weight, None)
            .map_err(|source| Error::Quant { name: "lm_head.weight".into(), source })?;
        let rope = Rope::new(config.rotary_dim as i64, config.rope_theta, &spec.rope_scaling)?;
        let alternating = match &spec.alternating {
            None => None,
            Some(a) => Some((
                a.window,
                a.rope
                    .as_ref()
                    .map(|(theta, scaling)| Rope::new(s.head_dim as i64, *theta, scaling))
                    .transpose()?,
            )),
        };
        // transformers keeps sqrt(hidden_size) as an f32 buffer and casts it to the weight's dtype.
        let embed_scale = spec.embed_scale.then(|| (s.hidden as f64).sqrt() as f32);
        Ok(CausalLm {
            alternating,
            embed_scale,
            final_softcap: spec.final_softcap,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            sliding_window: spec.sliding_window,
            dtype: opts.dtype,
            placement,
        })
    }

    /// What config.json said.
    pub fn config(&self) -> &HfConfig {
        &self.config
    }

    /// dtype of the unquantized tensors (and of the hidden states between layers).
    pub fn dtype(&self) -> Kind {
        self.dtype
    }

    /// Where inputs go: the embedding's device (the whole model's, unless a device map spreads it).
    pub fn device(&self) -> Device {
        self.placement.embed
    }

    /// Where logits come out: the output head's device.
    pub fn head_device(&self) -> Device {
        self.placement.head
    }

    /// Where each module lives and computes.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings `[B, T, hidden]` of `input_ids [B, T]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor, Error> {
        let ids = input_ids.f_to_device(self.placement.embed)?;
        let e = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?;
        match self.embed_scale {
            None => Ok(e),
            Some(scale) => {
                let kind = self.embed_tokens.f_kind()?;
                let scale =
                    Tensor::f_scalar_tensor(f64::from(scale), (Kind::Float, e.device()))?.f_to_kind(kind)?;
                Ok(e.f_mul(&scale)?)
            }
        }
    }

    /// Rotary tables and attention mask for a batch: `position_ids [B, T]` (per-sequence
    /// positions when packed) and `segment_ids [B, T]` (attention stays within equal ids).
    pub fn context(
        &self,
        position_ids: &Tensor,
        segment_ids: Option<&Tensor>,
    ) -> Result<LayerContext, Error> {
        let seq = position_ids.size().last().copied().unwrap_or(0);
        let device = position_ids.device();
        let tables =
            self.tables(position_ids, |window| blocks::attention_mask(segment_ids, seq, window, device))?;
        LayerContext::spread(tables, &self.placement.compute_devices())
    }

    /// [`Self::context`] for layers that run on the batch's real tokens only: where
    /// `segment_ids` marks padding (-1), the linears, norms and MLPs skip it (the layers take
    /// and give `[1, N, hidden]`, see [`LayerContext::pack`]) and attention alone works on the
    /// `[B, T]` grid, with the same mask. Real tokens get what the padded layout gives them; a
    /// batch without padding gets [`Self::context`].
    pub fn context_skipping_padding(
        &self,
        position_ids: &Tensor,
        segment_ids: Option<&Tensor>,
    ) -> Result<LayerContext, Error> {
        let Some(seg) = segment_ids else { return self.context(position_ids, None) };
        let real = seg.f_reshape([-1])?.f_ge(0)?;
        let n = real.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if n == real.numel() as i64 {
            return self.context(position_ids, segment_ids);
        }
        let size = seg.size();
        let [rows, cols] = size[..] else {
            return Err(Error::BadInput(format!("segment_ids must be [batch, seq], got {size:?}")));
        };
        let device = position_ids.device();
        let mut tables =
            self.tables(position_ids, |window| blocks::attention_mask(segment_ids, cols, window, device))?;
        let index = real.f_nonzero()?.f_reshape([-1])?.f_to_device(device)?;
        let unpad = || blocks::Unpad { index: index.shallow_clone(), rows, cols };
        if let Some(s) = tables.sliding.as_mut() {
            s.unpad = Some(unpad());
        }
        tables.unpad = Some(unpad());
        LayerContext::spread(tables, &self.placement.compute_devices())
    }

    /// Rotary tables for `positions` and the masks `mask(window)` gives, for every layer's
    /// window: the global one (`sliding_window`, Mistral's) and, for a model that alternates,
    /// the sliding layers' with their own RoPE where they have one.
    fn tables(
        &self,
        positions: &Tensor,
        mask: impl Fn(Option<u64>) -> Result<Option<Tensor>, Error>,
    ) -> Result<DeviceContext, Error> {
        let (cos, sin) = self.rope.cos_sin(positions, self.dtype)?;
        let sliding = match &self.alternating {
            None => None,
            Some((window, rope)) => {
                let (cos, sin) = match rope {
                    Some(r) => r.cos_sin(positions, self.dtype)?,
                    None => (cos.shallow_clone(), sin.shallow_clone()),
                };
                Some(Box::new(DeviceContext {
                    cos,
                    sin,
                    mask: mask(Some(*window))?,
                    sliding: None,
                    unpad: None,
                }))
            }
        };
        Ok(DeviceContext { cos, sin, mask: mask(self.sliding_window)?, sliding, unpad: None })
    }

    /// Run decoder layer `index` on hidden states `h`, moved first to where the layer computes
    /// (autograd carries the gradient back to `h`'s device).
    pub fn layer(&self, index: usize, h: &Tensor, ctx: &LayerContext) -> Result<Tensor, Error> {
        Ok(self.layer_routed(index, h, ctx)?.0)
    }

    /// [`Self::layer`], also giving a mixture of experts' router logits `[tokens, experts]` (in
    /// the model's dtype, on the layer's device; `None` for a dense layer), which the router's
    /// load-balancing loss reads.
    pub fn layer_routed(
        &self,
        index: usize,
        h: &Tensor,
        ctx: &LayerContext,
    ) -> Result<(Tensor, Option<Tensor>), Error> {
        let layer =
            self.layers.get(index).ok_or_else(|| Error::BadInput(format!("no decoder layer {index}")))?;
        let device = self.placement.layers[index].compute;
        layer.forward(&h.f_to_device(device)?, ctx.on(device)?)
    }

    /// A mixture of experts' `(experts, top_k)`, for its load-balancing loss; `None` when dense.
    pub fn routing(&self) -> Option<(i64, i64)> {
        self.config.moe.as_ref().map(|m| (m.experts as i64, m.top_k as i64))
    }

    /// Logits per position (the output head's width), for callers that size work by it.
    pub fn vocab_size(&self) -> i64 {
        self.lm_head.out_features()
    }

    /// Final norm and output head: logits `[B, T, vocab]` in the model dtype, soft-capped in it
    /// where the family caps them (as transformers' forward does).
    pub fn head(&self, h: &Tensor) -> Result<Tensor, Error> {
        let logits = self.head_of_normed(&self.final_norm(h)?)?;
        match self.final_softcap {
            None => Ok(logits),
            Some(cap) => Ok(blocks::softcap(&logits, cap)?),
        }
    }

    /// The logits' soft-cap (`final_logit_softcapping`, Gemma 2), which callers that take the
    /// head's raw product ([`Self::head_of_normed`]) apply themselves.
    pub fn final_logit_softcapping(&self) -> Option<f64> {
        self.final_softcap
    }

    /// `cap * tanh(z / cap)` with this model's logit cap (identity without one), for callers
    /// that take the head's raw product and cap it in f32 (TRL's chunked head).
    pub fn cap_logits(&self, z: &Tensor) -> Result<Tensor, Error> {
        match self.final_softcap {
            None => Ok(z.shallow_clone()),
            Some(cap) => Ok(blocks::softcap(z, cap)?),
        }
    }

    /// The output head's raw product alone (before any soft-cap), on final-normed hidden states
    /// ([`Self::final_norm`]).
    pub fn head_of_normed(&self, normed: &Tensor) -> Result<Tensor, Error> {
        Ok(self.lm_head.forward(normed)?)
    }

    /// The final norm of `h`, on the output head's device: what [`Self::head`] multiplies by the
    /// head's weight, for callers that differentiate the head themselves (TRL's chunked log-prob
    /// head, see sft's DPO).
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor, Error> {
        let h = self.norm.forward(&h.f_to_device(self.placement.norm)?)?;
        Ok(h.f_to_device(self.placement.head)?)
    }

    /// The output head's `[vocab, hidden]` weight when it is a frozen, bias-free product (its
    /// gradient needs no autograd); `None` when it trains (`modules_to_save`) or has a bias.
    pub fn frozen_head_weight(&self) -> Option<&Tensor> {
        (self.lm_head.bias.is_none() && !self.lm_head.weight.requires_grad()).then_some(&self.lm_head.weight)
    }

    /// Logits for `input_ids [B, T]`; positions default to `0..T` in every row.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
        segment_ids: Option<&Tensor>,
    ) -> Result<Tensor, Error> {
        self.head(&self.hidden_states(input_ids, position_ids, segment_ids)?)
    }

    /// The last decoder layer's output `[B, T, hidden]` (before the final norm), for callers that
    /// run the head themselves (a chunked loss); positions default to `0..T` in every row.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
        segment_ids: Option<&Tensor>,
    ) -> Result<Tensor, Error> {
        self.hidden_states_routed(input_ids, position_ids, segment_ids, &mut |_| Ok(()))
    }

    /// [`Self::hidden_states`], handing each mixture-of-experts layer's router logits to
    /// `router` as the layer runs (a load-balancing loss over the forward).
    pub fn hidden_states_routed(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
        segment_ids: Option<&Tensor>,
        router: &mut dyn FnMut(Tensor) -> Result<(), Error>,
    ) -> Result<Tensor, Error> {
        let ctx = self.context_for(input_ids, position_ids, segment_ids, false)?;
        self.hidden_states_in(&ctx, input_ids, router)
    }

    /// The context of a forward over `input_ids [B, T]`: positions default to `0..T` in every
    /// row; with `skip_padding` the layers run on the real tokens only
    /// ([`Self::context_skipping_padding`]), else [`Self::context`].
    pub fn context_for(
        &self,
        input_ids: &Tensor,
        position_ids: Option<&Tensor>,
        segment_ids: Option<&Tensor>,
        skip_padding: bool,
    ) -> Result<LayerContext, Error> {
        let size = input_ids.size();
        let [b, t] = size[..] else {
            return Err(Error::BadInput(format!("input_ids must be [batch, seq], got {size:?}")));
        };
        let default_pos;
        let pos = match position_ids {
            Some(p) => p,
            None => {
                default_pos =
                    Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?.f_expand([b, t], false)?;
                &default_pos
            }
        };
        if skip_padding {
            self.context_skipping_padding(pos, segment_ids)
        } else {
            self.context(pos, segment_ids)
        }
    }

    /// [`Self::hidden_states_routed`] in a context the caller built (one that skips padding,
    /// say: [`Self::context_skipping_padding`]); `[B, T, hidden]` either way.
    pub fn hidden_states_in(
        &self,
        ctx: &LayerContext,
        input_ids: &Tensor,
        router: &mut dyn FnMut(Tensor) -> Result<(), Error>,
    ) -> Result<Tensor, Error> {
        let mut h = ctx.pack(&self.embed(input_ids)?)?;
        for i in 0..self.layers.len() {
            let (next, logits) = self.layer_routed(i, &h, ctx)?;
            if let Some(l) = logits {
                router(l)?;
            }
            h = next;
        }
        ctx.unpack(&h)
    }

    /// KV-cached decoding after `prompt` (a batch of one): greedy at temperature 0, else sampled
    /// with temperature and nucleus (top-p) filtering from the generation's own random stream
    /// seeded with `sampling.seed` (independent of torch's global generator). Also returns the prompt's logits `[T, vocab]` in f32.
    pub fn generate(&self, prompt: &[i64], sampling: &Sampling) -> Result<Generation, Error> {
        if prompt.is_empty() {
            return Err(Error::BadInput("generation needs a non-empty prompt".into()));
        }
        let mut rng = SampleRng(sampling.seed);
        tch::no_grad(|| {
            let mut caches: Vec<KvCache> = (0..self.layers.len()).map(|_| KvCache::default()).collect();
            let t = prompt.len() as i64;
            let device = self.device();
            let ids = Tensor::from_slice(prompt).f_to_device(device)?.f_view([1, t])?;
            let pos = Tensor::f_arange(t, (Kind::Int64, device))?.f_view([1, t])?;
            let logits = self.step_cached(&ids, &pos, &mut caches)?;
            let prompt_logits = logits.f_get(0)?.f_to_kind(Kind::Float)?;
            let mut next = sample(&prompt_logits.f_get(t - 1)?, sampling, &mut rng)?;
            let mut tokens = Vec::new();
            for i in 0..sampling.max_new_tokens {
                tokens.push(next);
                if sampling.stop_ids.contains(&next) || i + 1 == sampling.max_new_tokens {
                    break;
                }
                let ids = Tensor::from_slice(&[next]).f_to_device(device)?.f_view([1, 1])?;
                let pos = Tensor::from_slice(&[t + i as i64]).f_to_device(device)?.f_view([1, 1])?;
                let logits = self.step_cached(&ids, &pos, &mut caches)?;
                next = sample(&logits.f_get(0)?.f_get(0)?.f_to_kind(Kind::Float)?, sampling, &mut rng)?;
            }
            Ok(Generation { tokens, prompt_logits })
        })
    }

    /// One forward over new tokens `ids [1, n]` at positions `pos [1, n]`, through and into the
    /// per-layer caches.
    fn step_cached(&self, ids: &Tensor, pos: &Tensor, caches: &mut [KvCache]) -> Result<Tensor, Error> {
        let n = ids.size()[1];
        let past = caches.first().and_then(|c| c.k.as_ref()).map_or(0, |k| k.size()[2]);
        let device = pos.device();
        let tables = self.tables(pos, |window| cached_mask(past, n, window, device))?;
        let ctx = LayerContext::spread(tables, &self.placement.compute_devices())?;
        let mut h = self.embed(ids)?;
        for ((layer, cache), place) in self.layers.iter().zip(caches.iter_mut()).zip(&self.placement.layers) {
            h = layer.forward_cached(&h.f_to_device(place.compute)?, ctx.on(place.compute)?, Some(cache))?;
        }
        self.head(&h)
    }

    /// Greedy decoding of up to `max_new_tokens` after `prompt` (a batch of one), stopping at any
    /// of `stop_ids`; returns only the new tokens. Recomputes the whole sequence each step (no
    /// KV cache): meant for short samples after training, not for serving.
    pub fn generate_greedy(
        &self,
        prompt: &[i64],
        max_new_tokens: usize,
        stop_ids: &[i64],
    ) -> Result<Vec<i64>, Error> {
        if prompt.is_empty() {
            return Err(Error::BadInput("generation needs a non-empty prompt".into()));
        }
        let mut ids = prompt.to_vec();
        let mut out = Vec::new();
        tch::no_grad(|| -> Result<(), Error> {
            for _ in 0..max_new_tokens {
                let input =
                    Tensor::from_slice(&ids).f_to_device(self.device())?.f_view([1, ids.len() as i64])?;
                let logits = self.forward(&input, None, None)?;
                let next =
                    logits.f_select(1, ids.len() as i64 - 1)?.f_argmax(-1, false)?.f_int64_value(&[0])?;
                out.push(next);
                if stop_ids.contains(&next) {
                    break;
                }
                ids.push(next);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The parameters PEFT's `target_parameters` can adapt, by transformers 5's module names: per
    /// mixture-of-experts layer its router (`model.layers.N.mlp.gate`, `weight`, `[experts,
    /// hidden]`) and expert banks (`model.layers.N.mlp.experts`: `gate_up_proj`, each expert's
    /// `[2 * intermediate, hidden]`, gate rows then up; `down_proj`, `[hidden, intermediate]`), in
    /// the order transformers creates them. Empty for a dense model.
    pub fn param_slots(&self) -> Vec<ParamSlotInfo> {
        let mut out = param_slots_of(&self.config);
        for slot in &mut out {
            let l = layer_of(&slot.module).unwrap_or(0);
            slot.device = self.placement.layers.get(l).map_or(Device::Cpu, |p| p.compute);
        }
        out
    }

    /// Put a LoRA update on a parameter [`Self::param_slots`] offers (`module`, `param`); its
    /// factors' shapes must be the slot's.
    pub fn set_param_lora(&mut self, module: &str, param: &str, lora: ParamLora) -> Result<(), Error> {
        let slot =
            self.param_slots().into_iter().find(|s| s.module == module && s.param == param).ok_or_else(
                || Error::BadInput(format!("{module}.{param} is not a parameter LoRA can adapt")),
            )?;
        let rows = lora.a.size()[0];
        let want_a = [rows, slot.in_features];
        let want_b = [slot.out_features, rows];
        if lora.a.size() != want_a
            || lora.b.size() != want_b
            || lora.experts != slot.experts
            || rows % slot.experts.unwrap_or(1) != 0
        {
            return Err(Error::BadInput(format!(
                "{module}.{param}: LoRA factors {:?} and {:?} for {:?} experts, expected [r * experts, {}] and [{}, r * experts]",
                lora.a.size(),
                lora.b.size(),
                lora.experts,
                slot.in_features,
                slot.out_features
            )));
        }
        let l = layer_of(module).ok_or_else(|| Error::BadInput(format!("{module}: no layer index")))?;
        let Some(FeedForward::Experts(x)) = self.layers.get_mut(l).map(|layer| &mut layer.mlp) else {
            return Err(Error::BadInput(format!("{module}: not a mixture of experts")));
        };
        match param {
            "weight" => x.lora.router = Some(lora),
            "gate_up_proj" => x.lora.gate_up = Some(lora),
            _ => x.lora.down = Some(lora),
        }
        Ok(())
    }

    /// Every decoder linear by its transformers module name (`model.layers.0.self_attn.q_proj`),
    /// so adapters can wrap them; the output head is not offered.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Box<dyn Linear>)> {
        decoder_linears(&mut self.layers)
    }

    /// [`CausalLm::linears_mut`] together with the embedding's and output head's tensors by
    /// transformers parameter name (`model.embed_tokens.weight`, `lm_head.weight`), borrowed at
    /// once, for adapters that also train whole modules (PEFT's `modules_to_save`). A tensor slot
    /// replaced by another of the same shape and dtype is what the forward uses from then on.
    /// With tied embeddings both slots start as the same tensor; replacing one unties them.
    pub fn adaptable_mut(&mut self) -> (Vec<LinearSlot<'_>>, Vec<TensorSlot<'_>>) {
        let mut tensors = vec![
            ("model.embed_tokens.weight".to_owned(), &mut self.embed_tokens),
            ("lm_head.weight".to_owned(), &mut self.lm_head.weight),
        ];
        if let Some(b) = self.lm_head.bias.as_mut() {
            tensors.push(("lm_head.bias".to_owned(), b));
        }
        (decoder_linears(&mut self.layers), tensors)
    }

    /// Parameter count as PEFT reports it: 4-bit weights at their unpacked element count, a
    /// tied head counted once.
    pub fn num_parameters(&self) -> u64 {
        let s = &self.config.shape;
        let mut per_layer = 0;
        let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        if self.config.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.config.o_bias {
            per_layer += s.hidden;
        }
        if self.config.mlp_bias {
            per_layer += 2 * s.intermediate + s.hidden;
        }
        if matches!(
            self.config.architecture,
            Architecture::Qwen3 | Architecture::Gemma3 | Architecture::Qwen3Moe
        ) {
            per_layer += 2 * s.head_dim;
        }
        if self.config.gemma.is_some() {
            // The norms after each sub-block.
            per_layer += 2 * s.hidden;
        }
        // Linears (experts included), embeddings, head, two norms per layer, routers, final norm.
        s.linear_params() + s.other_params() + per_layer * s.layers
    }
}
