# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "bitsandbytes==0.50.2", "safetensors==0.8.0"]
# ///
"""Write small random models of every family nibble runs, with transformers' own logits for
them, for crates/model-loader/tests/it/parity.rs.

For each case a folder under the output directory holds the model as transformers saves it
(config.json + model.safetensors) and `expected.safetensors` with `input_ids`, `position_ids`
and transformers' `logits` (fp32). The cases exercise what differs between families: Llama with
llama3 RoPE scaling, tied embeddings and attention/MLP biases; Mistral with a sliding window
shorter than the sequence; Qwen2's q/k/v bias; Qwen3's q/k norms; Gemma 2 (sandwich norms, GeGLU,
scaled embeddings, soft-capped attention scores and logits, alternating sliding layers) and Gemma 3
(q/k norms, per-layer-type RoPE with linear scaling on the global layers); and a Llama loaded in 4 bits by
bitsandbytes (NF4 with double quantization, fp32 compute), whose 4-bit checkpoint is saved too
(`llama-4bit-saved`) so the pre-quantized load path is tested on a file transformers wrote; and
the Mixtral saved the same way (`mixtral-4bit-saved`: attention packed, experts left in float).

The Gemma and Phi-3 cases also hold `logits_4bit`: transformers' fp32 forward with every decoder linear
replaced by its bitsandbytes NF4 codes (double quantization) dequantized, and `greedy_prompt` /
`greedy_tokens`: 20 tokens of transformers' greedy generation from the fp32 model; and
`logits_bf16`, transformers' forward of the same model saved in bf16 (`<family>-bf16`); and
`logits_short`, the fp32 logits of the first 6 positions (within Phi-3's LongRoPE pretraining length).

The 8-bit (LLM.int8) cases: `llama-int8` is a Llama whose norms give a few hidden features large
values (the outlier features LLM.int8 computes in floating point; a small random model has none),
with its fp32 logits; `llama-int8-saved` is that model loaded with `load_in_8bit=True` on the CPU
and saved, with bitsandbytes' logits in eval mode (`logits`, its int8 decomposition), in train mode
(`logits_train`, its CPU training path: dequantize, then linear), and in eval mode with its torch
backend's int8 product scale replaced by the CUDA kernel's (`logits_kernel_scale`, the constant
nibble uses; see crates/quant/src/int8.rs).

Deterministic (fixed seeds). Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_models.py crates/model-loader/tests/golden
or only the 8-bit cases:
    "$NIBBLE_PYTHON" scripts/golden_models.py crates/model-loader/tests/golden --int8
or only some families (their folders alone are rewritten):
    "$NIBBLE_PYTHON" scripts/golden_models.py crates/model-loader/tests/golden --only gemma2,gemma3
"""

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# bitsandbytes' CPU paths as on the AVX2 host the committed files were made on, set before torch
# is imported (docs/reference-cpu-paths.md).
nibble_refcpu.apply(default="avx2")

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen3MoeConfig,
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
    # Small caps so the tanh is far from linear on a random model's scores and logits.
    yield "gemma2", Gemma2Config(
        **COMMON,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=5,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    )
    yield "gemma3", Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=3.0,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )


    # LongRoPE with a pretraining length (8) shorter than the inputs (12): the long factors and
    # the attention factor sqrt(1 + ln 8 / ln 8); rotary on half of each head; tied head.
    yield "phi3", Phi3Config(
        **{k: v for k, v in COMMON.items()},
        partial_rotary_factor=0.5,
        original_max_position_embeddings=8,
        sliding_window=6,
        tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.25], "long_factor": [2.0, 3.5]},
    )


    # Mixtures of experts: Mixtral renormalises its top-2 and weights in f32; Qwen3-MoE (q/k norms)
    # keeps the raw top-2 probabilities (`norm_topk_prob: false`) rounded to the dtype.
    yield "mixtral", MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    yield "qwen3moe", Qwen3MoeConfig(
        **COMMON, head_dim=8, moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2, use_sliding_window=False
    )


