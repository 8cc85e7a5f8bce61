#!/usr/bin/env bash
# What the 2026-12-04 sessions left unrun on the GPU (device time ran out), one part per device call (each < 10 min):
#   bash tools/gpu_next.sh spec     issue 13: greedy identity in fp32 (bf16 diverged at batch 16) + 08c's GPU cell
#   bash tools/gpu_next.sh bench    issue 10 item 3: host ms per step with the one-copy decode inputs (chapter 08)
#   bash tools/gpu_next.sh check    tests/gpu_engine_check.py, all checks (~8 min)
# Logs in $OUT when set (the device tool brings them back), else /tmp/gpu_next.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 MPLBACKEND=Agg
OUT="${OUT:-/tmp/gpu_next}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u
case "${1:-spec}" in
  spec)
    timeout 240 python3 tests/gpu_spec_check.py --dtype float32 --eps 0.01 > "$OUT/spec_fp32.log" 2>&1
    grep -v Warning "$OUT/spec_fp32.log" | tail -9
    timeout 240 python3 tools/run_cells.py nbs/08c_speculative.ipynb > "$OUT/cells_08c.log" 2>&1
    grep -v Warning "$OUT/cells_08c.log" | tail -6 ;;
  bench)
    timeout 500 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    grep -v Warning "$OUT/bench.log" | tail -60 ;;
  check)
    timeout 570 python3 tests/gpu_engine_check.py > "$OUT/engine_check.log" 2>&1
    grep -E "^\[|passed in" "$OUT/engine_check.log" ;;
  *) echo "unknown part ${1}: spec | bench | check"; exit 2 ;;
esac
