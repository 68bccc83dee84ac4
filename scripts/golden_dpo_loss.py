# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "datasets"]
# ///
"""TRL 1.16 DPOTrainer's loss and metrics for every loss type, for crates/sft/src/train/dpo.rs.

On the shipped tiny model: a policy (the model with seeded noise on every weight) and the
reference (the model as shipped, which TRL reloads from its folder), one collated batch of three
preference pairs. For each case TRL's own `compute_loss` gives the loss and metrics; beside them
the file records what nibble's loss function takes as input, computed here from the same two
models: each sequence's summed completion log-probs (policy and reference), completion token
counts, the chosen tokens' mean negative log-prob (the `sft` term) and WPO's sequence weights.
The test feeds those inputs to nibble's loss and compares with TRL's numbers; the collated batch
itself is recorded too, so nibble's own log-probs of the shipped model can be checked against the
reference's.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_dpo_loss.py > crates/sft/tests/golden/dpo_loss.json
"""

import json
import os
import random
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

nibble_refcpu.apply(default="avx2")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/tiny-llama"
OUT = Path(os.environ.get("TMPDIR", "/tmp")) / "nibble-golden-dpo"


def rows():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "red", "blue"]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    return [
        {"prompt": text(rng.randint(2, 5)), "chosen": " " + text(rng.randint(1, 6)), "rejected": " " + text(rng.randint(1, 6))}
        for _ in range(3)
    ]


def inputs(policy, reference, batch):
    """What nibble's loss takes: per-sequence sums, counts, the sft term and WPO weights."""
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    b = ids.shape[0] // 2

    def per_token(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=am).logits.float()[:, :-1]
        logp = logits.log_softmax(-1)
        tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = cm[:, 1:].float()
        return tok * mask, mask, torch.logsumexp(2 * logp, -1)

    tok, mask, logsumsq = per_token(policy)
    ref_tok, _, _ = per_token(reference)
    sums, ref_sums = tok.sum(1), ref_tok.sum(1)
    counts = cm.sum(1).clamp(min=1).float()
    weights = torch.exp((tok - logsumsq * mask).sum(1) / mask.sum(1).clamp(min=1))
    return {
        "input_ids": ids.tolist(),
        "attention_mask": am.tolist(),
        "completion_mask": cm.tolist(),
        "chosen": sums[:b].tolist(),
        "rejected": sums[b:].tolist(),
        "ref_chosen": ref_sums[:b].tolist(),
        "ref_rejected": ref_sums[b:].tolist(),
        "chosen_tokens": counts[:b].tolist(),
        "rejected_tokens": counts[b:].tolist(),
        "chosen_nll": (-(tok[:b].sum() / mask[:b].sum())).item(),
        "weights": weights.tolist(),
    }


CASES = [
    {"loss_type": [t]}
    for t in [
        "sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ]
] + [
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["aot"], "label_smoothing": 0.2},
    {"loss_type": ["sigmoid"], "beta": 0.5},
    {"loss_type": ["ipo"], "beta": 0.5},
    {"loss_type": ["discopop"], "discopop_tau": 0.3},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["ipo"], "use_weighting": True},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
]


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    ds = Dataset.from_list(rows())
    reference = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = policy.state_dict()
    batch = None
    cases = []
    for case in CASES:
        args = DPOConfig(
            output_dir=str(OUT), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
            per_device_train_batch_size=3, logging_steps=1, **case,
        )
        trainer = DPOTrainer(model=str(MODEL), args=args, train_dataset=ds, processing_class=tok)
        trainer.model.load_state_dict(state, strict=False)
        trainer.model.train()
        if batch is None:
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        loss = trainer.compute_loss(trainer.model, batch).item()
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
        cases.append({"config": case, "loss": loss, "metrics": metrics})
    print(json.dumps({"inputs": inputs(policy, reference, batch), "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
