# /// script
# requires-python = ">=3.11"
# dependencies = ["bitsandbytes==0.50.2", "torch==2.11.0", "safetensors==0.8.0"]
# ///
"""Write golden vectors of bitsandbytes' LLM.int8() on the CPU, for crates/quant/tests/int8_parity.rs
(the row-wise codec) and crates/quant/tests/linear.rs (the 8-bit layer).

Codec cases (`kind` int8): an input, what `int8_vectorwise_quant` made of it (codes, SCB, outlier
columns) and what `int8_vectorwise_dequant` gives back. Layer cases (`kind` int8_linear): a
`Linear8bitLt(has_fp16_weights=False)` built from a dense weight, its int8 state, an input with
outlier columns, its outputs in eval mode (`MatMul8bitLt`, the LLM.int8 decomposition) and in
train mode (`MatMul8bitFp`, bitsandbytes' CPU training path: dequantize, then linear), and the
input gradients of both. Each layer case also holds `y_eval_kernel_scale`: bitsandbytes' eval
forward recomputed op for op with the CUDA kernel's product scale (6.200012e-05) instead of its
torch backend's 6.200124e-05; the recomputation is first checked to give bitsandbytes' own output
bit for bit with the torch backend's constant.

Seeded, so the files are the same on every run on one kind of CPU (`cpu_capability` in the
metadata). Regenerate (after `cargo xtask setup`, with the pinned reference stack):
    "$NIBBLE_PYTHON" scripts/golden_int8.py crates/quant/tests/golden/int8
"""

import os
import pathlib
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# These files record bitsandbytes' own CPU paths on this host, with the host's capability in their
# metadata (the tests know which paths each capability takes), so they are never pinned
# (docs/reference-cpu-paths.md).
if nibble_refcpu.applied() not in (None, "native"):
    sys.exit(f"golden_int8.py records bitsandbytes' own CPU paths: unset NIBBLE_REF_CPU (it is {nibble_refcpu.applied()})")

import logging

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from golden_bnb import metadata, save_file  # noqa: E402

# bitsandbytes warns on every non-float16 input to MatMul8bitLt.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CPU_SCALE = 6.200124e-05  # bitsandbytes' torch backend (int8_mm_dequant)
KERNEL_SCALE = 6.200012e-05  # the CUDA kernel's MM_DEQUANT_CONST, the f32 nearest 1/127^2


def codec_case(out: pathlib.Path, name: str, x: torch.Tensor, threshold: float):
    codes, scb, cols = F.int8_vectorwise_quant(x.clone(), threshold=threshold)
    tensors = {
        "input": x.contiguous(),
        "codes": codes.contiguous(),
        "scb": scb.contiguous(),
        "outlier_cols": (cols if cols is not None else torch.empty(0, dtype=torch.int64)).contiguous(),
        "dequantized": F.int8_vectorwise_dequant(codes, scb).contiguous(),
    }
    meta = metadata(kind="int8", threshold=repr(threshold), dtype=str(x.dtype).removeprefix("torch."), shape=list(x.shape))
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)


def ties_and_scales() -> torch.Tensor:
    """f32 rows probing the rounding: exact .5 ties at scale 1, and rows whose absmax makes
    `reciprocal(absmax) * 127` differ from `127 / absmax`, with values on the boundaries where
    the two scales round differently."""
    rows = [torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5] + [0.0] * 8)]
    gen = torch.Generator().manual_seed(3)
    cand = torch.rand(4096, generator=gen) * 3 + 0.01
    differs = cand[(cand.reciprocal() * 127) != (torch.full_like(cand, 127.0) / cand)]
    for m in differs[:3].tolist():
        m = torch.tensor(m, dtype=torch.float32)
        s_bnb, s_div = m.reciprocal() * 127, torch.tensor(127.0) / m
        found = []
        for k in range(1, 127):
            for direction in (0.0, 1e9):
                c = (torch.tensor(k + 0.5) / s_bnb).float()
                for _ in range(6):
                    if torch.round(c * s_bnb) != torch.round(c * s_div) and len(found) < 15 and float(c) not in found:
                        found.append(float(c))
                    c = torch.nextafter(c, torch.tensor(direction))
        rows.append(torch.tensor([float(m)] + found + [0.0] * (15 - len(found))))
    return torch.stack(rows).float()


def mixed_scaled(m, cb, scb, x2, bias, scale):
    """bitsandbytes' eval forward (MatMul8bitLt through its torch backend), op for op, with the
    int8 product scaled by `scale`."""
    ca, sca, cols = F.int8_vectorwise_quant(x2.to(torch.float16), threshold=m.state.threshold)
    i32 = torch.matmul(ca.float(), cb.float().t()).to(torch.int32)
    out = i32 * (sca.unsqueeze(-1) * scb.unsqueeze(0)) * scale
    if bias is not None:
        out += bias.to(x2.dtype)
    out = out.to(x2.dtype)
    if cols is not None and cols.numel():
        sub_a = x2[:, cols].contiguous()
        sub_b = F.int8_vectorwise_dequant(cb[:, cols].contiguous(), scb).to(x2.dtype).t()
        out = out.addmm(sub_a, sub_b)
    return out


