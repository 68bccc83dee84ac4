# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "peft==0.21.2", "bitsandbytes==0.50.2", "datasets", "pyyaml"]
# ///
"""TRL's side of the drop-in test (tests/trl_dropin.rs): tests/golden/trl_dropin/{qlora,lora,mixture}.yaml
trained by TRL 1.16's SFTTrainer exactly as the alignment-handbook's `sft.py` runs a recipe, and
dpo_{lora,qlora,qlora_init}.yaml by its DPOTrainer as the handbook's `dpo.py` does (fresh adapter, so the
reference is the base with the adapter off), with
nothing taken from nibble: the model loaded 4-bit by transformers + bitsandbytes, the adapter made
by SFTTrainer from the recipe's LoRA keys (`peft_config`, seeded by the Trainer's `set_seed`), the
data in the Trainer's default shuffled order, the adapters in the bf16 SFTTrainer casts a quantized
model's adapters to. Writes each recipe's per-step loss, gradient norm and learning rate (and
DPO's rewards) to `trl_log.json`.

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_trl_dropin.py

`qlora_prequantized` and `dpo_qlora_prequantized` are qlora and dpo_qlora_init on a checkpoint
bitsandbytes quantized and saved (tests/golden/dpo_trl/base-nf4, made by
scripts/golden_dpo_trl.py): nothing is quantized, so both stacks hold the same 4-bit codes. The
test runs them live (`live RECIPE OUT`): their bf16 adapters' products round as the host's kernels
round.

`lora` and `mixture` also run on 2 ranks (`torchrun --nproc-per-node 2`, the `ranks` mode), logged
as `lora@2` and `mixture@2`.

`golden_trl_dropin.py checkpoint RECIPE OUT` (run by the resume test itself) trains RECIPE with a
Trainer checkpoint every 20 steps into OUT and writes the run's log to OUT/trl_log.json;
`golden_trl_dropin.py resume RECIPE CHECKPOINT OUT` continues RECIPE from CHECKPOINT (written by
`sft`) and writes its log to OUT/trl_log.json.
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

import datasets  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests/golden/trl_dropin"


def dataset(r):
    """The handbook's `get_dataset`: one dataset, or a mixture (each part shuffled with the
    mixture's seed and cut to its weight, the parts concatenated and shuffled again)."""
    if r.get("dataset_mixture") is None:
        return datasets.load_dataset("json", data_files=str(ROOT / r["dataset_name"]), split="train")
    spec = r["dataset_mixture"]
    seed = spec.get("seed", 0)
    parts = []
    for d in spec["datasets"]:
        ds = datasets.load_dataset("json", data_files=str(ROOT / d["id"]), split=d.get("split", "train"))
        if d.get("columns") is not None:
            ds = ds.select_columns(d["columns"])
        ds = ds.shuffle(seed=seed).select(range(int(len(ds) * d.get("weight", 1.0))))
        parts.append(ds)
    return datasets.concatenate_datasets(parts).shuffle(seed=seed)


