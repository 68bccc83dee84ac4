# /// script
# requires-python = ">=3.11"
# dependencies = ["trl==1.16.0", "transformers==5.24.0", "datasets", "numpy"]
# ///
"""Prepare small datasets with TRL's own SFTTrainer (tokenization, masks, truncation, packing) and
collate them with its DataCollatorForLanguageModeling, as golden data for nibble's data pipeline
(crates/data/src/, checked by crates/data/tests/tokenize.rs). Also numpy's seeded permutations,
which `shuffle_dataset` uses through `datasets.Dataset.shuffle`.

Regenerate (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_tokenize.py > crates/data/tests/golden/tokenize.json

Deterministic: no randomness beyond fixed seeds; runs on CPU in well under a minute.
"""

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/tiny-llama"
CHAT = ROOT / "data/tiny-chat.jsonl"

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()
logging.disable(logging.WARNING)
warnings.filterwarnings("ignore")

# ChatML with {% generation %} around assistant replies (the end-of-turn token inside), tools in a
# system block and an optional `note` template variable (from `chat_template_kwargs`).
GEN_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    "{% if note is defined %}{{ '# ' + note + ' ' + eos_token + ' ' + pad_token }}{% endif %}"
)

# Tokenizer variants: a post-processor swapped into tokenizer.json (the shipped one adds
# nothing), and keys merged into tokenizer_config.json.
BOS = {"SpecialToken": {"id": "<s>", "type_id": 0}}
EOS = {"SpecialToken": {"id": "</s>", "type_id": 0}}
A = {"Sequence": {"id": "A", "type_id": 0}}
B = {"Sequence": {"id": "B", "type_id": 1}}
SPECIALS = {
    "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
    "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
}
TOKENIZERS = {
    "base": {},
    "bos": {"post_processor": {"type": "TemplateProcessing", "single": [BOS, A], "pair": [BOS, A, B],
                               "special_tokens": {"<s>": SPECIALS["<s>"]}}},
    "bos_eos": {"post_processor": {"type": "TemplateProcessing", "single": [BOS, A, EOS], "pair": [A, B],
                                   "special_tokens": SPECIALS}},
    # With a tokenizer.json, transformers drops these flags: no bos/eos is added.
    "flags": {"config": {"add_bos_token": True, "add_eos_token": True}},
    "flags_no_post_processor": {"post_processor": None, "config": {"add_bos_token": True, "add_eos_token": True}},
}

TEXT = [
    {"text": "The quick brown fox."},
    {"text": "Ünïcode — naïve café ✓"},
    {"text": "already ends with eos<|im_end|>"},
    {"text": "short"},
    {"text": "  spaces  and\nnewlines\n"},
]

PROMPT_COMPLETION = [
    {"prompt": "What is 2 plus 2?", "completion": " 4."},
    {"prompt": "Spell cat backwards:", "completion": " tac<|im_end|>"},
    {"prompt": "Hello", "completion": "world"},
    {"prompt": "A very long prompt that goes on and on and on", "completion": " end"},
    {"prompt": "Q", "completion": " a long completion that goes on and on"},
]

CONV_PROMPT_COMPLETION = [
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    {
        "prompt": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "What is 3 plus 4?"},
        ],
        "completion": [{"role": "assistant", "content": "7."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"},
        ],
        "completion": [{"role": "assistant", "content": "Blue."}],
    },
]

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "b": "int"}}}]

CHAT_TOOLS = [
    {
        "messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}],
        "tools": TOOLS,
        "chat_template_kwargs": {"note": "n1"},
    },
    {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        "tools": None,
        "chat_template_kwargs": {"note": "n2"},
    },
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        "tools": TOOLS,
        "chat_template_kwargs": {"note": "n3"},
    },
]

# Tools stored as JSON text, which TRL decodes.
CHAT_TOOLS_STRING = [dict(row, tools=json.dumps(TOOLS) if row["tools"] else None) for row in CHAT_TOOLS]

NO_ASSISTANT = [{"messages": [{"role": "user", "content": "Hi"}]}]


def synthetic(n):
    """Text rows of varied lengths; crates/data/tests/tokenize.rs builds the same."""
    return [{"text": f"row {i}: " + "word " * (i % 17)} for i in range(n)]


def chat(n):
    return {"file": "data/tiny-chat.jsonl", "take": n}


def load_rows(source):
    if isinstance(source, dict) and "file" in source:
        with open(ROOT / source["file"]) as f:
            return [json.loads(line) for line in f if line.strip()][: source["take"]]
    if isinstance(source, dict) and "synthetic" in source:
        return synthetic(source["synthetic"])
    return source


