# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0"]
# ///
"""Throughput of the matmuls a QLoRA step runs through one frozen linear, in f32 and bf16, with
the libtorch both nibble and the Python stack use: the evidence behind docs/benchmarks.md's
finding that bf16 compute is the dominant cost on CPUs without native bf16 (AVX2 only).

The shapes are one MLP projection of the ~150M bench model (tokens 512, hidden 768,
intermediate 2048): forward `x @ W^T` (F.linear), the input gradient `g @ W` (an NN product,
what a frozen layer's backward computes), the same product on a transposed copy, and the weight
gradient shape `g^T @ x` (adapters' shape class).

Run (after `cargo xtask setup`; OMP_WAIT_POLICY=PASSIVE keeps a busy machine's noise down):
    OMP_WAIT_POLICY=PASSIVE "$NIBBLE_PYTHON" scripts/bench_matmul.py
Prints milliseconds (best of 3) and GFLOP/s per case and dtype.
"""

import time

import torch

T, H, I = 512, 768, 2048


def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(T, H, dtype=dtype)
        w = torch.randn(I, H, dtype=dtype)
        g = torch.randn(T, I, dtype=dtype)
        w_t = w.t().contiguous()
        cases = {
            "forward x @ W^T (F.linear)": lambda: torch.nn.functional.linear(x, w),
            "input grad g @ W (NN)": lambda: g @ w,
            "x @ W^T materialised (NN)": lambda: x @ w_t,
            "weight-grad shape g^T @ x (TN)": lambda: g.t() @ x,
        }
        for name, fn in cases.items():
            s = best_of(fn)
            print(f"{str(dtype):15} {name:32} {s * 1e3:9.1f} ms {2 * T * H * I / s / 1e9:7.1f} GFLOP/s")


if __name__ == "__main__":
    main()