def train(recipe, out=None, save_steps=None, resume=None):
    r = yaml.safe_load((GOLDEN / recipe).read_text())
    model_dir = ROOT / r["model_name_or_path"]
    bnb = None if not r.get("load_in_4bit") else BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=r["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=r["use_bnb_nested_quant"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    # A pre-quantized checkpoint brings its own quantization_config (passing None would drop it).
    extra = {"quantization_config": bnb} if bnb is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="cpu", **extra)
    peft_config = LoraConfig(
        r=r["lora_r"],
        lora_alpha=r["lora_alpha"],
        lora_dropout=r["lora_dropout"],
        target_modules=r["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    keep = out is not None
    out = Path(out) if keep else GOLDEN / ".trl-run"
    dpo = "beta" in r
    own = (
        {"beta": r["beta"], "loss_type": [r["loss_type"]]}
        if dpo
        else {"dataset_num_proc": None, "weight_decay": r["weight_decay"]}
    )
    args = (DPOConfig if dpo else SFTConfig)(
        **own,
        output_dir=str(out),
        max_length=r["max_length"],
        per_device_train_batch_size=r["per_device_train_batch_size"],
        gradient_accumulation_steps=r["gradient_accumulation_steps"],
        learning_rate=r["learning_rate"],
        lr_scheduler_type=r["lr_scheduler_type"],
        warmup_steps=r["warmup_steps"],
        max_grad_norm=r["max_grad_norm"],
        max_steps=r["max_steps"],
        logging_steps=r["logging_steps"],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        gradient_checkpointing=r["gradient_checkpointing"],
        seed=r["seed"],
        bf16=r["bf16"],
        use_cpu=True,
        report_to="none",
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    if r.get("lora_init_adapter"):
        # A starting adapter (DPO after SFT): the trainer gets the PeftModel, no peft_config.
        model, peft_config = PeftModel.from_pretrained(model, ROOT / r["lora_init_adapter"], is_trainable=True), None
    trainer = (DPOTrainer if dpo else SFTTrainer)(
        model=model, args=args, train_dataset=dataset(r), processing_class=tok, peft_config=peft_config
    )
    kinds = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    want = torch.bfloat16 if getattr(model, "is_loaded_in_4bit", False) else torch.float32
    assert kinds == {want}, f"SFTTrainer trains the adapters in {kinds}"
    trainer.train(resume_from_checkpoint=resume)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    keys = ["loss", "grad_norm", "learning_rate"] + (["rewards/chosen", "rewards/rejected", "rewards/margins"] if dpo else [])
    return [{"step": e["step"], **{k: float(e[k]) for k in keys}} for e in trainer.state.log_history if "loss" in e]


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "checkpoint":
        # For tests/trl_dropin.rs' resume test: RECIPE trained with a Trainer checkpoint every 20
        # steps into OUT, and the uninterrupted run's log beside it.
        recipe, out = sys.argv[2], Path(sys.argv[3])
        log = train(f"{recipe}.yaml", out=out, save_steps=20)
        (out / "trl_log.json").write_text(json.dumps(log, indent=1) + "\n")
        return
    if len(sys.argv) == 4 and sys.argv[1] == "live":
        # For tests/trl_dropin.rs' live comparisons: RECIPE trained now, its log written to
        # OUT/trl_log.json (bf16 products round as this host's kernels do, so no committed file).
        recipe, out = sys.argv[2], Path(sys.argv[3])
        log = train(f"{recipe}.yaml")
        (out / "trl_log.json").write_text(json.dumps(log, indent=1) + "\n")
        return
    if len(sys.argv) == 4 and sys.argv[1] == "ranks":
        # Under `torchrun --nproc-per-node 2`: RECIPE on 2 ranks (Gloo on the CPU, accelerate's
        # sharding of the Trainer's order); rank 0 writes the log to OUT/trl_log.json.
        recipe, out = sys.argv[2], Path(sys.argv[3])
        log = train(f"{recipe}.yaml", out=out)
        if int(os.environ.get("RANK", "0")) == 0:
            (out / "trl_log.json").write_text(json.dumps(log, indent=1) + "\n")
        return
    if len(sys.argv) == 5 and sys.argv[1] == "resume":
        # For the resume test the other way: RECIPE continued by TRL from CHECKPOINT (one nibble
        # wrote), its log written to OUT/trl_log.json.
        recipe, checkpoint, out = sys.argv[2], sys.argv[3], Path(sys.argv[4])
        log = train(f"{recipe}.yaml", out=out, resume=checkpoint)
        (out / "trl_log.json").write_text(json.dumps(log, indent=1) + "\n")
        return
    logs = {name: train(f"{name}.yaml") for name in ["qlora", "lora", "mixture", "dpo_lora", "dpo_qlora", "dpo_qlora_init"]}
    # The same on 2 ranks, started as TRL users start them.
    import subprocess
    import tempfile

    torchrun = Path(sys.executable).with_name("torchrun")
    for name in ["lora", "mixture"]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [str(torchrun), "--nproc-per-node", "2", __file__, "ranks", name, tmp]
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            logs[f"{name}@2"] = json.loads((Path(tmp) / "trl_log.json").read_text())
    (GOLDEN / "trl_log.json").write_text(json.dumps(logs, indent=1) + "\n")
    print(json.dumps(logs))


if __name__ == "__main__":
    main()
