//! A model's `config.json`: which family it is and its dimensions, read with errors that name
//! the file and key. Only the families nibble has model code for are accepted.

use std::path::Path;

use device_map::estimate::ModelShape;
use serde_json::Value;

use crate::Error;

/// The model families nibble runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3/3.1/3.2.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 (bias on q/k/v).
    Qwen2,
    /// Qwen3 (RMSNorm on q and k).
    Qwen3,
    /// Gemma 2 (sandwich norms, GeGLU, logit soft-capping, alternating sliding layers).
    Gemma2,
    /// Gemma 3, text only (Gemma 2's layout with q/k norms and a local RoPE base).
    Gemma3,
    /// Phi-3 and Phi-4-mini (fused `qkv_proj` / `gate_up_proj`, LongRoPE, partial rotary).
    Phi3,
    /// Mixtral (Mistral's decoder with a top-k mixture of SwiGLU experts).
    Mixtral,
    /// Qwen3-MoE (Qwen3's decoder with a top-k mixture of experts).
    Qwen3Moe,
}

impl Architecture {
    /// The `architectures` names accepted, as transformers writes them.
    pub const SUPPORTED: [&'static str; 9] = [
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    ];

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
            "Gemma2ForCausalLM" => Some(Architecture::Gemma2),
            "Gemma3ForCausalLM" => Some(Architecture::Gemma3),
            "Phi3ForCausalLM" => Some(Architecture::Phi3),
            "MixtralForCausalLM" => Some(Architecture::Mixtral),
            "Qwen3MoeForCausalLM" => Some(Architecture::Qwen3Moe),
            _ => None,
        }
    }
}

/// What nibble needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// The family.
    pub architecture: Architecture,
    /// Dimensions.
    pub shape: ModelShape,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base (`rope_theta`, or `rope_parameters.rope_theta` in transformers 5).
    pub rope_theta: f64,
    /// Weight dtype recorded by transformers (`dtype` or `torch_dtype`), if any.
    pub dtype: Option<String>,
    /// The checkpoint is already quantized (`quantization_config` present).
    pub prequantized: bool,
    /// How it was quantized, when it was (`quantization_config.load_in_8bit` or not).
    pub quantization: Option<Prequantized>,
    /// A 4-bit checkpoint's quantization settings (`bnb_4bit_quant_type`,
    /// `bnb_4bit_use_double_quant`, blocksize 64): how a float weight found among its linears
    /// (a mixture's experts, which transformers + bitsandbytes leave in full precision) is
    /// quantized while loading, to match the rest.
    pub bnb_4bit: Option<quant::ops::QuantizeOptions>,
    /// A pre-quantized 4-bit checkpoint's `quantization_config.bnb_4bit_compute_dtype` (torch
    /// name), which transformers computes its 4-bit layers in whatever dtype is asked for.
    pub bnb_compute_dtype: Option<String>,
    /// How RoPE frequencies are scaled (`rope_parameters.rope_type` or the older `rope_scaling`).
    pub rope_scaling: RopeScaling,
    /// Leading dimensions of each head the rotary embedding turns (`head_dim *
    /// partial_rotary_factor`); the rest pass through.
    pub rotary_dim: u64,
    /// Bias on q/k/v (`attention_bias` for Llama/Mistral/Qwen3; always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` for Llama/Mistral/Qwen3; never for Qwen2).
    pub o_bias: bool,
    /// Bias on the MLP projections (`mlp_bias`, Llama only).
    pub mlp_bias: bool,
    /// The sliding attention window, when set and the sequence is longer: every layer's
    /// (Mistral) or only the layers `sliding_layers` marks (Gemma).
    pub sliding_window: Option<u64>,
    /// Per decoder layer, whether it attends within `sliding_window` only (`layer_types`'
    /// `sliding_attention`); empty when every layer does the same.
    pub sliding_layers: Vec<bool>,
    /// What Gemma 2/3 add to the shared decoder; `None` for the Llama-shaped families.
    pub gemma: Option<GemmaConfig>,
    /// The mixture of experts replacing the MLP (Mixtral, Qwen3-MoE); `None` for dense models.
    pub moe: Option<MoeConfig>,
}

