# /// script
# requires-python = ">=3.11"
# dependencies = ["bitsandbytes==0.50.2", "torch==2.11.0", "safetensors==0.8.0"]
# ///
"""Write golden vectors from bitsandbytes' CPU functions, for crates/quant/tests/bnb_parity.rs.

Each case is one small safetensors file: the input, what bitsandbytes' quantize_4bit (with and
without compress_statistics) or quantize_blockwise made of it, and what its dequantize gave back;
the case's parameters are safetensors metadata strings. Inputs are seeded, so the files are the
same on every run (on one kind of CPU: `cpu_capability` in the metadata records the kind, since
bitsandbytes' CPU dequantize kernel depends on it).

Regenerate (after `cargo xtask setup`, with the pinned reference stack):
    "$NIBBLE_PYTHON" scripts/golden_bnb.py crates/quant/tests/golden
"""

import json
import os
import pathlib
import sys

# bitsandbytes wraps its torch fallback dequantize in torch.compile; eager mode is the same
# arithmetic, faster for a few small calls, and keeps the run free of compiler warnings.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).parent / "refcpu"))
import nibble_refcpu  # noqa: E402

# These files record bitsandbytes' own CPU paths on this host, with the host's capability in their
# metadata (the tests know which paths each capability takes), so they are never pinned
# (docs/reference-cpu-paths.md).
if nibble_refcpu.applied() not in (None, "native"):
    sys.exit(f"golden_bnb.py records bitsandbytes' own CPU paths: unset NIBBLE_REF_CPU (it is {nibble_refcpu.applied()})")

