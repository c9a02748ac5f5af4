#!/usr/bin/env bash
# GPU check (<= 5 min on one GPU): DistilGPT2-shaped DP (Opacus hooks; fastclip when present) vs
# non-DP throughput and peak memory at the paper profile's block size; prints ratios and CSV lines
# for benchmarks/throughput.csv. Random weights: no hub needed.
#   benchmarks/gpu_check.sh                 # on the GPU machine
#   benchmarks/gpu_check.sh --append benchmarks/throughput.csv
#   benchmarks/gpu_check.sh --quick         # tiny shape, runs on CPU in seconds (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, transformers, opacus" 2>/dev/null; then
  echo "gpu_check: $PY lacks torch/transformers/opacus (run 'make setup' or set PYTHON=...)" >&2
  exit 2
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch; print('cuda available:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec timeout --signal=INT --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-290}" "$PY" benchmarks/gpu_check.py "$@"
