# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "trl==1.16.0", "peft==0.21.2", "bitsandbytes==0.50.2", "datasets", "pyyaml"]
# ///
"""The reference side of `cargo xtask bench`'s training measurement: TRL 1.16's SFTTrainer on
transformers + bitsandbytes (4-bit) + PEFT, trained from a recipe under recipes/bench/ exactly as
`sft` trains it, timing every optimizer step.

Two commands:

    bench_trl.py init RECIPE OUT_DIR [--key value ...]
        Writes the shared initial adapter (PEFT's default LoRA init, seeded with the recipe's
        seed) that both stacks start from (`lora_init_adapter`), as scripts/golden_trl_loss.py
        does for the loss-parity test.

    bench_trl.py train RECIPE LOG_JSONL [--key value ...]
    bench_trl.py train-dpo RECIPE LOG_JSONL [--key value ...]
        Trains (SFTTrainer, or DPOTrainer on preference pairs) and writes one JSON line per
        optimizer step, with the keys of nibble's log.jsonl
        that the harness reads: step, loss, grad_norm, learning_rate, num_tokens (cumulative input
        tokens, pads excluded) and elapsed_s (seconds from the start of training to the end of the
        step, measured by a callback). Prints a JSON summary (phase times, peak RSS) on stdout.

`--key value` pairs override recipe keys as `sft`'s flags do (values read as YAML), e.g.
`--dtype bfloat16 --gradient_checkpointing true --lora_init_adapter DIR`. It trains on the CPU
unless the recipe says `use_cpu: false` and CUDA is there (recipes/bench/gpu-1b.yaml, run by
scripts/gpu_check.sh on a GPU machine): then on GPU 0.

Deliberate choices, the same as scripts/golden_trl_loss.py so that both stacks run the same
maths: the model is given to SFTTrainer as a PeftModel loaded from the initial adapter (no
`prepare_model_for_kbit_training`, which nibble does not do), SFTTrainer's bf16 cast of the
adapter is undone (nibble keeps adapters in f32, PEFT's default), and the recipe's `bf16` is passed
on (the bench recipes say `bf16: false`: no autocast; "bf16" means a bf16 model computing in bf16,
`bnb_4bit_compute_dtype = dtype`, in both stacks).

Run (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/bench_trl.py train recipes/bench/tiny.yaml /tmp/trl.jsonl --max_steps 5
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T_START = time.perf_counter()

import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def recipe(path, overrides):
    r = yaml.safe_load(Path(path).read_text())
    if len(overrides) % 2:
        sys.exit(f"overrides must be `--key value` pairs, got {overrides}")
    for key, value in zip(overrides[::2], overrides[1::2]):
        if not key.startswith("--"):
            sys.exit(f"expected --key, got {key}")
        r[key[2:]] = yaml.safe_load(value)
    return r


def on_gpu(r):
    """The recipe's `use_cpu: false` on a machine with CUDA (scripts/gpu_check.sh); else the CPU."""
    return not r.get("use_cpu", True) and torch.cuda.is_available()


def base_model(r):
    dtype = DTYPES[r.get("dtype", "float32")]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=r.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=r.get("use_bnb_nested_quant", False),
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        r["model_name_or_path"], quantization_config=bnb, dtype=dtype, device_map={"": 0} if on_gpu(r) else "cpu"
    )


def init(r, out):
    torch.manual_seed(r["seed"])
    lcfg = LoraConfig(
        r=r["lora_r"],
        lora_alpha=r["lora_alpha"],
        lora_dropout=r.get("lora_dropout", 0.0),
        target_modules=r["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base_model(r), lcfg)
    model.save_pretrained(out)
    for extra in Path(out).glob("README.md"):
        extra.unlink()


class StepTimer(TrainerCallback):
    """Seconds from the start of training to the end of each optimizer step."""

    def __init__(self):
        self.t0 = None
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter() - self.t0)


def train(r, log_path, dpo=False):
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(base_model(r), r["lora_init_adapter"], is_trainable=True)
    t_load = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(r["model_name_or_path"])
    data = load_dataset("json", data_files=r["dataset_name"], split="train")
    if dpo:
        # DPOConfig's own keys; the reference is DPOTrainer's frozen copy of the initial adapter.
        config_class, own = DPOConfig, {"beta": r.get("beta", 0.1), "loss_type": [r.get("loss_type", "sigmoid")]}
        own["precompute_ref_log_probs"] = r.get("precompute_ref_log_probs", False)
    else:
        config_class = SFTConfig
        own = {"packing": r.get("packing", False), "packing_strategy": r.get("packing_strategy", "bfd")}
        own["dataset_num_proc"] = None
    args = config_class(
        **own,
        output_dir=r["output_dir"],
        max_length=r["max_length"],
        per_device_train_batch_size=r["per_device_train_batch_size"],
        gradient_accumulation_steps=r.get("gradient_accumulation_steps", 1),
        learning_rate=r["learning_rate"],
        lr_scheduler_type=r.get("lr_scheduler_type", "linear"),
        warmup_steps=r.get("warmup_steps", 0),
        weight_decay=r.get("weight_decay", 0.0),
        max_grad_norm=r.get("max_grad_norm", 1.0),
        max_steps=r["max_steps"],
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=r.get("gradient_checkpointing", False),
        train_sampling_strategy=r.get("train_sampling_strategy", "random"),
        seed=r["seed"],
        bf16=r.get("bf16", False),
        use_cpu=not on_gpu(r),
        report_to="none",
        dataloader_num_workers=0,
    )
    exact = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    timer = StepTimer()
    t1 = time.perf_counter()
    trainer_class = DPOTrainer if dpo else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    t_prepare = time.perf_counter() - t1
    # Undo the trainer's bf16 cast of the adapter, values included.
    for n, p in trainer.model.named_parameters():
        if p.requires_grad and n in exact:
            p.data = exact[n].clone()
    t2 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t2
    logs = [e for e in trainer.state.log_history if "loss" in e]
    with open(log_path, "w") as f:
        for e, end in zip(logs, timer.ends):
            line = {
                "step": e["step"],
                "loss": e["loss"],
                "grad_norm": float(e["grad_norm"]),
                "learning_rate": e["learning_rate"],
                "num_tokens": e.get("num_tokens"),
                "elapsed_s": end,
            }
            f.write(json.dumps(line) + "\n")
    summary = {
        "import_s": round(t0 - T_START, 3),
        "load_s": round(t_load, 3),
        "prepare_s": round(t_prepare, 3),
        "train_s": round(t_train, 3),
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "max_cuda_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu(r) else None,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("init", "train", "train-dpo"):
        sys.exit(__doc__)
    command, recipe_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    r = recipe(recipe_path, sys.argv[4:])
    if command == "init":
        init(r, out)
    else:
        train(r, out, dpo=command == "train-dpo")


if __name__ == "__main__":
    main()