# name, tokenizer variant, chat template (None: the tokenizer's), rows, SFTConfig overrides,
# collator batch size, whether to store the prepared rows in full (else a digest).
CASES = [
    ("chat_default", "base", None, chat(8), {}, 3),
    ("chat_assistant_only", "base", "gen", chat(8), {"assistant_only_loss": True}, 4),
    ("chat_tools_kwargs", "base", "gen", CHAT_TOOLS, {"assistant_only_loss": True}, 2),
    ("chat_tools_kwargs_full_loss", "base", "gen", CHAT_TOOLS, {}, 3),
    ("chat_tools_string", "base", "gen", CHAT_TOOLS_STRING, {"assistant_only_loss": True}, 3),
    ("chat_tools_overrides", "base", "gen", CHAT_TOOLS,
     {"eos_token": "</s>", "pad_token": "<unk>", "assistant_only_loss": True}, 3),
    ("chat_bos_eos_post_processor", "bos_eos", None, chat(3), {}, 3),
    ("text_default", "base", None, TEXT, {}, 2),
    ("text_bos_eos_override", "bos", None, TEXT, {"eos_token": "</s>", "pad_token": "<unk>"}, 3),
    ("text_pad_multiple", "base", None, TEXT, {"pad_to_multiple_of": 8}, 2),
    ("text_config_flags_ignored", "flags", None, TEXT, {}, 5),
    ("text_no_post_processor", "flags_no_post_processor", None, TEXT, {}, 5),
    ("pc_default", "base", None, PROMPT_COMPLETION, {}, 2),
    ("pc_full_loss", "base", None, PROMPT_COMPLETION, {"completion_only_loss": False}, 2),
    ("pc_bos_eos", "bos_eos", None, PROMPT_COMPLETION, {}, 5),
    ("conv_pc", "base", None, CONV_PROMPT_COMPLETION, {}, 2),
    ("conv_pc_assistant_only", "base", "gen", CONV_PROMPT_COMPLETION, {"assistant_only_loss": True}, 3),
    ("conv_pc_bos_eos_assistant_only", "bos_eos", "gen", CONV_PROMPT_COMPLETION, {"assistant_only_loss": True}, 3),
    ("conv_pc_assistant_full", "base", "gen", CONV_PROMPT_COMPLETION,
     {"assistant_only_loss": True, "completion_only_loss": False}, 3),
    ("pc_trunc_keep_start", "base", None, PROMPT_COMPLETION, {"max_length": 6}, 2),
    ("pc_trunc_keep_end", "base", None, PROMPT_COMPLETION, {"max_length": 6, "truncation_mode": "keep_end"}, 2),
    ("chat_trunc_keep_end", "base", "gen", chat(6),
     {"max_length": 16, "truncation_mode": "keep_end", "assistant_only_loss": True}, 3),
    ("chat_trunc_keep_start_drops", "base", "gen", chat(6), {"max_length": 20, "assistant_only_loss": True}, 3),
    ("pack_bfd", "base", None, chat(20), {"packing": True, "max_length": 64}, 2),
    ("pack_bfd_pad_multiple", "base", None, chat(12),
     {"packing": True, "max_length": 64, "pad_to_multiple_of": 16}, 3),
    ("pack_bfd_truncates", "base", None, chat(12), {"packing": True, "max_length": 20}, 2),
    ("pack_bfd_split", "base", None, chat(12), {"packing": True, "packing_strategy": "bfd_split", "max_length": 20}, 2),
    ("pack_wrapped", "base", None, chat(12), {"packing": True, "packing_strategy": "wrapped", "max_length": 32}, 2),
    ("pack_wrapped_padding_free", "base", None, chat(12),
     {"packing": True, "packing_strategy": "wrapped", "max_length": 32, "padding_free": True}, 2),
    ("pack_bfd_assistant_only", "base", "gen", chat(10),
     {"packing": True, "max_length": 48, "assistant_only_loss": True}, 2),
    ("padding_free_text", "base", None, TEXT, {"padding_free": True, "max_length": None, "pad_to_multiple_of": 8}, 3),
    ("pack_shuffle", "base", None, chat(20), {"packing": True, "max_length": 64, "shuffle_dataset": True, "seed": 7}, 2),
    ("shuffle_unpacked", "base", None, chat(10), {"shuffle_dataset": True, "seed": 3}, 4),
    ("many_wrapped", "base", None, {"synthetic": 1100}, {"packing": True, "packing_strategy": "wrapped", "max_length": 50}, None),
    ("many_bfd", "base", None, {"synthetic": 2100}, {"packing": True, "max_length": 64}, None),
    ("many_bfd_split", "base", None, {"synthetic": 1500},
     {"packing": True, "packing_strategy": "bfd_split", "max_length": 16}, None),
    ("num_proc_bfd", "base", None, {"synthetic": 30}, {"packing": True, "max_length": 40, "dataset_num_proc": 3}, None),
    # TRL refuses these.
    ("err_padding_free_truncation", "base", None, TEXT, {"padding_free": True}, 2),
    ("err_assistant_only_text", "base", "gen", TEXT, {"assistant_only_loss": True}, 2),
    ("err_packing_no_max_length", "base", None, TEXT, {"packing": True, "max_length": None}, 2),
    ("err_no_assistant_tokens", "base", "gen", NO_ASSISTANT, {"assistant_only_loss": True}, 2),
    ("err_eos_not_in_vocab", "base", None, TEXT, {"eos_token": "<nope>"}, 2),
]


