# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0"]
# ///
"""Tiny random models of the families beyond Llama's layout (Gemma 2, Gemma 3, Phi-3, Mixtral,
Qwen3-MoE), for the per-family training tests
(tests/families.rs, scripts/golden_trl_loss.py): each with the shipped tiny model's tokenizer
(models/tiny-llama), so every recipe and dataset made for that model runs on them.

For each family a folder tests/golden/families/<family>/model holds config.json,
model.safetensors and the tokenizer files; `model-bf16` is the same model saved in bf16.

Deterministic (fixed seeds). Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/make_tiny_families.py
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

nibble_refcpu.apply(default="avx2")

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MixtralConfig, Phi3Config, Qwen3MoeConfig

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "models" / "tiny-llama"
OUT = ROOT / "tests" / "golden" / "families"


def shape():
    base = json.loads((TOKENIZER / "config.json").read_text())
    return dict(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
        # Larger than transformers' 0.02 so the soft-caps and norms are far from their linear range.
        initializer_range=0.2,
    )


def families():
    # A window shorter than the chats, so sliding layers differ from global ones in training.
    yield "gemma2", Gemma2Config(
        **shape(), sliding_window=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0, final_logit_softcapping=2.0
    )
    yield "gemma3", Gemma3TextConfig(
        **shape(),
        sliding_window=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )


    # Phi-4-mini's shape of RoPE: a quarter of each head passes unrotated; LongRoPE's pretraining
    # length inside the chats' lengths, so some batches take the long factors and some the short.
    phi = {k: v for k, v in shape().items() if k != "head_dim"}
    yield "phi3", Phi3Config(
        **phi,
        partial_rotary_factor=0.75,
        original_max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
            "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        },
    )


    # Mixtures of experts. transformers + bitsandbytes leave the experts in full precision
    # (3-D parameters), nibble stores them in 4 bits: their weights are made NF4 values here
    # (bitsandbytes' quantizer, no double quantization), which 4-bit storage keeps exactly, so both
    # stacks train on the same experts.
    yield "mixtral", MixtralConfig(**{**shape(), "intermediate_size": 96}, num_local_experts=4, num_experts_per_tok=2)
    yield "qwen3moe", Qwen3MoeConfig(
        **shape(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=False
    )


def nf4_values(model):
    """Every expert weight replaced by its NF4 codes (blocksize 64) dequantized."""
    import bitsandbytes.functional as F

    def round_trip(w):
        q, state = F.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4")
        return F.dequantize_4bit(q, state)

    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj") and getattr(m.gate_up_proj, "dim", lambda: 0)() == 3:
                inter = m.gate_up_proj.shape[1] // 2
                for e in range(m.gate_up_proj.shape[0]):
                    for rows in (slice(0, inter), slice(inter, 2 * inter)):
                        m.gate_up_proj[e, rows] = round_trip(m.gate_up_proj[e, rows])
                    m.down_proj[e] = round_trip(m.down_proj[e])


def main():
    for name, cfg in families():
        torch.manual_seed(0)
        cfg.architectures = [type(cfg).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.add_(torch.randn_like(p) * 0.2)
        if name in ("mixtral", "qwen3moe"):
            nf4_values(model)
        for sub, dtype in (("model", torch.float32), ("model-bf16", torch.bfloat16)):
            d = OUT / name / sub
            shutil.rmtree(d, ignore_errors=True)
            model.to(dtype).save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copy(TOKENIZER / f, d / f)
            (d / "generation_config.json").unlink(missing_ok=True)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