GEMMA = ("gemma2", "gemma3", "phi3", "mixtral", "qwen3moe")


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, COMMON["vocab_size"], (2, 12), generator=g)
    pos = torch.arange(12).unsqueeze(0).expand(2, 12).contiguous()
    return ids, pos


def logits_of(model, ids, pos):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits.float().contiguous()


def random_model(cfg):
    torch.manual_seed(0)
    cfg.architectures = [type(cfg).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # from_config leaves norms at one and biases at zero; make them count.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def dequantized_4bit_logits(d: Path, model, ids, pos):
    """transformers' fp32 forward with each decoder linear's weight replaced by its NF4 codes
    (bitsandbytes, double quantization) dequantized."""
    import bitsandbytes as bnb

    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb_cfg, dtype=torch.float32, device_map="cpu")
    deq = {
        name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        for name, m in q.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }
    assert deq, "nothing was quantized"
    import copy

    fp = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in deq.items():
            fp.get_submodule(name).weight.copy_(w)
        # transformers keeps experts as 3-D parameters, which bitsandbytes leaves in full
        # precision; nibble stores each expert's linears in 4 bits: the same codes, made here by
        # bitsandbytes' own quantizer, expert by expert and linear by linear.
        for m in fp.modules():
            if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj") and m.gate_up_proj.dim() == 3:
                inter = m.gate_up_proj.shape[1] // 2
                for e in range(m.gate_up_proj.shape[0]):
                    for rows in (slice(0, inter), slice(inter, 2 * inter)):
                        m.gate_up_proj[e, rows] = nf4_round_trip(m.gate_up_proj[e, rows])
                    m.down_proj[e] = nf4_round_trip(m.down_proj[e])
    return logits_of(fp, ids, pos)


def nf4_round_trip(w):
    """bitsandbytes' NF4 codes of `w` (blocksize 64, double quantization), dequantized."""
    import bitsandbytes.functional as F

    q, state = F.quantize_4bit(w.contiguous().float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    return F.dequantize_4bit(q, state).float()


def greedy(model, ids):
    prompt = ids[:1, :5]
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, min_new_tokens=20
        )
    return prompt.clone(), out[:, prompt.shape[1] :].contiguous()