/// A mixture-of-experts model's routing, from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer (`num_local_experts`, `num_experts`).
    pub experts: u64,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: u64,
    /// Each expert's SwiGLU width (`intermediate_size` for Mixtral, `moe_intermediate_size`).
    pub expert_intermediate: u64,
    /// The top-k probabilities are renormalised to sum to one (always for Mixtral;
    /// `norm_topk_prob` for Qwen3-MoE).
    pub norm_topk_prob: bool,
    /// Each expert's output is weighted in f32 (Mixtral) or in the model's dtype (Qwen3-MoE,
    /// which rounds the routing weights first).
    pub weights_in_f32: bool,
    /// The router's load-balancing loss is added to the training loss (`output_router_logits`).
    pub output_router_logits: bool,
    /// Its coefficient (`router_aux_loss_coef`).
    pub router_aux_loss_coef: f64,
    /// The hub checkpoint's module names under each layer: the block (`block_sparse_moe` or
    /// `mlp`) and the expert linears in gate, up, down order (`w1, w3, w2` or
    /// `gate_proj, up_proj, down_proj`).
    pub names: MoeNames,
}

/// Where a family's checkpoint keeps its router and experts (see [`MoeConfig::names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeNames {
    /// The block under `model.layers.N.`.
    pub block: &'static str,
    /// Gate, up and down projections under `experts.E.`.
    pub linears: [&'static str; 3],
}

/// Gemma 2/3's options from config.json: what their decoder computes differently.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaConfig {
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`, not `head_dim^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// `cap * tanh(score / cap)` on attention scores (Gemma 2; Gemma 3's transformers ignores it).
    pub attn_logit_softcapping: Option<f64>,
    /// `cap * tanh(logit / cap)` on the output logits.
    pub final_logit_softcapping: Option<f64>,
    /// The sliding layers' own RoPE base and scaling (Gemma 3's `sliding_attention` parameters);
    /// `None` when they share the global one.
    pub local_rope: Option<(f64, RopeScaling)>,
}

/// How a pre-quantized checkpoint's linears are stored (its `quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prequantized {
    /// bitsandbytes 4-bit (`load_in_4bit`): packed nibbles with a `quant_state`.
    FourBit,
    /// bitsandbytes LLM.int8 (`load_in_8bit`): int8 `weight` with `SCB`.
    EightBit {
        /// `llm_int8_threshold` (6.0 when absent): input columns with a value at least this
        /// large are computed in floating point.
        threshold: f32,
    },
}

/// RoPE frequency scaling, as transformers' `rope_type`s compute it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (`linear`).
    Linear {
        /// Divisor of the positions.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling (`llama3`).
    Llama3 {
        /// Scale of low frequencies.
        factor: f64,
        /// Wavelength threshold numerator for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold numerator for high frequencies.
        high_freq_factor: f64,
        /// Context length of pretraining.
        original_max_position_embeddings: f64,
    },
    /// Phi-3's LongRoPE (`longrope`, older `su`): each frequency divided by its short factor,
    /// or its long one once a batch's positions pass the pretraining length, and cos/sin scaled.
    LongRope {
        /// Per-frequency divisors up to `original_max_position_embeddings` positions.
        short_factor: Vec<f64>,
        /// Per-frequency divisors beyond.
        long_factor: Vec<f64>,
        /// Context length of pretraining.
        original_max_position_embeddings: f64,
        /// The factor cos and sin are multiplied by.
        attention_factor: f64,
    },
}