def tokenizer_dir(kind, tmp):
    d = Path(tmp) / f"tok-{kind}"
    if d.exists():
        return d
    d.mkdir()
    variant = TOKENIZERS[kind]
    tj = json.loads((MODEL / "tokenizer.json").read_text())
    if "post_processor" in variant:
        tj["post_processor"] = variant["post_processor"]
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    cfg.update(variant.get("config", {}))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text((MODEL / "chat_template.jinja").read_text())
    return d


def digest(rows):
    text = json.dumps(rows, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def run_case(name, tok_kind, template, source, overrides, batch, tmp):
    rows = load_rows(source)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(tok_kind, tmp))
    if template == "gen":
        tok.chat_template = GEN_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    kwargs = {"max_length": 1024, **overrides}
    args = SFTConfig(output_dir=str(Path(tmp) / "out"), report_to="none", use_cpu=True, bf16=False, **kwargs)
    case = {
        "name": name,
        "tokenizer": tok_kind,
        "template": template,
        "rows": source,
        "config": overrides,
        "batch_size": batch,
    }
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    except (ValueError, RuntimeError) as e:
        case["error"] = f"{type(e).__name__}: {e}"
        return case
    ds = trainer.train_dataset
    prepared = [
        {k: ds[i][k] for k in ("input_ids", "labels", "seq_lengths") if k in ds.column_names} for i in range(len(ds))
    ]
    case["num_rows"] = len(prepared)
    if batch is None:
        # Large cases: a digest of the samples (compact JSON, as crates/data/tests/tokenize.rs
        # writes them) and their total length.
        case["digest"] = digest(prepared)
        case["num_tokens"] = sum(len(r["input_ids"]) for r in prepared)
        return case
    case["prepared"] = prepared
    batches = []
    for start in range(0, len(ds), batch):
        out = trainer.data_collator([ds[i] for i in range(start, min(start + batch, len(ds)))])
        batches.append(
            {
                k: out[k].tolist()
                for k in ("input_ids", "labels", "position_ids", "attention_mask")
                if k in out
            }
        )
    case["batches"] = batches
    return case


def permutations():
    out = []
    for entropy, n in [(42, 10), (0, 1), (7, 100), (2**32 + 5, 33), (123456789012, 1000), ([42, 3], 17), (3, 0)]:
        perm = np.random.default_rng(entropy).permutation(n).tolist()
        out.append({"entropy": entropy if isinstance(entropy, list) else [entropy], "n": n, "permutation": perm})
    return out


def main():
    out = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
                     "numpy": np.__version__},
        "gen_template": GEN_TEMPLATE,
        "tokenizers": TOKENIZERS,
        "permutations": permutations(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for spec in CASES:
            out["cases"].append(run_case(*spec, tmp))
    # One case per line keeps diffs readable and the file small.
    sys.stdout.write("{\n")
    keys = list(out)
    for i, k in enumerate(keys):
        sys.stdout.write(f" {json.dumps(k)}: ")
        if k == "cases":
            sys.stdout.write("[\n")
            sys.stdout.write(",\n".join("  " + json.dumps(c, ensure_ascii=False) for c in out[k]))
            sys.stdout.write("\n ]")
        else:
            sys.stdout.write(json.dumps(out[k], ensure_ascii=False))
        sys.stdout.write(",\n" if i + 1 < len(keys) else "\n")
    sys.stdout.write("}\n")


if __name__ == "__main__":
    main()
