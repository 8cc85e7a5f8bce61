#!/usr/bin/env bash
# Issue 10 on a lent GPU (no package index there): the benchmark's workloads with and without overlap scheduling,
# each with its per-step profile, then the GPU cells of chapters 14b and 08b; optionally the engine checks.
#   bash tools/gpu_issue10.sh [shapes] [--engine-check]      (logs in $OUT when set, else /tmp/gpu_issue10)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT="${OUT:-/tmp/gpu_issue10}"; mkdir -p "$OUT"
SHAPES="${1:-W,256x512x512,1x128x256}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m nanovllm_lit.bench --shape "$SHAPES" --profile 2>&1 | tee "$OUT/bench_overlap.log" | grep -v Warning
python3 -m nanovllm_lit.bench --shape "$SHAPES" --profile --no-overlap 2>&1 | tee "$OUT/bench_sync.log" | grep -v Warning
python3 tools/run_cells.py nbs/14b_sampler_kernel.ipynb nbs/08b_overlap.ipynb 2>&1 | tee "$OUT/cells.log" | grep -v Warning
if [ "${2:-}" = "--engine-check" ]; then python3 tests/gpu_engine_check.py > "$OUT/engine_check.log" 2>&1; grep -E "^\[|passed in" "$OUT/engine_check.log"; fi
