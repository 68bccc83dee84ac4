# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "peft==0.21.2", "bitsandbytes==0.50.2", "datasets", "pyyaml"]
# ///
"""TRL's DPO curves for tests/golden/dpo_trl/recipe.yaml, for tests/dpo_trl.rs.

Makes the shared initial adapter with PEFT (`init_adapter/`: seeded, `init_lora_weights=False`
with B scaled down, so that the adapter is a small step from the base), then trains it with TRL
1.16's DPOTrainer on transformers + bitsandbytes' 4-bit tiny model as the recipe says (quantized by
bitsandbytes once and saved in `base-nf4/`, and in bf16 in `base-nf4-bf16/`), once per
variant (loss `sigmoid` / `ipo`, with and without `precompute_ref_log_probs`, fp32 and bf16,
LD-DPO's `ld_alpha`), and writes each step's loss, gradient norm, learning rate, rewards, log-probs, mean logits, entropy
and token accuracy to `trl_<variant>.json`. Given a model that already carries an adapter,
DPOTrainer scores the reference with a frozen copy of it (its "ref" adapter), as nibble does for
`lora_init_adapter`.

The fp32 variants' files are committed. The bf16 ones are not: a bf16 product rounds as the host's
kernels round (AMX, AVX-512 or AVX2 paths), so tests/dpo_trl.rs runs them live on its own host
(`--live sigmoid_bf16 ipo_precompute_bf16 --out DIR`) and compares on the same kernels.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_dpo_trl.py
"""

import argparse
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
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests/golden/dpo_trl"

# name -> (loss_type, precompute_ref_log_probs, dtype, ld_alpha). bf16 is a bf16 model computing in bf16
# (`bnb_4bit_compute_dtype` = dtype, no autocast), adapters in fp32, as `sft` runs `--dtype bfloat16`.
VARIANTS = {
    "sigmoid": ("sigmoid", False, torch.float32, None),
    "sigmoid_precompute": ("sigmoid", True, torch.float32, None),
    "ipo": ("ipo", False, torch.float32, None),
    "ipo_precompute": ("ipo", True, torch.float32, None),
    "sigmoid_bf16": ("sigmoid", False, torch.bfloat16, None),
    "ipo_precompute_bf16": ("ipo", True, torch.bfloat16, None),
    "sigmoid_ld": ("sigmoid", False, torch.float32, 0.5),
}
# The bf16 variants are not committed: bf16 products round as the host's kernels do (AMX, AVX-512
# or AVX2), so tests/dpo_trl.rs runs them live (`--live`) and compares on the same kernels.
LIVE = {"sigmoid_bf16", "ipo_precompute_bf16"}
# The pre-quantized bases, by the dtype of their unquantized tensors and compute dtype; the
# recipe's `model_name_or_path` is the float32 one, the bf16 variants pass the other.
BASES = {torch.float32: GOLDEN / "base-nf4", torch.bfloat16: GOLDEN / "base-nf4-bf16"}
KEYS = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", nargs="+", choices=sorted(LIVE), help="run only these variants, on the committed bases and adapter")
    ap.add_argument("--out", type=Path, default=GOLDEN, help="where trl_<variant>.json go (default: the golden folder)")
    a = ap.parse_args()
    r = yaml.safe_load((GOLDEN / "recipe.yaml").read_text())
    model_dir = ROOT / r["model_name_or_path"]
    source_dir = ROOT / "models/tiny-llama"
    # The 4-bit base, quantized once by bitsandbytes and saved (one copy per dtype), is what both
    # stacks load: its CPU quantizer rounds a few double-quantization codes differently from the
    # CUDA rule nibble's quantizer follows (REFERENCE.md), and this test compares training, not
    # quantizers (crates/quant's goldens do that).
    def prequantize(dtype):
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=r["bnb_4bit_quant_type"],
            bnb_4bit_use_double_quant=r["use_bnb_nested_quant"],
            bnb_4bit_compute_dtype=dtype,
        )
        m = AutoModelForCausalLM.from_pretrained(source_dir, quantization_config=bnb, dtype=dtype, device_map="cpu")
        out = BASES[dtype]
        shutil.rmtree(out, ignore_errors=True)
        m.save_pretrained(out)
        for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
            shutil.copy(source_dir / f, out / f)

    if not a.live:
        for dtype in BASES:
            prequantize(dtype)

    def base(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(BASES[dtype], dtype=dtype, device_map="cpu")

    if not a.live:
        torch.manual_seed(r["seed"])
        lcfg = LoraConfig(
            r=r["lora_r"],
            lora_alpha=r["lora_alpha"],
            lora_dropout=r["lora_dropout"],
            target_modules=r["lora_target_modules"],
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        init = get_peft_model(base(), lcfg)
        with torch.no_grad():
            # PEFT's random B is as large as A; scaled down, the adapter is a small step from the base.
            for n, p in init.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)
        init.save_pretrained(GOLDEN / "init_adapter")
        for extra in (GOLDEN / "init_adapter").glob("README.md"):
            extra.unlink()
        # PEFT writes target_modules from a set (its order changes with the hash seed): sorted, the
        # file is the same on every run.
        cfg_path = GOLDEN / "init_adapter/adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg["base_model_name_or_path"] = str(BASES[torch.float32].relative_to(ROOT))
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=str(ROOT / r["dataset_name"]), split="train")
    run_dir = a.out / ".trl-run"
    for name in a.live or [n for n in VARIANTS if n not in LIVE]:
        loss_type, precompute, dtype, ld_alpha = VARIANTS[name]
        model = PeftModel.from_pretrained(base(dtype), GOLDEN / "init_adapter", is_trainable=True)
        args = DPOConfig(
            output_dir=str(run_dir),
            beta=r["beta"],
            loss_type=[loss_type],
            precompute_ref_log_probs=precompute,
            ld_alpha=ld_alpha,
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
        trainer.train()
        log = [
            {"step": e["step"], **{k: float(e[k]) for k in KEYS}}
            for e in trainer.state.log_history
            if "loss" in e
        ]
        (a.out / f"trl_{name}.json").write_text(json.dumps(log, indent=1) + "\n")
        shutil.rmtree(run_dir, ignore_errors=True)
        print(name, json.dumps(log[:2]))


if __name__ == "__main__":
    main()
