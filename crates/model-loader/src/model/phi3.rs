//! Phi-3 and Phi-4-mini (`Phi3ForCausalLM`): Llama's decoder with q/k/v computed by one fused
//! linear (`qkv_proj`, split in that order) and gate/up by another (`gate_up_proj`, gate first),
//! LongRoPE (`longrope`, older `su`: short or long per-frequency factors, cos/sin scaled), the
//! rotary embedding on the leading `partial_rotary_factor` of each head (Phi-4-mini), and a
//! sliding window on every layer when config.json sets one. The fused layout and the rotary
//! width come from config.json through `HfConfig` (`ModelShape::fused_projections`,
//! `rotary_dim`); the window is the one thing this spec sets.

use super::DecoderSpec;
use crate::hf_config::HfConfig;

/// Phi-3's attention window (its other differences are in the shape and the RoPE parameters).
pub(super) fn spec(cfg: &HfConfig) -> DecoderSpec {
    DecoderSpec { sliding_window: cfg.sliding_window, ..DecoderSpec::llama(cfg) }
}
