"""bitsandbytes' CUDA results for scripts/gpu_check.sh: quantizes inputs with the pinned
bitsandbytes on the GPU and writes them, with its timings, to a safetensors file that
`cuda_check --bnb FILE` (crates/quant/examples/cuda_check.rs) compares the nibble kernels with.

Regenerate/run: scripts/gpu_check.sh (on a machine with a CUDA GPU and bitsandbytes importable).
"""

import sys
import time

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file


def timed(f, iters):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[len(ts) // 2]


def main(path):
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    out = {}
    case = 0
    for n in [64 * 1000 + 8, 4096 * 4096]:
        for bs in [64, 128, 256, 4096]:
            for qi, qt in enumerate(["nf4", "fp4"]):
                x = (torch.randn(n, generator=g) * 0.02).to(dev)
                packed, state = F.quantize_4bit(x, blocksize=bs, quant_type=qt)
                p = f"case{case}."
                out[p + "x"] = x.cpu()
                out[p + "meta"] = torch.tensor([bs, qi], dtype=torch.int64)
                out[p + "packed"] = packed.cpu().contiguous()
                out[p + "absmax"] = state.absmax.cpu().contiguous()
                # bnb dequantizes in the input's dtype (f32 here); one f32 -> bf16 rounding
                # then equals dequantizing straight to bf16.
                out[p + "dequant_bf16"] = F.dequantize_4bit(packed, state).flatten().to(torch.bfloat16).cpu()
                _, state_dq = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=True)
                out[p + "dq_codes"] = state_dq.absmax.cpu().contiguous()
                out[p + "dq_nested"] = state_dq.state2.absmax.cpu().contiguous()
                out[p + "dq_offset"] = torch.tensor(float(state_dq.offset), dtype=torch.float32)
                case += 1
    for o, i in [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]:
        w = torch.randn(o, i, device=dev, dtype=torch.bfloat16)
        qw, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        x = torch.randn(1, 1, i, device=dev, dtype=torch.bfloat16)
        # The inference path of Linear4bit: one row without grad goes to gemv_4bit.
        t = timed(lambda: bnb.matmul_4bit(x, qw.t(), quant_state=st), 50)
        out[f"bnb_gemv_{o}x{i}_us"] = torch.tensor(t * 1e6, dtype=torch.float64)
    w = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    qw, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    out["bnb_dequant_bf16_64Mi_ms"] = torch.tensor(timed(lambda: F.dequantize_4bit(qw, st), 20) * 1e3, dtype=torch.float64)
    save_file(out, path)
    print(f"gpu_check_bnb: {case} cases and timings written to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
