#!/usr/bin/env bash
# GPU check (<= 10 min on one GPU): DistilGPT2-shaped DP (Opacus hooks; fastclip when present) vs
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
# 1. random-weight DistilGPT2 shape, every mode (a failing mode is reported and the next one runs)
timeout --signal=INT --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-290}" "$PY" benchmarks/gpu_check.py "$@" || rc=$?
# 2. the paper profile itself on this machine, when its assets are in the caches (`dpbias prefetch`
#    on a machine with network first): assets load offline, every way of training it uses, stage 03/04
#    timings, appended to benchmarks/throughput.csv (PREFLIGHT=0 skips it)
if [[ "${PREFLIGHT:-1}" == 1 && " $* " != *" --quick "* ]]; then
  timeout --signal=INT --kill-after=10 "${PREFLIGHT_TIMEOUT_S:-300}" \
    "$PY" -m dpbias_utils.cli preflight "${PARAMS:-params/paper-distilgpt2.yaml}" || rc=$?
fi
exit "${rc:-0}"