impl HfConfig {
    /// Read `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
        Self::parse(&path, &text)
    }

    /// Parse a config.json text; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let bad = |message: String| Error::BadConfig { path: path.to_owned(), message };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing `architectures` (a list with the model class name)".into()))?;
        let architecture = Architecture::from_name(arch_name)
            .ok_or_else(|| Error::Unsupported { path: path.to_owned(), found: arch_name.to_owned() })?;
        let int = |key: &str| -> Result<u64, Error> {
            match v.get(key) {
                Some(x) => x
                    .as_u64()
                    .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, found {x}"))),
                None => Err(bad(format!("missing `{key}`"))),
            }
        };
        let opt_int = |key: &str| -> Result<Option<u64>, Error> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => int(key).map(Some),
            }
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        if heads == 0 || hidden == 0 {
            return Err(bad("`hidden_size` and `num_attention_heads` must be positive".into()));
        }
        let head_dim = match opt_int("head_dim")? {
            Some(d) => d,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(bad(format!(
                    "`hidden_size` {hidden} is not divisible by `num_attention_heads` {heads}"
                )));
            }
        };
        let kv_heads = opt_int("num_key_value_heads")?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "`num_key_value_heads` {kv_heads} must divide `num_attention_heads` {heads}"
            )));
        }
        let shape = ModelShape {
            vocab: int("vocab_size")?,
            hidden,
            intermediate: int("intermediate_size")?,
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            tied_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            fused_projections: architecture == Architecture::Phi3,
            moe: None,
        };
        let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
        let number = |x: Option<&Value>, key: &str| -> Result<Option<f64>, Error> {
            match x {
                None | Some(Value::Null) => Ok(None),
                Some(x) => {
                    x.as_f64().map(Some).ok_or_else(|| bad(format!("`{key}` must be a number, found {x}")))
                }
            }
        };
        let float =
            |x: Option<&Value>, key: &str, default: f64| Ok::<_, Error>(number(x, key)?.unwrap_or(default));
        let opt_float = |key: &str| number(v.get(key), key);
        let is_gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        // Gemma 3 in transformers 5 keeps one RoPE parameter set per layer type.
        let per_type =
            v.get("rope_parameters").filter(|p| is_gemma && p.get("full_attention").is_some()).cloned();
        let (rope, rope_scaling) = match &per_type {
            Some(p) => {
                let full = &p["full_attention"];
                (full.get("rope_theta"), parse_rope_params(full).map_err(bad)?)
            }
            None => (
                v.get("rope_theta").or_else(|| v.get("rope_parameters").and_then(|p| p.get("rope_theta"))),
                parse_rope_scaling(&v, architecture).map_err(bad)?,
            ),
        };
        let partial = v
            .get("partial_rotary_factor")
            .or_else(|| v.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor")))
            .filter(|x| !x.is_null());
        let rotary_dim = match partial {
            None => head_dim,
            Some(f) => match f.as_f64() {
                Some(f) if f > 0.0 && f <= 1.0 => ((head_dim as f64 * f) as u64).max(2) / 2 * 2,
                _ => {
                    return Err(bad(format!(
                        "`partial_rotary_factor` must be a number in (0, 1], found {f}"
                    )));
                }
            },
        };
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = &rope_scaling {
            let want = (rotary_dim / 2) as usize;
            if short_factor.len() != want || long_factor.len() != want {
                return Err(bad(format!(
                    "longrope's `short_factor` and `long_factor` need {want} entries each (half the rotary \
                     dimensions), found {} and {}",
                    short_factor.len(),
                    long_factor.len()
                )));
            }
        }
        if architecture == Architecture::Phi3 {
            for key in ["resid_pdrop", "embd_pdrop"] {
                if v.get(key).and_then(Value::as_f64).is_some_and(|p| p != 0.0) {
                    return Err(bad(format!(
                        "`{key}` is not 0: nibble's Phi-3 decoder has no residual or embedding dropout"
                    )));
                }
            }
        }
        // Gemma's MLP reads `hidden_activation` (Gemma 2 configs also carry `hidden_act`).
        let (act_key, want_act) =
            if is_gemma { ("hidden_activation", "gelu_pytorch_tanh") } else { ("hidden_act", "silu") };
        let act = v.get(act_key).or_else(|| if is_gemma { v.get("hidden_act") } else { None });
        if let Some(act) = act.and_then(Value::as_str)
            && act != want_act
        {
            return Err(bad(format!(
                "`{act_key}` `{act}` is not supported (this family's decoder uses {want_act})"
            )));
        }
        if flag("use_bidirectional_attention") {
            return Err(bad(
                "`use_bidirectional_attention: true` (an embedding model) is not supported: nibble trains causal LMs"
                    .into(),
            ));
        }
        if matches!(architecture, Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen3Moe)
            && flag("use_sliding_window")
        {
            return Err(bad("`use_sliding_window: true` is not supported for Qwen models yet".into()));
        }
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (flag("attention_bias"), flag("attention_bias")),
        };
        let sliding_window = match architecture {
            Architecture::Mistral
            | Architecture::Mixtral
            | Architecture::Gemma2
            | Architecture::Gemma3
            | Architecture::Phi3 => opt_int("sliding_window")?,
            _ => None,
        };
        let sliding_layers = if is_gemma {
            parse_layer_types(&v, architecture, shape.layers).map_err(bad)?
        } else {
            Vec::new()
        };
        let gemma = if is_gemma {
            // transformers' defaults where config.json leaves a key out.
            let (attn_cap, final_cap) = match architecture {
                Architecture::Gemma2 => (Some(50.0), Some(30.0)),
                _ => (None, None),
            };
            let cap = |key: &str, default: Option<f64>| -> Result<Option<f64>, Error> {
                if v.get(key).is_some() { opt_float(key) } else { Ok(default) }
            };
            let local_rope = match (&per_type, architecture) {
                (Some(p), _) => {
                    let local = &p["sliding_attention"];
                    let theta = float(
                        local.get("rope_theta"),
                        "rope_parameters.sliding_attention.rope_theta",
                        10000.0,
                    )?;
                    Some((theta, parse_rope_params(local).map_err(bad)?))
                }
                (None, Architecture::Gemma3) => {
                    Some((opt_float("rope_local_base_freq")?.unwrap_or(10000.0), RopeScaling::Default))
                }
                (None, _) => None,
            };
            Some(GemmaConfig {
                query_pre_attn_scalar: opt_float("query_pre_attn_scalar")?.unwrap_or(256.0),
                attn_logit_softcapping: cap("attn_logit_softcapping", attn_cap)?,
                final_logit_softcapping: cap("final_logit_softcapping", final_cap)?,
                local_rope,
            })
        } else {
            None
        };
        let moe = match architecture {
            Architecture::Mixtral | Architecture::Qwen3Moe => {
                Some(parse_moe(&v, architecture, shape.layers).map_err(bad)?)
            }
            _ => None,
        };
        let mut shape = shape;
        shape.moe = moe.as_ref().map(|m| device_map::estimate::MoeShape {
            experts: m.experts,
            top_k: m.top_k,
            intermediate: m.expert_intermediate,
        });
        // Gemma 3's default global base when config.json gives none (transformers' `default_theta`).
        let default_theta = if architecture == Architecture::Gemma3 { 1_000_000.0 } else { 10000.0 };
        let quantization = match v.get("quantization_config").filter(|q| !q.is_null()) {
            None => None,
            Some(q) => Some(parse_quantization(q).map_err(bad)?),
        };
        Ok(HfConfig {
            rope_scaling,
            rotary_dim,
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && flag("mlp_bias"),
            sliding_window,
            sliding_layers,
            gemma,
            moe,
            architecture,
            shape,
            rms_norm_eps: float(v.get("rms_norm_eps"), "rms_norm_eps", 1e-6)?,
            rope_theta: float(rope, "rope_theta", default_theta)?,
            dtype: v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(Value::as_str).map(str::to_owned),
            prequantized: quantization.is_some(),
            bnb_compute_dtype: v
                .get("quantization_config")
                .and_then(|q| q.get("bnb_4bit_compute_dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            bnb_4bit: match (&quantization, v.get("quantization_config")) {
                (Some(Prequantized::FourBit), Some(q)) => Some(quant::ops::QuantizeOptions {
                    quant_type: match q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
                        None => quant::QuantType::Fp4,
                        Some(t) => t
                            .parse()
                            .map_err(|e| bad(format!("`quantization_config.bnb_4bit_quant_type`: {e}")))?,
                    },
                    blocksize: 64,
                    double_quant: q
                        .get("bnb_4bit_use_double_quant")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                }),
                _ => None,
            },
            quantization,
        })
    }
}

