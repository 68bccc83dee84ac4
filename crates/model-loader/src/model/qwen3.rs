//! Qwen3 (`Qwen3ForCausalLM`): Llama's decoder with an RMSNorm over each head of q and k
//! (`q_norm`, `k_norm`, applied before the rotary embedding), no q/k/v bias by default.

use super::DecoderSpec;
use crate::hf_config::HfConfig;

/// Qwen3 adds the per-head q/k norms.
pub(super) fn spec(cfg: &HfConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: true, sliding_window: None, ..DecoderSpec::llama(cfg) }
}
