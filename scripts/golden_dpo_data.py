# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "datasets"]
# ///
"""TRL 1.16 DPOTrainer's preparation of preference rows, for crates/data/tests/preference.rs.

Groups of rows (text and conversational, explicit and implicit prompts, a prompt whose last token
merges with the completion's first) go through DPOTrainer's own dataset preparation with the
shipped tiny model's tokenizer and chat template; the file records each row's prompt, chosen and
rejected ids, the rows dropped by `max_length`, and the collated batches of the first rows under
both truncation modes.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_dpo_data.py > crates/data/tests/golden/dpo_data.json
"""

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

nibble_refcpu.apply(default="avx2")

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/tiny-llama"
OUT = Path(os.environ.get("TMPDIR", "/tmp")) / "nibble-golden-dpo-data"


def msg(role, content):
    return {"role": role, "content": content}


GROUPS = {
    "text_explicit": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "Sun ho", "chosen": "t", "rejected": "use"},
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "Why is the cat on the mat", "chosen": " because it sat.", "rejected": " no<|im_end|>"},
    ],
    "text_implicit": [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "abc", "rejected": "abcdef"},
        {"chosen": "the dog ran far", "rejected": "the dog sat"},
    ],
    "conv_explicit": [
        {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "Yo")], "rejected": [msg("assistant", "Go away")]},
        {
            "prompt": [msg("system", "Be brief."), msg("user", "Name a colour"), msg("assistant", "red"), msg("user", "another")],
            "chosen": [msg("assistant", "blue")],
            "rejected": [msg("assistant", "I will not")],
        },
    ],
    "conv_implicit": [
        {
            "chosen": [msg("user", "What is 2+2?"), msg("assistant", "4")],
            "rejected": [msg("user", "What is 2+2?"), msg("assistant", "5")],
        },
        {
            "chosen": [msg("user", "Hi"), msg("assistant", "Hello there")],
            "rejected": [msg("user", "Hi"), msg("assistant", "Bye")],
        },
    ],
}


def prepare(tok, rows, **kw):
    args = DPOConfig(output_dir=str(OUT), use_cpu=True, bf16=False, report_to=[], **kw)
    trainer = DPOTrainer(model=str(MODEL), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    return trainer


def main():
    tok = AutoTokenizer.from_pretrained(MODEL)
    out = {"pad_token_id": tok.pad_token_id, "groups": {}}
    for name, rows in GROUPS.items():
        t = prepare(tok, rows, max_length=None)
        ds = t.train_dataset
        ids = [{k: ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ds))]
        batches = {}
        for mode, extra in (("keep_start", {}), ("keep_end", {"pad_to_multiple_of": 8})):
            tt = prepare(tok, rows, max_length=12, truncation_mode=mode, **extra)
            kept = len(tt.train_dataset)
            batch = tt.data_collator([tt.train_dataset[i] for i in range(min(2, kept))])
            batches[mode] = {
                "kept": kept,
                "input_ids": batch["input_ids"].tolist(),
                "completion_mask": batch["completion_mask"].tolist(),
                "attention_mask": batch["attention_mask"].tolist(),
            }
        out["groups"][name] = {"rows": rows, "ids": ids, "max_length": 12, "batches": batches}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