def int8_cases(out: Path):
    import logging

    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ids, pos = inputs()
    cfg = next(c for name, c in cases() if name == "llama")
    model = random_model(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] = 12.0
            layer.input_layernorm.weight[17] = -9.0
            layer.post_attention_layernorm.weight[5] = 10.0
    model.eval()
    d = out / "llama-int8"
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d)
    save_file({"input_ids": ids, "position_ids": pos, "logits": logits_of(model, ids, pos)}, d / "expected.safetensors")

    q = AutoModelForCausalLM.from_pretrained(
        d, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32, device_map="cpu"
    )
    q.eval()
    logits = logits_of(q, ids, pos)
    outliers = {n: m.state.idx.tolist() for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert any(outliers.values()), "no outlier features: the decomposition is not exercised"
    q.train()
    logits_train = logits_of(q, ids, pos)
    q.eval()
    s = out / "llama-int8-saved"
    shutil.rmtree(s, ignore_errors=True)
    q.save_pretrained(s)

    # The same eval forward with the CUDA kernel's scale of the int8 product (the f32 nearest
    # 1/127^2) in bitsandbytes' torch backend, which otherwise has 6.200124e-05.
    @torch.library.register_kernel("bitsandbytes::int8_mm_dequant", "cpu")
    def _(A, row_stats, col_stats, dtype=None, bias=None):
        out = A.view(-1, A.shape[-1]) * (row_stats.reshape(-1).unsqueeze(-1) * col_stats.reshape(-1).unsqueeze(0)) * 6.200012e-05
        if bias is not None:
            out += bias
        return out.to(dtype or torch.float16)

    logits_kernel = logits_of(q, ids, pos)
    assert not torch.equal(logits_kernel, logits)
    save_file(
        {
            "input_ids": ids,
            "position_ids": pos,
            "logits": logits,
            "logits_train": logits_train,
            "logits_kernel_scale": logits_kernel,
        },
        s / "expected.safetensors",
    )
    for f in out.rglob("generation_config.json"):
        f.unlink()
    print("outlier columns per layer:", {k: v for k, v in outliers.items() if v})


def main(out: Path, only=None):
    out.mkdir(parents=True, exist_ok=True)
    ids, pos = inputs()
    for name, cfg in cases():
        if only is not None and name not in only:
            continue
        model = random_model(cfg)
        model.eval()
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        model.save_pretrained(d)
        expected = {"input_ids": ids, "position_ids": pos, "logits": logits_of(model, ids, pos)}
        if name in GEMMA:
            expected["logits_4bit"] = dequantized_4bit_logits(d, model, ids, pos)
            expected["greedy_prompt"], expected["greedy_tokens"] = greedy(model, ids)
            # Within the pretraining length (LongRoPE's short factors).
            expected["logits_short"] = logits_of(model, ids[:, :6], pos[:, :6])
            # The bf16-saved copy and transformers' bf16 forward of it.
            b = out / f"{name}-bf16"
            shutil.rmtree(b, ignore_errors=True)
            model.to(torch.bfloat16).save_pretrained(b)  # in place: the fp32 results come first
            # Loaded as a user loads it (an in-memory `.to(bfloat16)` would round the RoPE
            # frequency buffers too, which a load in bf16 keeps in f32).
            bf16 = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16)
            bf16.eval()
            expected["logits_bf16"] = logits_of(bf16, ids, pos)
        save_file(expected, d / "expected.safetensors")
    if only is not None:
        if "mixtral-4bit-saved" in only:
            mixtral_4bit_saved(out, BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ))
        for f in out.rglob("generation_config.json"):
            f.unlink()
        print(f"wrote {', '.join(sorted(only))} under {out}")
        return

    # The same Llama through bitsandbytes: quantized while loading, then saved pre-quantized.
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q = AutoModelForCausalLM.from_pretrained(out / "llama", quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    q.eval()
    nibble_refcpu.portable_4bit(q)  # no AVX512-BF16 repacking before the save (docs/reference-cpu-paths.md)
    d = out / "llama-4bit-saved"
    shutil.rmtree(d, ignore_errors=True)
    q.save_pretrained(d)
    save_file({"input_ids": ids, "position_ids": pos, "logits": logits_of(q, ids, pos)}, d / "expected.safetensors")
    mixtral_4bit_saved(out, bnb)
    for f in out.rglob("generation_config.json"):
        f.unlink()
    int8_cases(out)
    print(f"wrote {out}")


def mixtral_4bit_saved(out: Path, bnb):
    """The golden Mixtral loaded in 4 bits by transformers + bitsandbytes and saved: its attention
    packed, its experts (3-D parameters bitsandbytes leaves alone) in float under their
    per-expert names, as transformers writes such a model."""
    q = AutoModelForCausalLM.from_pretrained(out / "mixtral", quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    q.eval()
    nibble_refcpu.portable_4bit(q)
    d = out / "mixtral-4bit-saved"
    shutil.rmtree(d, ignore_errors=True)
    q.save_pretrained(d)
    for f in d.rglob("generation_config.json"):
        f.unlink()


if __name__ == "__main__":
    argv = sys.argv[1:]
    only = None
    if "--only" in argv:
        i = argv.index("--only")
        only = set(argv[i + 1].split(","))
        del argv[i : i + 2]
    args = [a for a in argv if a != "--int8"]
    target = Path(args[0] if args else "crates/model-loader/tests/golden")
    if "--int8" in argv:
        int8_cases(target)
    else:
        main(target, only)
