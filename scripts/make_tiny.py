# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "tokenizers"]
# ///
"""Make the shipped tiny default: a synthetic chat dataset, a BPE tokenizer trained on it, and a
randomly initialised Llama-shaped model, so that the main job runs anywhere with no download.

Deterministic (fixed seeds). Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/make_tiny.py
It writes data/tiny-chat.jsonl and models/tiny-llama/ (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json).
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# bitsandbytes' CPU paths as on the AVX2 host the committed files were made on, set before torch
# is imported (docs/reference-cpu-paths.md).
nibble_refcpu.apply(default="avx2")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "tiny-chat.jsonl"
MODEL = ROOT / "models" / "tiny-llama"

# ChatML, the most common template shape; nibble's template tests cover others.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def conversations(n: int, rng: random.Random):
    """Small arithmetic and word tasks: easy enough that a tiny model's loss visibly drops."""
    words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano", "lemon", "cedar"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            w = rng.choice(words)
            q, ans = f"Spell {w} backwards.", f"{w} backwards is {w[::-1]}."
        else:
            w = rng.choice(words)
            q, ans = f"How many letters are in {w}?", f"{w} has {len(w)} letters."
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        if i % 5 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a terse assistant."})
        rows.append({"messages": msgs})
    return rows


def pretrain(model, fast, rows, steps=300, seq=64, batch=16):
    """A short full-parameter "pretraining" on the rows' plain text (no chat markup), so the base
    model knows the words and sums but not the chat format: QLoRA then has something to teach and
    the demo's loss and sample generation show it."""
    ids = []
    for r in rows:
        text = " ".join(m["content"] for m in r["messages"] if m["role"] != "system")
        ids += fast(text, add_special_tokens=False)["input_ids"] + [fast.eos_token_id]
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}")
    model.eval()


def main():
    rng = random.Random(0)
    rows = conversations(240, rng)
    DATA.parent.mkdir(parents=True, exist_ok=True)
    with DATA.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False)
    texts = [m["content"] for r in rows for m in r["messages"]] + ["user", "assistant", "system"]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    MODEL.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(MODEL)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    pretrain(model, fast, rows)
    model.save_pretrained(MODEL, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {DATA.relative_to(ROOT)} ({len(rows)} rows) and {MODEL.relative_to(ROOT)} ({n} parameters)")


if __name__ == "__main__":
    main()
