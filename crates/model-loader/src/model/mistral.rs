//! Mistral (`MistralForCausalLM`): Llama's decoder with grouped-query attention limited to a
//! sliding window (`sliding_window`, when set) — a token sees at most that many positions back.

use super::DecoderSpec;
use crate::hf_config::HfConfig;

/// Mistral differs from Llama only by the attention window.
pub(super) fn spec(cfg: &HfConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: false, sliding_window: cfg.sliding_window, ..DecoderSpec::llama(cfg) }
}
