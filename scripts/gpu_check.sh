#!/usr/bin/env bash
# The GPU check of issue 8 in one command: the CUDA kernels of crates/quant (csrc/cuda/) against
# the CPU reference byte for byte, against bitsandbytes' CUDA kernels, and timed (dequantize vs a
# device-to-device copy of the same bytes, gemv vs bitsandbytes' gemv_4bit); the 4-bit layer on
# the GPU against the CPU; then QLoRA SFT on a generated 1.1B Llama by `sft` and by TRL's
# SFTTrainer (peft + bitsandbytes) on the same GPU, tokens/s and losses side by side, and by `sft`
# again with half the layers offloaded to host memory by a device map (offload_compare.json:
# "nibble" = offloaded, "trl" = the single-device nibble run).
#
# Two halves, because the GPU machine has no cargo and no network:
#
#   scripts/gpu_check.sh --prepare   here: builds crates/quant/examples/cuda_check.rs and the
#                                    `sft` binary with `--features cuda` (needs `cargo xtask cuda`
#                                    first), stages them in target/gpu-check/, and unpacks the
#                                    Python packages the GPU image lacks (bitsandbytes with only its
#                                    CPU and CUDA 13 libraries, trl, datasets, dill, multiprocess,
#                                    at the versions of xtask/python/requirements.lock) into
#                                    target/gpu-check/site.
#   scripts/gpu_check.sh             there (or here: without a GPU it says so, runs the CPU
#                                    fallback check and the SFT comparison on the tiny model, both
#                                    stacks on the CPU, and exits 0). Carry `target/gpu-check`.
#                                    Results go to $OUT (if set) or target/gpu-check/out.
#
# Needs on the GPU machine: python3 with torch 2.11.0 (+cu130), transformers, peft, accelerate
# (the image has them) -- the prebuilt binaries link that libtorch through LD_LIBRARY_PATH, set
# below from python3's torch.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stage="$root/target/gpu-check"
bnb_version="0.50.2"

