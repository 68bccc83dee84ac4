# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "transformers==5.24.0", "bitsandbytes==0.50.2", "accelerate==1.15.0"]
# ///
"""The reference side of `cargo xtask bench`'s model-load measurement: transformers'
`from_pretrained` quantizing a model to 4 bits on the CPU as a QLoRA run asks for it (NF4, double
quantization, compute dtype = load dtype), the counterpart of
crates/model-loader/examples/load_bench.rs.

Prints one JSON line: the seconds `from_pretrained` took (imports excluded; the harness also
times the whole process) and this process's peak and current resident memory.

Run (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/bench_load_hf.py MODEL_DIR [bf16|fp32]
"""

import json
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def memory_kib():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return fields


def main():
    model_dir = sys.argv[1]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2] if len(sys.argv) > 2 else "bf16"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    before = memory_kib()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype, device_map="cpu")
    load_s = time.perf_counter() - t0
    after = memory_kib()
    print(
        json.dumps(
            {
                "load_s": round(load_s, 4),
                "vm_hwm_kib": after["VmHWM"],
                "vm_rss_kib": after["VmRSS"],
                "rss_anon_kib": after["RssAnon"],
                "rss_file_kib": after["RssFile"],
                "start_rss_kib": before["VmRSS"],
                "footprint_bytes": model.get_memory_footprint(),
            }
        )
    )


if __name__ == "__main__":
    main()
