//! Llama 1/2/3/3.1/3.2 (`LlamaForCausalLM`): the shared pre-norm decoder with optional biases
//! (`attention_bias`, `mlp_bias`), llama3 / linear RoPE scaling, and tied embeddings (3.2).

use super::DecoderSpec;
use crate::hf_config::HfConfig;

/// Llama uses every shared block as is; its options come straight from config.json.
pub(super) fn spec(cfg: &HfConfig) -> DecoderSpec {
    DecoderSpec { qk_norm: false, sliding_window: None, ..DecoderSpec::llama(cfg) }
}
