#!/usr/bin/env bash
# The GPU check of issue 8 in one command: the CUDA kernels of crates/quant (csrc/cuda/) against
# the CPU reference byte for byte, against bitsandbytes' CUDA kernels, and timed (dequantize vs a
# device-to-device copy of the same bytes, gemv vs bitsandbytes' gemv_4bit).
#
# Two halves, because the GPU machine has no cargo and no network:
#
#   scripts/gpu_check.sh --prepare   here: builds crates/quant/examples/cuda_check.rs with
#                                    `--features cuda` (needs `cargo xtask cuda` first), stages it
#                                    in target/gpu-check/, and downloads the bitsandbytes wheel
#                                    (Python 3.12, x86-64) into .whl/ (git-ignored via
#                                    .git/info/exclude).
#   scripts/gpu_check.sh             there (or here: without a GPU it says so, runs the CPU
#                                    fallback check, and exits 0). Carry `target/gpu-check` and
#                                    `.whl`. Results go to $OUT (if set) or target/gpu-check/out.
#
# Needs on the GPU machine: python3 with torch 2.11.0 (+cu130) -- the prebuilt binary links that
# libtorch through LD_LIBRARY_PATH, set below from python3's torch.
#
# TODO(issue 8): the QLoRA SFT step on a generated ~1B Llama-shaped model against
# peft + bitsandbytes + TRL on the same GPU (tokens/s >= 2x at the same loss) is not scripted yet:
# it needs the `sft` binary built with CUDA (libtorch_cuda force-linked into it, see
# crates/quant docs) and TRL carried as wheels.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage="$root/target/gpu-check"
bnb_version="0.50.2"

if [[ "${1:-}" == "--prepare" ]]; then
  cd "$root"
  started=$(date +%s)
  cargo build -p quant --features cuda --example cuda_check
  mkdir -p "$stage"
  cp target/debug/examples/cuda_check "$stage/cuda_check"
  strip "$stage/cuda_check" 2>/dev/null || true
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  if ! ls .whl/bitsandbytes-"$bnb_version"-*.whl >/dev/null 2>&1; then
    "${NIBBLE_PYTHON:-python3}" -m pip download --disable-pip-version-check --no-deps \
      --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "bitsandbytes==$bnb_version"
  fi
  echo "gpu_check: prepared in $(( $(date +%s) - started ))s: $(du -sh "$stage" | cut -f1) in target/gpu-check, $(du -sh .whl | cut -f1) in .whl"
  echo "gpu_check: on the GPU machine run: bash scripts/gpu_check.sh   (carry: target/gpu-check, .whl)"
  exit 0
fi

py="${NIBBLE_PYTHON:-python3}"
out="${OUT:-$stage/out}"
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee "$log") 2>&1

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if [[ ! -x "$stage/cuda_check" ]]; then
  echo "gpu_check: $stage/cuda_check is missing: run 'scripts/gpu_check.sh --prepare' where cargo is"
  exit 1
fi

if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $py cannot import torch: set NIBBLE_PYTHON to a Python with torch 2.11.0"
  exit 1
fi
# libtorch and the CUDA runtime of python3's torch wheel, for the prebuilt binary.
torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ld="$torch_dir/lib"
for d in "$(dirname "$torch_dir")"/nvidia/*/lib; do
  [[ -d "$d" ]] && ld="$ld:$d"
done
# The binary needs libcudart.so.13; wheels of other layouts (or a system toolkit) keep it elsewhere.
cudart="$(find "$(dirname "$torch_dir")" /usr/local/cuda/lib64 /usr/local/cuda/targets -maxdepth 5 \
  -name 'libcudart.so.13*' 2>/dev/null | head -1 || true)"
[[ -n "$cudart" ]] && ld="$ld:$(dirname "$cudart")"
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "gpu_check: torch $("$py" -c 'import torch; print(torch.__version__)') at $torch_dir"

if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: NO CUDA GPU on this machine (torch.cuda.is_available() is False):"
  echo "gpu_check: the GPU checks were NOT run; only the CPU fallback of the binary is checked."
  "$stage/cuda_check"
  echo "gpu_check: dry run done (no GPU)"
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
command -v nvcc >/dev/null && nvcc --version | tail -2 || true

# bitsandbytes: the machine has none and no network; the wheel travels in .whl/.
bnb_args=()
if ! "$py" -c 'import bitsandbytes' 2>/dev/null; then
  if ls "$root"/.whl/bitsandbytes-*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu-check-site "$root"/.whl/bitsandbytes-*.whl
    export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if "$py" -c 'import bitsandbytes' 2>/dev/null; then
  if "$py" "$root/scripts/gpu_check_bnb.py" "$out/bnb.safetensors"; then
    bnb_args=(--bnb "$out/bnb.safetensors")
  else
    echo "gpu_check: WARNING: scripts/gpu_check_bnb.py failed; no bitsandbytes comparison"
  fi
else
  echo "gpu_check: WARNING: bitsandbytes not importable (carry .whl); no bitsandbytes comparison"
fi
rm -f "$out/bnb.safetensors.keep"

status=0
"$stage/cuda_check" "${bnb_args[@]}" --json "$out/cuda_check.json" || status=$?
rm -f "$out/bnb.safetensors"  # large; the numbers are in cuda_check.json
echo "gpu_check: SFT-on-1B comparison: TODO (see the header of this script)"
echo "gpu_check: done (exit $status); results in $out"
exit "$status"
