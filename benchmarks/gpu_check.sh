#!/usr/bin/env bash
# GPU check: the real-model path on one NVIDIA GPU, offline, in under 8 minutes.
#
#   benchmarks/gpu_check.sh              one GPU, no network: a ~100M-parameter random-init Llama built locally,
#                                        LoRA probes (4 per GPU) + estimation + a short ZeRO-2 fine-tune on the GPU
#   benchmarks/gpu_check.sh --dry-run    the same path on CPU with tiny sizes (tests/test_gpu_check.py runs it)
#   benchmarks/gpu_check.sh --keep DIR   keep the run directory and gpu_check.json under DIR
#
# Prints: scoring tokens/s vs a raw forward of the same model and batches, fine-tune tokens/s, peak GPU memory
# per stage and each stage's wall time (README "GPU check"). Without a GPU it fails: it never falls back to CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, in the driver and in every Ray worker

if [[ " $* " != *" --dry-run "* ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: FAILED: no NVIDIA GPU on this machine (nvidia-smi is missing or lists no device); this check" \
         "never falls back to CPU (for the CPU smoke path: benchmarks/gpu_check.sh --dry-run)" >&2
    exit 2
  fi
fi
set +e
timeout --foreground 480 "$PY" benchmarks/gpu_check.py "$@"
rc=$?
set -e
if [ "$rc" -eq 124 ]; then
  echo "gpu_check: FAILED: over the 8-minute budget (killed after 480 s)" >&2
fi
exit "$rc"
