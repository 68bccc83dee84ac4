//! Gemma 3, text only (`Gemma3ForCausalLM`): Gemma 2's decoder (see `gemma2.rs`) with an
//! RMSNorm over each head of q and k (Gemma's `1 + weight` form, before the rotary embedding), no
//! soft-capping by default (transformers' Gemma 3 never caps attention scores), scaled-dot-product
//! attention, and the sliding layers' own RoPE base (`rope_local_base_freq`, or the
//! `sliding_attention` entry of `rope_parameters`).

use super::{DecoderSpec, ScoreOptions};
use crate::hf_config::{GemmaConfig, HfConfig};

/// Gemma 3's differences, from config.json.
pub(super) fn spec(cfg: &HfConfig, g: &GemmaConfig) -> DecoderSpec {
    DecoderSpec {
        qk_norm: true,
        scores: ScoreOptions {
            scale: Some(1.0 / g.query_pre_attn_scalar.sqrt()),
            softcap: None,
            eager: false,
        },
        ..super::gemma2::gemma(cfg, g)
    }
}
