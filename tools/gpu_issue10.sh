#!/usr/bin/env bash
# Issue 10 on a lent GPU (no package index there): the engine checks (overlap included), then the benchmark's
# workloads with and without overlap scheduling, each with its per-step profile. Logs go to $OUT when set.
#   bash tools/gpu_issue10.sh [W,256x512x512,1x128x256]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/gpu_issue10}"; mkdir -p "$OUT"
SHAPES="${1:-W,256x512x512,1x128x256}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u
python3 tests/gpu_engine_check.py > "$OUT/engine_check.log" 2>&1; grep -E "^\[|passed in" "$OUT/engine_check.log"
python3 -m nanovllm_lit.bench --shape "$SHAPES" --profile 2>&1 | tee "$OUT/bench_overlap.log" | grep -v Warning
python3 -m nanovllm_lit.bench --shape "$SHAPES" --profile --no-overlap 2>&1 | tee "$OUT/bench_sync.log" | grep -v Warning
