#!/usr/bin/env bash
# The MuseTalk GPU acceptance run: one command, offline, under 8 minutes on one CUDA GPU.
#
#   bench/gpu_check.sh            # full-shape random weights (official layout, made here), CUDA
#   bench/gpu_check.sh --cpu-smoke  # the same run end to end on a CPU with tiny weights
#
# Prints: fp16 UNet+VAE-decode throughput and peak GPU memory at batch 1/4/8/16/32, eager,
# with CUDA graphs and with torch.compile; then the number of concurrent sessions the real
# batcher holds at 25 fps with fps p5 >= 24 (see bench/musetalk.py). Needs the project
# installed with its musetalk extra and a CUDA torch (`make setup GPU=1`); no internet.
# Extra arguments go to bench/musetalk.py (e.g. --max-sessions 32, --seconds 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LIMIT_S=470  # the whole run, weights generation and torch.compile included
if [ "${1:-}" = "--cpu-smoke" ]; then
  shift
  set -- --tiny --device cpu --batch-sizes 1 4 --seconds 2 --max-sessions 2 "$@"
else
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    "no CUDA device: use --cpu-smoke for the CPU run")'
  set -- --full-shapes --device cuda "$@"
fi
started=$(date +%s)
timeout "$LIMIT_S" "$PYTHON" -u bench/musetalk.py --budget-s $((LIMIT_S - 40)) "$@"
echo "gpu_check: done in $(( $(date +%s) - started )) s"
