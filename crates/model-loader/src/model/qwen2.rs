//! Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): Llama's decoder with a bias on q, k and v (not on o);
//! config.json's `use_sliding_window: true` is refused when it is read.

use super::DecoderSpec;
use crate::hf_config::HfConfig;

/// Qwen2's q/k/v biases are loaded from the checkpoint (`HfConfig::qkv_bias` is always true).
pub(super) fn spec(cfg: &HfConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: false, sliding_window: None, ..DecoderSpec::llama(cfg) }
}