/// Read a `quantization_config`: 8-bit when `load_in_8bit` is true, else 4-bit; another
/// method (GPTQ, AWQ, FP8, ...) is refused by name.
fn parse_quantization(q: &Value) -> Result<Prequantized, String> {
    match q.get("quant_method").and_then(Value::as_str) {
        None | Some("bitsandbytes") => {}
        Some(other) => {
            return Err(format!(
                "quantization method `{other}` is not supported: nibble reads bitsandbytes 4-bit and 8-bit \
                 checkpoints (or a dense model, which it quantizes while loading)"
            ));
        }
    }
    if !q.get("load_in_8bit").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(Prequantized::FourBit);
    }
    if q.get("llm_int8_has_fp16_weight").and_then(Value::as_bool).unwrap_or(false) {
        return Err("`quantization_config.llm_int8_has_fp16_weight: true` (16-bit weights quantized on the fly) is not supported".into());
    }
    let threshold = match q.get("llm_int8_threshold") {
        None | Some(Value::Null) => 6.0,
        Some(t) => match t.as_f64() {
            Some(t) if t.is_finite() && t >= 0.0 => t as f32,
            _ => {
                return Err(format!(
                    "`quantization_config.llm_int8_threshold` must be a number >= 0, found {t}"
                ));
            }
        },
    };
    Ok(Prequantized::EightBit { threshold })
}

