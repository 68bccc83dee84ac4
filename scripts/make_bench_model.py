# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "safetensors"]
# ///
"""Make a randomly initialised Llama-shaped model for `cargo xtask bench`: bf16, sharded
safetensors with transformers' index, and the shipped tiny tokenizer (models/tiny-llama), whose
ids all fall inside the larger vocabulary (the embedding rows past the tokenizer are never read,
as with any model whose vocabulary is padded).

Presets:
    150m  12 layers, hidden 768, intermediate 2048, 12 heads (12 kv), vocab 32000 (134M parameters)
    1b    22 layers, hidden 2048, intermediate 5632, 32 heads (4 kv), vocab 32000 (TinyLlama's
          shape, 1.10B parameters)
    moe   a Mixtral: 4 layers, hidden 1024, 8 experts of width 2048 (top-2), 8 heads (4 kv), vocab
          32000 (270M parameters, 201M of them in the experts)

Deterministic (seed 0, weights drawn N(0, 0.02) in f32 per tensor in a fixed order, then cast):
the same preset gives the same bytes. Written to a temporary folder renamed into place, so an
interrupted run leaves nothing that looks finished. `cargo xtask bench` calls it when the model is
missing; by hand (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/make_bench_model.py 150m ~/.cache/nibble/bench/llama-150m
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]

PRESETS = {
    "150m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, shard="100MB"),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, shard="500MB"),
    "moe": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, shard="200MB"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    shard = p.pop("shard")
    tiny = ROOT / "models" / "tiny-llama"
    tiny_cfg = LlamaConfig.from_pretrained(tiny)
    moe = "num_local_experts" in p
    Config, Model = (MixtralConfig, MixtralForCausalLM) if moe else (LlamaConfig, LlamaForCausalLM)
    config = Config(
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tiny_cfg.bos_token_id,
        eos_token_id=tiny_cfg.eos_token_id,
        pad_token_id=tiny_cfg.pad_token_id,
        **p,
    )
    config.architectures = [Model.__name__]
    with torch.device("meta"):
        model = Model(config)
    # Materialise in bf16, drawing each tensor in f32 from one seeded generator in name order
    # (independent of transformers' init order, which may change between versions).
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("norm.weight"):
            state[name] = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
    model.load_state_dict(state, assign=True)
    model.config.dtype = torch.bfloat16
    n = sum(t.numel() for t in state.values())

    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard)
    for f in TOKENIZER_FILES:
        if (tiny / f).is_file():
            shutil.copy(tiny / f, tmp / f)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"wrote {args.out} ({args.preset}: {n} parameters, bf16, shards of at most {shard})", file=sys.stderr)


if __name__ == "__main__":
    main()