import bitsandbytes
import bitsandbytes.functional as F
import safetensors
import torch
from safetensors.torch import load_file

ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int64: "I64",
}


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]):
    """Write a safetensors file with a byte-stable header (sorted keys; the safetensors package
    keeps its metadata in a hash map, so its own writer orders it differently on every run)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)
    back = load_file(path)
    assert all(torch.equal(back[k].view(torch.uint8), tensors[k].contiguous().view(torch.uint8)) for k in tensors), path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def metadata(**extra) -> dict[str, str]:
    base = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "cpu_capability": nibble_refcpu.host_capability(),
    }
    base.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return base


def midpoints(quant_type: str) -> torch.Tensor:
    """Thresholds between adjacent sorted code values, as torch computes them in f32."""
    code = torch.sort(F.get_4bit_type(quant_type, device="cpu")).values
    return (code[:-1] + code[1:]) / 2


def edge_input(quant_type: str) -> torch.Tensor:
    """357 f32 values (blocksize 64: five full blocks and a short odd one) probing the edges."""
    gen = torch.Generator().manual_seed(7)
    t = midpoints(quant_type)
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    down = torch.nextafter(t, torch.full_like(t, -2.0))
    # Block 0: all zeros (absmax 0).
    b0 = torch.zeros(64)
    # Block 1: absmax exactly 1, so the scaled values are the thresholds themselves.
    b1 = torch.cat([torch.tensor([1.0, -0.0, 0.0, -1.0]), t, up, down, torch.zeros(64 - 4 - 45)])
    # Block 2: only subnormals (absmax below 1e-38, and 1/absmax overflows to +inf).
    b2 = torch.tensor([1e-40, -3e-41, 0.0, -0.0, 5e-45, -5e-45, 2e-39, -1e-39] * 8)
    # Block 3: subnormals beside normal values; thresholds scaled by 3 (reciprocal vs division).
    b3 = torch.cat([torch.tensor([3.0, 1e-40, -1e-40, -0.0]), t * 3, up * 3, down * 3, torch.zeros(15)])
    # Block 4: random with signed zeros sprinkled in.
    b4 = torch.randn(64, generator=gen)
    b4[::9] = -0.0
    # Short last block (37 elements): thresholds again, absmax 1.
    b5 = torch.cat([torch.tensor([1.0, -0.0]), t, up[:10], -t[:10]])
    x = torch.cat([b0, b1, b2, b3, b4, b5]).float()
    assert x.numel() == 357, x.numel()
    return x


def division_input(quant_type: str) -> torch.Tensor:
    """A full block of 64, then a short block (absmax 0.3) of values where dividing by absmax
    and multiplying by its reciprocal land on different sides of a threshold."""
    t = midpoints(quant_type)
    m = torch.tensor(0.3, dtype=torch.float32)
    found = []
    for v in (t * m).tolist():
        for direction in (1.0, -1.0):
            d = torch.tensor(direction)
            c = torch.tensor(v, dtype=torch.float32)
            for _ in range(12):
                if torch.bucketize(c / m, t) != torch.bucketize(c * (1.0 / m), t) and float(c) not in found:
                    found.append(float(c))
                c = torch.nextafter(c, d)
    assert len(found) >= 3, found
    gen = torch.Generator().manual_seed(11)
    return torch.cat([torch.randn(64, generator=gen), torch.tensor([0.3, -0.0] + found)]).float()


def quant4_case(out: pathlib.Path, name: str, x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    packed, state = F.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    deq = F.dequantize_4bit(packed, state).reshape(x.shape)
    tensors = {
        "input": x.contiguous(),
        "packed": packed.reshape(-1).contiguous(),
        "quant_map": state.code.float().contiguous(),
        "dequantized": deq.contiguous(),
    }
    if double_quant:
        # The raw absmax, before the nested quantization (bitsandbytes' own op).
        _, raw = torch.ops.bitsandbytes.quantize_4bit.default(x, blocksize, quant_type, torch.uint8)
        tensors.update(
            {
                "absmax_raw": raw.contiguous(),
                "absmax_codes": state.absmax.contiguous(),
                "nested_absmax": state.state2.absmax.contiguous(),
                "nested_quant_map": state.state2.code.contiguous(),
                "offset": state.offset.reshape(1).float().contiguous(),
            }
        )
    else:
        tensors["absmax"] = state.absmax.contiguous()
    dtype = str(x.dtype).removeprefix("torch.")
    meta = metadata(
        kind="4bit",
        quant_type=quant_type,
        blocksize=str(blocksize),
        dtype=dtype,
        shape=list(x.shape),
        double_quant="true" if double_quant else "false",
    )
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)


def blockwise8_case(out: pathlib.Path, name: str, x: torch.Tensor, blocksize: int):
    codes, state = F.quantize_blockwise(x, blocksize=blocksize)
    deq = F.dequantize_blockwise(codes, state)
    tensors = {
        "input": x.contiguous(),
        "codes": codes.contiguous(),
        "absmax": state.absmax.contiguous(),
        "code": state.code.contiguous(),
        "dequantized": deq.contiguous(),
    }
    meta = metadata(kind="8bit", blocksize=str(blocksize), dtype="float32", shape=list(x.shape))
    save_file(tensors, str(out / f"{name}.safetensors"), metadata=meta)


def main(out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    torch.manual_seed(0)

    def randn(*shape, dtype=torch.float32, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=gen).to(dtype)

    seed = 100
    # Every blocksize, both code books, f32: a length divisible by the blocksize and one not.
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, 128, 256, 1024, 4096):
            seed += 1
            quant4_case(out, f"{quant_type}_bs{blocksize}_f32_even", randn(2, blocksize, seed=seed), quant_type, blocksize, False)
            seed += 1
            odd_shape = (3, blocksize // 2 + 5)  # odd last dimension, short last block
            quant4_case(out, f"{quant_type}_bs{blocksize}_f32_ragged", randn(*odd_shape, seed=seed), quant_type, blocksize, False)
    # Half-precision inputs.
    for quant_type in ("nf4", "fp4"):
        for dtype in ("float16", "bfloat16"):
            seed += 1
            quant4_case(out, f"{quant_type}_bs64_{dtype}", randn(5, 100, dtype=DTYPES[dtype], seed=seed), quant_type, 64, False)
            seed += 1
            quant4_case(out, f"{quant_type}_bs128_{dtype}_odd", randn(7, 9, dtype=DTYPES[dtype], seed=seed), quant_type, 128, False)
    # Rows of 688 at blocksize 64 (bitsandbytes' AVX-512 CPU dequantize is wrong there).
    for quant_type in ("nf4", "fp4"):
        for dtype in ("float32", "bfloat16"):
            seed += 1
            quant4_case(out, f"{quant_type}_rows688_bs64_{dtype}", randn(4, 688, dtype=DTYPES[dtype], seed=seed), quant_type, 64, False)
    # Double quantization: more than 256 blocks, so the nested quantization has several blocks.
    dq_cases = [
        ("nf4", 64, "bfloat16", (33, 520)),
        ("nf4", 64, "float32", (16, 1040)),
        ("fp4", 32, "float16", (7, 1000)),
        ("nf4", 128, "bfloat16", (40, 1000)),
        ("fp4", 256, "float32", (3, 100)),
        ("nf4", 64, "float32", (4, 688)),
    ]
    for quant_type, blocksize, dtype, shape in dq_cases:
        seed += 1
        name = f"{quant_type}_dq_bs{blocksize}_{dtype}_{shape[0]}x{shape[1]}"
        quant4_case(out, name, randn(*shape, dtype=DTYPES[dtype], seed=seed), quant_type, blocksize, True)
    # Edge values, f32 and bf16, both code books; one element; an odd count.
    for quant_type in ("nf4", "fp4"):
        edge = edge_input(quant_type)
        quant4_case(out, f"{quant_type}_edge_f32", edge, quant_type, 64, False)
        quant4_case(out, f"{quant_type}_edge_bf16", edge.to(torch.bfloat16), quant_type, 64, False)
        quant4_case(out, f"{quant_type}_short_block_division", division_input(quant_type), quant_type, 64, False)
        quant4_case(out, f"{quant_type}_single", torch.tensor([-0.7]), quant_type, 64, False)
        seed += 1
        quant4_case(out, f"{quant_type}_odd_count", randn(63, seed=seed), quant_type, 32, False)
    # Blockwise 8-bit with the dynamic map (the nested quantization's op), on skewed data.
    for blocksize in (256, 4096):
        seed += 1
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3 * blocksize + 17, generator=gen) * torch.rand(3 * blocksize + 17, generator=gen) ** 3
        blockwise8_case(out, f"blockwise8_bs{blocksize}", x, blocksize)
    save_file(
        {"dynamic_map": F.create_dynamic_map(signed=True).contiguous()},
        str(out / "dynamic_map.safetensors"),
        metadata=metadata(kind="map"),
    )
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {len(list(out.glob('*.safetensors')))} files, {total} bytes, safetensors {safetensors.__version__}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(pathlib.Path(sys.argv[1]))
