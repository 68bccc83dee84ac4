//! Gemma 2 (`Gemma2ForCausalLM`): Llama's decoder with Gemma's RMSNorm (`x * (1 + weight)` in
//! f32), GeGLU (`gelu_pytorch_tanh`), embeddings scaled by `sqrt(hidden_size)`, a norm after each
//! sub-block as well as before (`post_attention_layernorm`, `pre_`/`post_feedforward_layernorm`),
//! scores scaled by `query_pre_attn_scalar` and soft-capped (transformers runs Gemma 2 with
//! eager attention only), sliding-window layers alternating with global ones (`layer_types`),
//! soft-capped logits and a tied head.

use super::{Alternating, DecoderSpec, ScoreOptions};
use crate::hf_config::{GemmaConfig, HfConfig};

/// Gemma 2's differences, from config.json.
pub(super) fn spec(cfg: &HfConfig, g: &GemmaConfig) -> DecoderSpec {
    DecoderSpec {
        scores: ScoreOptions {
            scale: Some(1.0 / g.query_pre_attn_scalar.sqrt()),
            softcap: g.attn_logit_softcapping,
            eager: true,
        },
        ..gemma(cfg, g)
    }
}

/// What Gemma 2 and 3 share.
pub(super) fn gemma(cfg: &HfConfig, g: &GemmaConfig) -> DecoderSpec {
    DecoderSpec {
        norm_offset: true,
        gelu: true,
        feedforward_norms: true,
        embed_scale: true,
        final_softcap: g.final_logit_softcapping,
        alternating: cfg.sliding_window.map(|window| Alternating {
            window,
            layers: cfg.sliding_layers.clone(),
            rope: g.local_rope.clone(),
        }),
        ..DecoderSpec::llama(cfg)
    }
}
