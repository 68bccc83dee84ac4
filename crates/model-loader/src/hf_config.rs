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
}

impl Architecture {
    /// The `architectures` names accepted, as transformers writes them.
    pub const SUPPORTED: [&'static str; 4] =
        ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"];

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" => Some(Architecture::Qwen3),
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
    /// A pre-quantized 4-bit checkpoint's `quantization_config.bnb_4bit_compute_dtype` (torch
    /// name), which transformers computes its 4-bit layers in whatever dtype is asked for.
    pub bnb_compute_dtype: Option<String>,
    /// How RoPE frequencies are scaled (`rope_parameters.rope_type` or the older `rope_scaling`).
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v (`attention_bias` for Llama/Mistral/Qwen3; always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` for Llama/Mistral/Qwen3; never for Qwen2).
    pub o_bias: bool,
    /// Bias on the MLP projections (`mlp_bias`, Llama only).
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, when set and the sequence is longer.
    pub sliding_window: Option<u64>,
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
#[derive(Debug, Clone, Copy, PartialEq)]
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
        };
        let float = |x: Option<&Value>, key: &str, default: f64| -> Result<f64, Error> {
            match x {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| bad(format!("`{key}` must be a number, found {x}"))),
            }
        };
        let rope = v.get("rope_theta").or_else(|| v.get("rope_parameters").and_then(|p| p.get("rope_theta")));
        let rope_scaling = parse_rope_scaling(&v).map_err(bad)?;
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(bad(format!("`hidden_act` `{act}` is not supported (nibble's decoder uses silu)")));
        }
        let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
        if matches!(architecture, Architecture::Qwen2 | Architecture::Qwen3) && flag("use_sliding_window") {
            return Err(bad("`use_sliding_window: true` is not supported for Qwen models yet".into()));
        }
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (flag("attention_bias"), flag("attention_bias")),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => opt_int("sliding_window")?,
            _ => None,
        };
        let quantization = match v.get("quantization_config").filter(|q| !q.is_null()) {
            None => None,
            Some(q) => Some(parse_quantization(q).map_err(bad)?),
        };
        Ok(HfConfig {
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && flag("mlp_bias"),
            sliding_window,
            architecture,
            shape,
            rms_norm_eps: float(v.get("rms_norm_eps"), "rms_norm_eps", 1e-6)?,
            rope_theta: float(rope, "rope_theta", 10000.0)?,
            dtype: v.get("dtype").or_else(|| v.get("torch_dtype")).and_then(Value::as_str).map(str::to_owned),
            prequantized: quantization.is_some(),
            bnb_compute_dtype: v
                .get("quantization_config")
                .and_then(|q| q.get("bnb_4bit_compute_dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
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

/// Read `rope_parameters` (transformers 5) or `rope_scaling` (older configs).
fn parse_rope_scaling(v: &Value) -> Result<RopeScaling, String> {
    let params = match v.get("rope_scaling").filter(|x| !x.is_null()) {
        Some(p) => p,
        None => match v.get("rope_parameters") {
            Some(p) => p,
            None => return Ok(RopeScaling::Default),
        },
    };
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
        other => Err(format!("rope type `{other}` is not supported (supported: default, linear, llama3)")),
    }
}