/// A mixture of experts' routing (Mixtral's or Qwen3-MoE's keys and defaults).
fn parse_moe(v: &Value, arch: Architecture, layers: u64) -> Result<MoeConfig, String> {
    let uint = |key: &str| -> Result<Option<u64>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("`{key}` must be a non-negative integer, found {x}")),
        }
    };
    let flag = |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
    let mixtral = arch == Architecture::Mixtral;
    // transformers 5 writes `num_local_experts` for both (Qwen3-MoE's hub configs `num_experts`).
    let experts = match uint("num_local_experts")? {
        Some(n) => n,
        None => uint("num_experts")?.unwrap_or(if mixtral { 8 } else { 128 }),
    };
    let top_k = uint("num_experts_per_tok")?.unwrap_or(if mixtral { 2 } else { 8 });
    if experts == 0 || top_k == 0 || top_k > experts {
        return Err(format!(
            "`num_experts_per_tok` {top_k} must be between 1 and the number of experts {experts}"
        ));
    }
    let expert_intermediate =
        if mixtral { uint("intermediate_size")? } else { uint("moe_intermediate_size")? }
            .unwrap_or(if mixtral { 14336 } else { 768 });
    if mixtral && v.get("router_jitter_noise").and_then(Value::as_f64).is_some_and(|j| j != 0.0) {
        return Err("`router_jitter_noise` is not 0: nibble's router does not jitter its inputs".into());
    }
    if !mixtral {
        // Qwen3-MoE can leave layers dense (`mlp_only_layers`, `decoder_sparse_step`); its
        // released models route every layer, and so does nibble.
        let step = uint("decoder_sparse_step")?.unwrap_or(1).max(1);
        let dense = v.get("mlp_only_layers").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
        if dense || (step > 1 && layers > 0) {
            return Err(
                "dense layers among the experts (`mlp_only_layers`, `decoder_sparse_step` > 1) are not supported: \
                 nibble routes every layer"
                    .into(),
            );
        }
    }
    let coef = match v.get("router_aux_loss_coef") {
        None | Some(Value::Null) => 0.001,
        Some(x) => x.as_f64().ok_or_else(|| format!("`router_aux_loss_coef` must be a number, found {x}"))?,
    };
    Ok(MoeConfig {
        experts,
        top_k,
        expert_intermediate,
        norm_topk_prob: mixtral || flag("norm_topk_prob", false),
        weights_in_f32: mixtral,
        output_router_logits: flag("output_router_logits", false),
        router_aux_loss_coef: coef,
        names: if mixtral {
            MoeNames { block: "block_sparse_moe", linears: ["w1", "w3", "w2"] }
        } else {
            MoeNames { block: "mlp", linears: ["gate_proj", "up_proj", "down_proj"] }
        },
    })
}

