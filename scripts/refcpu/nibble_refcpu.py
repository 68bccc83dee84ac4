"""Pin the CPU paths bitsandbytes picks in a Python reference process, so that a parity test
compares nibble with the same reference on every x86-64 CPU.

bitsandbytes 0.50.2 picks CPU code paths from two probes, both read once at import time:
- `torch.backends.cpu.get_cpu_capability() == "AVX512"`: the int8 matmul becomes
  `torch._int_mm` (exact int32 sums instead of the f32 fallback), and the blocksize >= 2048
  dequantize fallback changes;
- the native `has_avx512bf16_cpu()` (CPUID), wrapped by `bitsandbytes.functional.has_avx512bf16`:
  `Linear4bit.forward` in eval mode without grad repacks its weight for a fused CPU kernel, which
  asserts `out_features % 32 == 0`, and a `gemv_4bit` CPU kernel is registered.

Modes, from `NIBBLE_REF_CPU` (read by `sitecustomize.py` beside this file, which the test suite
puts on `PYTHONPATH` through .cargo/nibble-defaults.toml; unset there means avx2):
- `avx2` (the suite's default): the decisions bitsandbytes makes on an AVX2 host, on any host:
  torch's capability reported to Python callers as "AVX2" where it is "AVX512", and
  `has_avx512bf16` false.
- `avx512bf16`: the decisions of an Intel host with AVX512-BF16/AMX, forced on any host: the
  capability reported as "AVX512" and `has_avx512bf16` true (where the host lacks AVX512-BF16,
  the fused kernel those decisions lead to raises instead of running).
- `native` or unset: nothing is changed (what a user's process does; `cargo xtask bench` runs so).
In the pinned modes ATen and MKL keep the host's own kernels, as in nibble's process: a live
comparison computes on the same kernels on both sides, and a golden file made on another kind
of CPU is compared within its float tolerance.

What cannot be pinned from Python: the native dequantize kernels pick their own AVX-512 code
by CPUID. Where that code is wrong (rows of a multiple of 16 elements but not of the blocksize;
blocksizes of 2048 and more) every pinned mode sends those rows to bitsandbytes' own torch
implementation, the path it takes for odd rows, so that the reference is right on every host. Where it only differs (FP4 code 8,
"-0", dequantizes to +0 there and -0 elsewhere) tests compare dequantized values as the format
defines them: +0 and -0 are the same value of the code. See docs/reference-cpu-paths.md.
"""

import importlib.abc
import importlib.util
import os
import sys

MODES = ("native", "avx2", "avx512bf16")

_applied = None


def applied():
    """The mode in effect in this process (None before `apply`)."""
    return _applied


def host_capability():
    """This host's ATen CPU capability, whatever the pin reports to Python callers (what golden
    files record as `cpu_capability`)."""
    import torch

    return torch._C._get_cpu_capability()


def apply(mode=None, default="native"):
    """Pin this process's reference CPU paths to `mode` (else `$NIBBLE_REF_CPU`, else `default`;
    golden scripts pass `default="avx2"`, the paths their committed files were made on). Call
    before torch or bitsandbytes is imported; calling again with the same mode is a no-op, with
    another one an error."""
    global _applied
    mode = mode or os.environ.get("NIBBLE_REF_CPU") or default
    if mode not in MODES:
        raise SystemExit(f"NIBBLE_REF_CPU={mode!r}: expected one of {', '.join(MODES)}")
    if _applied is not None:
        if _applied != mode:
            raise RuntimeError(f"reference CPU paths already pinned to {_applied}, not {mode}")
        return
    if mode != "native":
        late = [m for m in ("torch", "bitsandbytes") if m in sys.modules]
        if late:
            raise RuntimeError(f"pin the reference CPU paths before importing {', '.join(late)}")
        avx512 = mode == "avx512bf16"
        # Python children (datasets' workers) pin themselves the same way; other programs this
        # process starts (torchrun's `sft` ranks) keep their own CPU paths.
        os.environ["NIBBLE_REF_CPU"] = mode
        patches = {
            "bitsandbytes.cextension": lambda m: _force_bf16_probe(m, avx512),
            "bitsandbytes._ops": lambda m: _guard_cpu_kernels(m, avx512),
            "torch.backends.cpu": lambda m: _report_capability(m, avx512),
        }
        sys.meta_path.insert(0, _PatchAfterImport(patches))
    _applied = mode


_host_bf16 = None