def linear_case(out: pathlib.Path, name: str, dtype: torch.dtype, threshold: float, seed: int, shape=(2, 5, 64), out_features=24):
    gen = torch.Generator().manual_seed(seed)
    in_features = shape[-1]
    w = torch.randn(out_features, in_features, generator=gen) * 0.08
    b = torch.randn(out_features, generator=gen) * 0.1
    dense = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(b)
    m = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(dense.state_dict())
    m = m.to("cpu")
    # bitsandbytes sums the bias gradient over dim 0 only (wrong for 3-D inputs); keep it frozen.
    m.bias.requires_grad_(False)
    cb, scb = m.weight.data.clone(), m.weight.SCB.clone()

    x = torch.randn(*shape, generator=gen) * 1.5
    x[..., 3] *= 6.0  # an outlier feature
    x[..., 50] += 9.0
    x.view(-1, in_features)[1, 60] = -7.5  # a lone outlier
    x = x.to(dtype)
    g = (torch.randn(*shape[:-1], out_features, generator=gen) * 0.5).to(dtype)

    res = {}
    for mode in ("eval", "train"):
        m.train(mode == "train")
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.backward(g)
        res[mode] = (y.detach(), xi.grad.detach())
    m.eval()
    x2 = x.reshape(-1, in_features)
    bias = m.bias.detach()
    with torch.no_grad():
        again = mixed_scaled(m, cb, scb, x2, bias, CPU_SCALE).reshape(res["eval"][0].shape)
        assert torch.equal(again, res["eval"][0]), f"{name}: the recomputation is not bitsandbytes' forward"
        kernel = mixed_scaled(m, cb, scb, x2, bias, KERNEL_SCALE).reshape(res["eval"][0].shape)
    tensors = {
        "weight": w,
        "bias": b,
        "codes": cb,
        "scb": scb,
        "x": x,
        "grad_y": g,
        "y_eval": res["eval"][0],
        "y_eval_kernel_scale": kernel,
        "grad_x_eval": res["eval"][1],
        "y_train": res["train"][0],
        "grad_x_train": res["train"][1],
    }
    meta = metadata(kind="int8_linear", threshold=repr(threshold), dtype=str(dtype).removeprefix("torch."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"), metadata=meta)


def main(out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()

    def randn(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    # Weights as Int8Params quantizes them: float16, no threshold.
    codec_case(out, "weight_f16", (randn(32, 128, seed=1) * 0.05).half(), 0.0)
    # Activations with outlier features, as MatMul8bitLt quantizes them (float16, threshold 6).
    act = randn(24, 96, seed=2) * 1.5
    act[:, [5, 40]] *= 8.0
    act[7, 60] = -6.0  # exactly on the threshold: an outlier
    act[9, :] = 0.0  # a zero row
    act[11, :] = 0.0  # a row of outliers only: absmax 0 once they are set aside
    act[11, 5], act[11, 40] = 7.0, -12.0
    codec_case(out, "activations_f16_t6", act.half(), 6.0)
    # One row: bitsandbytes skips zeroing outlier columns there (the outliers themselves are).
    codec_case(out, "one_row_f16_t6", act[2:3].half(), 6.0)
    # A threshold float16 cannot hold: torch compares it rounded to float16 (5.296875).
    th = act[:8, :32].clone()
    th[0, 0], th[1, 1], th[2, 2] = 5.296875, -5.296875, 5.2929688
    codec_case(out, "threshold_rounded_f16", th.half(), 5.2985)
    # bfloat16 and float32 data: the same arithmetic on other values.
    codec_case(out, "activations_bf16_t6", act.bfloat16(), 6.0)
    codec_case(out, "generic_f32", randn(16, 64, seed=4) * 3, 0.0)
    # Ties, reciprocal-vs-division scales, zero and subnormal rows.
    edge = ties_and_scales()
    edge = torch.cat([edge, torch.zeros(1, 16), torch.tensor([[1e-40, -3e-41] + [0.0] * 14])])
    codec_case(out, "edges_f32", edge, 0.0)

    linear_case(out, "linear_f32_t6", torch.float32, 6.0, seed=10)
    linear_case(out, "linear_bf16_t6", torch.bfloat16, 6.0, seed=11)
    linear_case(out, "linear_f16_t6", torch.float16, 6.0, seed=12)
    linear_case(out, "linear_f32_t0", torch.float32, 0.0, seed=13)
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {len(list(out.glob('*.safetensors')))} files, {total} bytes, bitsandbytes {bnb.__version__}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(pathlib.Path(sys.argv[1]))