if [[ "${1:-}" == "--prepare" ]]; then
  cd "$root"
  started=$(date +%s)
  cargo build -p quant --features cuda --example cuda_check
  cargo build --release -p sft --features cuda --bin sft
  mkdir -p "$stage"
  cp target/debug/examples/cuda_check "$stage/cuda_check"
  cp target/release/sft "$stage/sft"
  strip "$stage/cuda_check" "$stage/sft" 2>/dev/null || true
  # Wheels for Python 3.12 on x86-64, unpacked (a wheel is a zip of site-packages) so the GPU side
  # needs no pip; bitsandbytes keeps only the libraries torch cu130 loads.
  lock="$root/xtask/python/requirements.lock"
  pins=("bitsandbytes==$bnb_version")
  for name in trl datasets dill multiprocess; do
    pins+=("$(grep -i "^$name==" "$lock")")
  done
  wheels="$stage/wheels"
  mkdir -p "$wheels"
  "${NIBBLE_PYTHON:-python3}" -m pip download --disable-pip-version-check --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$wheels" "${pins[@]}"
  rm -rf "$stage/site"
  mkdir -p "$stage/site"
  for w in "$wheels"/*.whl; do
    "${NIBBLE_PYTHON:-python3}" -m zipfile -e "$w" "$stage/site"
  done
  find "$stage/site/bitsandbytes" -name 'libbitsandbytes_*.so' \
    ! -name 'libbitsandbytes_cpu.so' ! -name 'libbitsandbytes_cuda130.so' -delete
  rm -rf "$wheels"
  echo "gpu_check: prepared in $(( $(date +%s) - started ))s: $(du -sh "$stage" | cut -f1) in target/gpu-check"
  echo "gpu_check: on the GPU machine run: bash scripts/gpu_check.sh   (carry: target/gpu-check)"
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

# QLoRA SFT by nibble and by TRL from the same initial adapter on the same data: on a GPU a
# generated 1.1B Llama (20 steps), in the dry run the shipped tiny model (3 steps, CPU).
sft_compare() {
  if [[ ! -x "$stage/sft" ]]; then
    echo "gpu_check: $stage/sft is missing (run --prepare): no SFT comparison"
    return 1
  fi
  local model steps
  if [[ "$gpu" == 1 ]]; then
    model=/tmp/gpu-check-llama-1b
    steps=20
    [[ -f "$model/config.json" ]] || "$py" "$root/scripts/make_bench_model.py" 1b "$model"
  else
    model="$root/models/tiny-llama"
    steps=3
  fi
  local recipe="$root/recipes/bench/gpu-1b.yaml"
  local run="$out/sft"
  rm -rf "$run"
  mkdir -p "$run"
  echo "gpu_check: SFT on $model, $steps steps: TRL"
  "$py" "$root/scripts/bench_trl.py" init "$recipe" "$run/init" --model_name_or_path "$model" || return 1
  "$py" "$root/scripts/bench_trl.py" train "$recipe" "$run/trl.jsonl" --model_name_or_path "$model" \
    --lora_init_adapter "$run/init" --max_steps "$steps" --output_dir "$run/trl" | tee "$run/trl-summary.json" || return 1
  echo "gpu_check: SFT on $model, $steps steps: nibble"
  (cd "$root" && "$stage/sft" "$recipe" --model_name_or_path "$model" --lora_init_adapter "$run/init" \
    --max_steps "$steps" --output_dir "$run/nibble") || return 1
  "$py" "$root/scripts/gpu_sft_compare.py" "$run/nibble/log.jsonl" "$run/trl.jsonl" "$out/sft_compare.json"
  # The same nibble run with the second half of the decoder layers offloaded to host memory by a
  # device map (4-bit codes streamed to the GPU per product; in the dry run all on the CPU):
  # losses must equal the single-device run's; tokens/s shows the streaming cost.
  local layers map dev
  layers=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$model/config.json")
  dev=$([[ "$gpu" == 1 ]] && echo 0 || echo '"cpu"')
  map="{\"device_map\": {\"\": $dev"
  for ((l = layers / 2; l < layers; l++)); do map+=", \"model.layers.$l\": \"cpu\""; done
  map+="}}"
  echo "gpu_check: SFT on $model, $steps steps: nibble, layers $((layers / 2))-$((layers - 1)) offloaded"
  (cd "$root" && "$stage/sft" "$recipe" --model_name_or_path "$model" --lora_init_adapter "$run/init" \
    --max_steps "$steps" --output_dir "$run/nibble-offload" --model_init_kwargs "$map") || return 1
  "$py" "$root/scripts/gpu_sft_compare.py" "$run/nibble-offload/log.jsonl" "$run/nibble/log.jsonl" \
    "$out/offload_compare.json"
}

gpu=1
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  gpu=0
  echo "gpu_check: NO CUDA GPU on this machine (torch.cuda.is_available() is False):"
  echo "gpu_check: the GPU checks were NOT run; only the CPU fallback of the binary is checked."
  "$stage/cuda_check"
  sft_compare
  echo "gpu_check: dry run done (no GPU)"
  exit 0
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
command -v nvcc >/dev/null && nvcc --version | tail -2 || true

# bitsandbytes, trl, datasets: the machine has none and no network; they travel unpacked in
# target/gpu-check/site (see --prepare). (The dry run above uses the local Python's own.)
if [[ -d "$stage/site" ]]; then
  export PYTHONPATH="$stage/site${PYTHONPATH:+:$PYTHONPATH}"
fi
bnb_args=()
if "$py" -c 'import bitsandbytes' 2>/dev/null; then
  if "$py" "$root/scripts/gpu_check_bnb.py" "$out/bnb.safetensors"; then
    bnb_args=(--bnb "$out/bnb.safetensors")
  else
    echo "gpu_check: WARNING: scripts/gpu_check_bnb.py failed; no bitsandbytes comparison"
  fi
else
  echo "gpu_check: WARNING: bitsandbytes not importable (carry target/gpu-check/site); no bitsandbytes comparison"
fi
rm -f "$out/bnb.safetensors.keep"

status=0
"$stage/cuda_check" "${bnb_args[@]}" --json "$out/cuda_check.json" || status=$?
rm -f "$out/bnb.safetensors"  # large; the numbers are in cuda_check.json
sft_compare || status=$?
echo "gpu_check: done (exit $status); results in $out"
exit "$status"
