# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0", "bitsandbytes==0.50.2"]
# ///
"""Time bitsandbytes' CPU 4-bit quantize/dequantize and a torch copy on the shapes of
crates/quant/benches/codec.rs, as the baseline for docs/benchmarks.md.

Run (after `cargo xtask setup`, right after `cargo bench -p quant --bench codec`):
    "$NIBBLE_PYTHON" scripts/bench_bnb.py [--json] [--shapes 4096x4096,11008x4096] [--repeats 5]
Prints one line per measurement: name, shape, median seconds, GiB/s of the bf16 weight; with
`--json` (what `cargo xtask bench` reads), one JSON object per line with the median, minimum and
maximum seconds of the repeats.
"""

import argparse
import json
import statistics
import time

import torch
from bitsandbytes.functional import dequantize_4bit, quantize_4bit


def times_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        rows, cols = (int(d) for d in shape.split("x"))
        w = torch.randn(rows, cols, dtype=torch.bfloat16)
        gib = w.numel() * 2 / 2**30
        q, state = quantize_4bit(w, blocksize=64, quant_type="nf4")
        out = torch.empty_like(w)
        cases = {
            "quantize": ("bnb quantize_4bit nf4 (bf16 in)", lambda: quantize_4bit(w, blocksize=64, quant_type="nf4")),
            "dequantize": ("bnb dequantize_4bit nf4 (bf16 out)", lambda: dequantize_4bit(q, state)),
            "memcpy": ("torch copy of the bf16 weight", lambda: out.copy_(w)),
        }
        for op, (name, fn) in cases.items():
            times = times_of(fn, args.repeats)
            t = statistics.median(times)
            if args.json:
                print(json.dumps({"op": op, "shape": shape, "median_s": t, "min_s": min(times), "max_s": max(times)}))
            else:
                print(f"{name}\t{rows}x{cols}\t{t:.4f} s\t{gib / t:.2f} GiB/s")


if __name__ == "__main__":
    main()
