# /// script
# requires-python = ">=3.11"
# dependencies = ["torch==2.11.0"]
# ///
"""Golden files for crates/pyfiles/tests/torch_save.rs: `state.pt`, written by `torch.save` as a
Trainer writes `optimizer.pt` (an AdamW state dict with f32 and bf16 moments, 0-dim `step`
tensors, param groups), plus the shapes nibble's reader meets elsewhere (a transposed view, two
tensors sharing one storage at an offset, an OrderedDict, big and negative ints, nested
containers); and `state.json`, the same values as plain JSON (tensors as dtype, shape and values).

Deterministic. Regenerate from the repository root (after `cargo xtask setup`):
    "$NIBBLE_PYTHON" scripts/golden_torch_save.py crates/pyfiles/tests/golden
"""

import collections
import json
import sys
from pathlib import Path

import torch


def plain(v):
    if isinstance(v, torch.Tensor):
        return {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.float().flatten().tolist()}
    if isinstance(v, dict):
        return {"dict": [[plain(k), plain(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"tuple": [plain(x) for x in v]}
    if isinstance(v, list):
        return {"list": [plain(x) for x in v]}
    if isinstance(v, bytes):
        return {"bytes": list(v)}
    return v


def main():
    out = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 6, generator=g)), torch.nn.Parameter(torch.randn(6, 4, generator=g).bfloat16())]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    base = torch.arange(20, dtype=torch.float32)
    state = {
        "optimizer": opt.state_dict(),
        "transposed": torch.randn(3, 5, generator=g).t(),
        "shared": [base[2:8].view(2, 3), base[10:14]],
        "ordered": collections.OrderedDict([("b", 1), ("a", 2.5)]),
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**40, -(2**40)],
        "misc": (None, True, False, "naïve", b"\x00\xff", [], {}),
        "int64": torch.tensor([1, -2, 3], dtype=torch.int64),
        "half": torch.tensor([0.5, -1.25], dtype=torch.float16),
        "bool": torch.tensor([True, False]),
    }
    torch.save(state, out / "state.pt")
    (out / "state.json").write_text(json.dumps(plain(state), indent=1) + "\n")


if __name__ == "__main__":
    main()
