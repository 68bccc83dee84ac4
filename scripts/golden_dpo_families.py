# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "peft==0.21.2", "bitsandbytes==0.50.2", "datasets", "pyyaml"]
# ///
"""TRL's DPO curve on a mixture of experts, for tests/dpo_trl.rs: the recipe
tests/golden/families/mixtral/dpo_recipe.yaml trained by TRL 1.16's DPOTrainer on transformers +
bitsandbytes' 4-bit tiny Mixtral (its experts hold NF4 values, scripts/make_tiny_families.py, so
transformers' float experts equal nibble's 4-bit ones), from the family's PEFT adapter (all-linear:
attention, router and both expert banks; the reference is TRL's frozen "ref" copy of it), with
the router's load-balancing loss. Writes each step's loss, gradient norm, learning rate, rewards,
log-probs and `aux_loss` to `trl_dpo_log.json` beside the recipe.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_dpo_families.py
"""

import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# bitsandbytes' CPU paths as on the AVX2 host (docs/reference-cpu-paths.md), set before torch.
nibble_refcpu.apply(default="avx2")

import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests/golden/families/mixtral"
KEYS = ["loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "logps/chosen", "logps/rejected", "aux_loss"]


def main():
    r = yaml.safe_load((GOLDEN / "dpo_recipe.yaml").read_text())
    model_dir = ROOT / r["model_name_or_path"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=r["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=r["use_bnb_nested_quant"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    model = PeftModel.from_pretrained(base, ROOT / r["lora_init_adapter"], is_trainable=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=str(ROOT / r["dataset_name"]), split="train")
    run_dir = GOLDEN / ".trl-dpo-run"
    args = DPOConfig(
        output_dir=str(run_dir),
        beta=r["beta"],
        loss_type=[r["loss_type"]],
        max_length=r["max_length"],
        per_device_train_batch_size=r["per_device_train_batch_size"],
        gradient_accumulation_steps=r["gradient_accumulation_steps"],
        learning_rate=r["learning_rate"],
        lr_scheduler_type=r["lr_scheduler_type"],
        warmup_steps=r["warmup_steps"],
        max_grad_norm=r["max_grad_norm"],
        max_steps=r["max_steps"],
        logging_steps=r["logging_steps"],
        save_strategy="no",
        gradient_checkpointing=r["gradient_checkpointing"],
        train_sampling_strategy=r["train_sampling_strategy"],
        seed=r["seed"],
        router_aux_loss_coef=r["router_aux_loss_coef"],
        bf16=False,
        use_cpu=True,
        report_to="none",
    )
    exact = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    # Undo any bf16 cast of the adapter (nibble keeps adapters in fp32, PEFT's default).
    for n, p in trainer.model.named_parameters():
        if p.requires_grad and n in exact:
            p.data = exact[n].clone()
    assert trainer.aux_loss_enabled, "TRL did not turn the router loss on"
    trainer.train()
    log = [{"step": e["step"], **{k: float(e[k]) for k in KEYS}} for e in trainer.state.log_history if "loss" in e]
    (GOLDEN / "trl_dpo_log.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(log[:2]))


if __name__ == "__main__":
    main()