/// Gemma's `layer_types` (each `sliding_attention` or `full_attention`), or transformers'
/// default pattern where config.json has none: every second layer global for Gemma 2, every
/// `sliding_window_pattern`-th (6) for Gemma 3.
fn parse_layer_types(v: &Value, arch: Architecture, layers: u64) -> Result<Vec<bool>, String> {
    match v.get("layer_types").filter(|x| !x.is_null()) {
        Some(list) => {
            let list = list.as_array().ok_or("`layer_types` must be a list of strings")?;
            if list.len() as u64 != layers {
                return Err(format!(
                    "`layer_types` has {} entries, `num_hidden_layers` is {layers}",
                    list.len()
                ));
            }
            list.iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(format!(
                        "`layer_types[{i}]` is {t}; supported: \"sliding_attention\", \"full_attention\""
                    )),
                })
                .collect()
        }
        None => {
            let every = match arch {
                Architecture::Gemma3 => v.get("sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6),
                _ => 2,
            }
            .max(1);
            Ok((0..layers).map(|i| (i + 1) % every != 0).collect())
        }
    }
}

/// Read `rope_parameters` (transformers 5) or `rope_scaling` (older configs).
fn parse_rope_scaling(v: &Value, arch: Architecture) -> Result<RopeScaling, String> {
    let params = match v.get("rope_scaling").filter(|x| !x.is_null()) {
        Some(p) => p,
        None => match v.get("rope_parameters") {
            Some(p) => p,
            None => return Ok(RopeScaling::Default),
        },
    };
    let kind = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str);
    // transformers reads Phi-3's older `su` and `yarn` as `longrope`.
    let longrope =
        matches!(kind, Some("longrope" | "su")) || (arch == Architecture::Phi3 && kind == Some("yarn"));
    if !longrope {
        return parse_rope_params(params);
    }
    let factors = |key: &str| -> Result<Vec<f64>, String> {
        params
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| format!("rope type `longrope` needs a list of numbers `{key}`"))
    };
    let num = |x: Option<&Value>| x.and_then(Value::as_f64);
    // Phi-3 keeps the pretraining length at the top level (4096 when absent), which wins.
    let original = match arch {
        Architecture::Phi3 => num(v.get("original_max_position_embeddings")).unwrap_or(4096.0),
        _ => num(params.get("original_max_position_embeddings"))
            .or_else(|| num(v.get("original_max_position_embeddings")))
            .or_else(|| num(v.get("max_position_embeddings")))
            .ok_or("rope type `longrope` needs `original_max_position_embeddings`")?,
    };
    if original < 1.0 {
        return Err(format!("`original_max_position_embeddings` must be at least 1, found {original}"));
    }
    let factor = match num(params.get("factor")) {
        Some(f) => f,
        None => num(v.get("max_position_embeddings")).unwrap_or(original) / original,
    };
    let attention_factor = match num(params.get("attention_factor")) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    })
}

/// One RoPE parameter set (`rope_type` and the numbers it needs).
fn parse_rope_params(params: &Value) -> Result<RopeScaling, String> {
    let kind =
        params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        params
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope type `{kind}` needs a number `{key}` in `rope_parameters`"))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope type `{other}` is not supported (supported: default, linear, llama3, longrope for Phi-3)"
        )),
    }
}
