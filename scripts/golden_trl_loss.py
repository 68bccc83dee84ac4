# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "peft==0.21.2", "bitsandbytes==0.50.2", "datasets", "pyyaml"]
# ///
"""TRL's loss curve for tests/golden/trl_loss/recipe.yaml, for tests/trl_loss.rs.

Makes the shared initial adapter with PEFT (`init_adapter/`, default LoRA init, seeded), then
trains it with TRL 1.16's SFTTrainer on transformers + bitsandbytes' 4-bit tiny model exactly as
the recipe says, and writes the per-step loss and gradient norm to `trl_log.json`; then again with
the Trainer's default shuffled order (`train_sampling_strategy: random`, accelerate's seedable
sampler) to `trl_log_random.json`.

One deliberate change to TRL's defaults: SFTTrainer casts a quantized model's LoRA weights to
bf16; here they are restored to their exact fp32 values, since nibble keeps adapters in fp32
(PEFT's default) and the comparison is of the training maths, not of bf16 rounding.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_trl_loss.py
Another golden folder with its own recipe.yaml (the per-family curves, dataset order only):
    "$NIBBLE_PYTHON" scripts/golden_trl_loss.py tests/golden/families/gemma2 --sequential-only
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# bitsandbytes' CPU paths as on the AVX2 host the committed files were made on, set before torch
# is imported (docs/reference-cpu-paths.md).
nibble_refcpu.apply(default="avx2")

import torch
import yaml
from datasets import load_dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests/golden/trl_loss"


def main():
    global GOLDEN
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        GOLDEN = (ROOT / args[0]).resolve()
    r = yaml.safe_load((GOLDEN / "recipe.yaml").read_text())
    model_dir = ROOT / r["model_name_or_path"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=r["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=r.get("use_bnb_nested_quant", False),
        bnb_4bit_compute_dtype=torch.float32,
    )

    def base():
        return AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=bnb, dtype=torch.float32, device_map="cpu"
        )

    # The shared starting point.
    torch.manual_seed(r["seed"])
    lcfg = LoraConfig(
        r=r["lora_r"],
        lora_alpha=r["lora_alpha"],
        lora_dropout=r["lora_dropout"],
        target_modules=r["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    init = get_peft_model(base(), lcfg)
    init.save_pretrained(GOLDEN / "init_adapter")
    for extra in (GOLDEN / "init_adapter").glob("README.md"):
        extra.unlink()

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=str(ROOT / r["dataset_name"]), split="train")
    # The recipe's order (dataset order), then the Trainer's default shuffled one.
    runs = [(r["train_sampling_strategy"], "trl_log.json"), ("random", "trl_log_random.json")]
    if "--sequential-only" in sys.argv[1:]:
        runs = runs[:1]
    for strategy, name in runs:
        train(r, base, tok, data, strategy, GOLDEN / name)


def train(r, base, tok, data, strategy, log_path):
    model = PeftModel.from_pretrained(base(), GOLDEN / "init_adapter", is_trainable=True)
    args = SFTConfig(
        output_dir=str(GOLDEN / ".trl-run"),
        max_length=r["max_length"],
        per_device_train_batch_size=r["per_device_train_batch_size"],
        gradient_accumulation_steps=r["gradient_accumulation_steps"],
        learning_rate=r["learning_rate"],
        lr_scheduler_type=r["lr_scheduler_type"],
        warmup_steps=r["warmup_steps"],
        weight_decay=r["weight_decay"],
        max_grad_norm=r["max_grad_norm"],
        max_steps=r["max_steps"],
        logging_steps=r["logging_steps"],
        save_strategy="no",
        gradient_checkpointing=r["gradient_checkpointing"],
        train_sampling_strategy=strategy,
        seed=r["seed"],
        # A mixture of experts' load-balancing loss (TRL's default: the model config's coefficient).
        **({"router_aux_loss_coef": r["router_aux_loss_coef"]} if "router_aux_loss_coef" in r else {}),
        bf16=False,
        use_cpu=True,
        report_to="none",
        dataset_num_proc=None,
    )
    exact = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    # Undo SFTTrainer's bf16 cast of the adapter, values included (a cast back would keep the
    # bf16 rounding of A).
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            p.data = exact[n].clone()
    trainer.train()
    log = [
        {"step": e["step"], "loss": e["loss"], "grad_norm": float(e["grad_norm"]), "learning_rate": e["learning_rate"]}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    import shutil

    shutil.rmtree(GOLDEN / ".trl-run", ignore_errors=True)
    print(json.dumps(log))


if __name__ == "__main__":
    main()
