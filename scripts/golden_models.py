# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "bitsandbytes==0.50.2", "safetensors==0.8.0"]
# ///
"""Write small random models of every family nibble runs, with transformers' own logits for
them, for crates/model-loader/tests/parity.rs.

For each case a folder under the output directory holds the model as transformers saves it
(config.json + model.safetensors) and `expected.safetensors` with `input_ids`, `position_ids`
and transformers' `logits` (fp32). The cases exercise what differs between families: Llama with
llama3 RoPE scaling, tied embeddings and attention/MLP biases; Mistral with a sliding window
shorter than the sequence; Qwen2's q/k/v bias; Qwen3's q/k norms; and a Llama loaded in 4 bits by
bitsandbytes (NF4 with double quantization, fp32 compute), whose 4-bit checkpoint is saved too
(`llama-4bit-saved`) so the pre-quantized load path is tested on a file transformers wrote.

Deterministic (fixed seeds). Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_models.py crates/model-loader/tests/golden
"""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def cases():
    yield "llama", LlamaConfig(
        **COMMON,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    yield "mistral", MistralConfig(**COMMON, sliding_window=5, head_dim=8)
    yield "qwen2", Qwen2Config(**COMMON, use_sliding_window=False)
    yield "qwen3", Qwen3Config(**COMMON, head_dim=8, use_sliding_window=False)


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, COMMON["vocab_size"], (2, 12), generator=g)
    pos = torch.arange(12).unsqueeze(0).expand(2, 12).contiguous()
    return ids, pos


def logits_of(model, ids, pos):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits.float().contiguous()


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    ids, pos = inputs()
    for name, cfg in cases():
        torch.manual_seed(0)
        cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        # from_config leaves norms at one and biases at zero; make them count.
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight") or pname.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.2)
        model.eval()
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        save_file({"input_ids": ids, "position_ids": pos, "logits": logits_of(model, ids, pos)}, d / "expected.safetensors")

    # The same Llama through bitsandbytes: quantized while loading, then saved pre-quantized.
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q = AutoModelForCausalLM.from_pretrained(out / "llama", quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    q.eval()
    d = out / "llama-4bit-saved"
    shutil.rmtree(d, ignore_errors=True)
    q.save_pretrained(d)
    save_file({"input_ids": ids, "position_ids": pos, "logits": logits_of(q, ids, pos)}, d / "expected.safetensors")
    for f in out.rglob("generation_config.json"):
        f.unlink()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "crates/model-loader/tests/golden"))