def _force_bf16_probe(module, value):
    """`bitsandbytes.functional.has_avx512bf16` calls `lib.has_avx512bf16_cpu()` each time; an
    instance attribute shadows the native symbol for every caller. The host's own answer is kept
    (`_host_bf16`): the forced mode must not run AVX512-BF16 code on a host without it."""
    global _host_bf16
    try:
        _host_bf16 = bool(module.lib.has_avx512bf16_cpu())
    except (AttributeError, RuntimeError, OSError):
        _host_bf16 = False
    module.lib.has_avx512bf16_cpu = lambda: value


def _report_capability(module, avx512):
    """What `torch.backends.cpu.get_cpu_capability()` tells Python callers (bitsandbytes asks it
    once, at import): "AVX512" when forced, else "AVX2" in place of "AVX512". ATen itself keeps
    the host's kernels."""
    real = module.get_cpu_capability

    def get_cpu_capability():
        if avx512:
            return "AVX512"
        found = real()
        return "AVX2" if found == "AVX512" else found

    module.get_cpu_capability = get_cpu_capability


def _guard_cpu_kernels(ops, avx512):
    """Wraps two CPU kernels as `bitsandbytes.backends.cpu.ops` registers them (it takes
    `register_kernel` from `bitsandbytes._ops`, patched here first).

    `bitsandbytes::dequantize_4bit`, in every pinned mode:
    - rows of a multiple of 16 elements but not of the blocksize, and blocksizes of 2048 and more,
      go to bitsandbytes' own torch implementation (what it uses for odd rows, and for the large
      blocksizes when it sees AVX-512 itself): its native AVX-512 kernel, chosen by CPUID whatever
      this pin says, gets the first wrong (up to ~0.2 relative error) and has "accuracy issues"
      with the second, so a reference on such a host would not be bitsandbytes' format;
    - in the forced mode, every FP4 zero of the native kernel comes back +0 (code 8, "-0",
      included), as from the AVX-512 kernel, which only an AVX-512 host runs itself.

    `bitsandbytes::gemv_4bit` (registered in the forced mode): on a host without AVX512-BF16 its
    native kernel would stop the process with an illegal instruction; it raises instead, naming
    the way out, so the forced mode fails the way such a host's first step does."""
    register = ops.register_kernel

    def register_kernel(name, device_types, *args, **kwargs):
        decorate = register(name, device_types, *args, **kwargs)
        if device_types != "cpu":
            return decorate
        if name == "bitsandbytes::dequantize_4bit":
            return lambda native: decorate(_guarded_dequantize(native, avx512))
        if name == "bitsandbytes::gemv_4bit" and avx512 and not _host_bf16:
            return lambda native: decorate(_no_fused_kernel)
        return decorate

    ops.register_kernel = register_kernel


def _guarded_dequantize(native, avx512):
    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        n = shape[-1]
        if (n % 16 == 0 and n % blocksize != 0) or blocksize >= 2048:
            import torch
            from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
            from bitsandbytes.backends.utils import _get_4bit_code

            # Eager, as bitsandbytes falls back to when torch.compile fails: the same maths
            # without compiling a kernel per shape.
            compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
            codes = A if A.dtype == torch.uint8 else A.view(torch.uint8)
            code = _get_4bit_code(quant_type, A.device)
            return compute(codes.reshape(-1), absmax, code, blocksize, shape, dtype)
        out = native(A, absmax, blocksize, quant_type, shape, dtype)
        if avx512 and quant_type == "fp4" and n % 2 == 0:
            out.masked_fill_(out == 0, 0.0)
        return out

    return dequantize_4bit


def _no_fused_kernel(A, B, shapeB, absmax, code, blocksize):
    raise RuntimeError(
        "NIBBLE_REF_CPU=avx512bf16 on a host without AVX512-BF16: bitsandbytes repacked a 4-bit "
        "weight for its fused AVX512-BF16 kernel (eval mode, no grad), which this CPU cannot run; "
        "keep the model on the portable path with nibble_refcpu.portable_4bit(model)"
    )


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patches[name](module)` right after module `name` executes, before anyone imports
    names from it."""

    def __init__(self, patches):
        self.patches = dict(patches)

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        spec = importlib.util.find_spec(name)  # the other finders (this one no longer knows `name`)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            loader.exec_module = exec_module  # once: a loader may serve other modules later
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch
        return spec


def portable_4bit(model):
    """Keep every bitsandbytes `Linear4bit` in `model` on the CPU path that is the same on every
    host, whatever `apply` pinned: its eval-mode, no-grad forward otherwise repacks the weight for
    the AVX512-BF16 kernel where `has_avx512bf16()` was true when the module was built (and
    asserts `out_features % 32 == 0`). The flag is the per-module copy bitsandbytes takes of that
    probe; train mode would do the same but also changes dropout. Returns `model`."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
