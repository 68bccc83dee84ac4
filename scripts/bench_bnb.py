# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "bitsandbytes==0.50.2"]
# ///
"""Time bitsandbytes' CPU 4-bit quantize/dequantize and a torch copy on the shapes of
crates/quant/benches/codec.rs, as the baseline for docs/benchmarks.md.

Run (after `cargo xtask setup`, right after `cargo bench -p quant --bench codec`):
    "$NIBBLE_PYTHON" scripts/bench_bnb.py
Prints one line per measurement: name, shape, median seconds, GiB/s of the bf16 weight.
"""

import statistics
import time

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit


def median_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    for rows, cols in [(4096, 4096), (11008, 4096)]:
        w = torch.randn(rows, cols, dtype=torch.bfloat16)
        gib = w.numel() * 2 / 2**30
        q, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
        out = torch.empty_like(w)
        cases = {
            "bnb quantize_4bit nf4 (bf16 in)": lambda: quantize_4bit(w, blocksize=64, quant_type="nf4"),
            "bnb dequantize_4bit nf4 (bf16 out)": lambda: dequantize_4bit(q, state),
            "torch copy of the bf16 weight": lambda: out.copy_(w),
        }
        for name, fn in cases.items():
            t = median_time(fn)
            print(f"{name}\t{rows}x{cols}\t{t:.4f} s\t{gib / t:.2f} GiB/s")


if __name__ == "__main__":
    main()
