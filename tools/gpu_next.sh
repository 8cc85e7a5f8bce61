#!/usr/bin/env bash
# Issue 10's GPU work of 2026-12-06, one part per device call (each well under 10 min):
#   bash tools/gpu_next.sh check    correctness: chapters 12b, 14b and 08's cells (08: replayed graphs, now with
#                                   the LM head and sampler inside, == eager; 14b: a graph's sampler draws anew;
#                                   12b: the fused QKV epilogue == the chain in bf16, engine fused == unfused),
#                                   09a's GEMV (no sweep), and the engine
#                                   checks that run the kernel backends against HF and the torch backend
#   bash tools/gpu_next.sh bench    the three workloads with everything on (--profile), then batch 1 and
#                                   256x512/512 with the GEMV (and its fused SiLU), the fused epilogue and the graph's
#                                   sampler off
#   bash tools/gpu_next.sh quick    with little device time left: engine vs HF, 08/14b cells, batch 1 and 256x512/512
#   bash tools/gpu_next.sh sampler  batch 1 and 256x512/512 with only the graph's LM head + sampler off (08)
#   bash tools/gpu_next.sh pdl      2026-12-07: 09a/12b cells, engine vs HF, the workloads with PDL / the norm kernel on, off
#   bash tools/gpu_next.sh day      2026-12-07: the workloads with the step table, decode attention's tile sweep, and
#                                   the Triton-matmul-vs-cuBLAS experiment at 32-256 rows (tests/gpu_gemm_bench.py)
#   bash tools/gpu_next.sh splitk   (run 2026-12-07, third session) split-K for o_proj/down_proj at 32-256 rows vs cuBLAS
#   bash tools/gpu_next.sh h200     one call on an H200: engine vs HF, the workloads with the step table (item 5), then
#                                   the one-row tiles (today's vs BK = 512) and the fused norm off, at batch 1 and 16
#   bash tools/gpu_next.sh norm     2026-12-07 (third session): 09a's norm read on the way in (cells on the GPU, engine
#                                   vs HF), then batch 1 with it on and off (NANOVLLM_LIT_FUSED_NORM=0), twice each
#   bash tools/gpu_next.sh tiles    2026-12-07 (fourth session): engine vs HF, then tests/gpu_pdl_bench.py: the one-row
#                                   whole-slice tiles vs BK = 512, the fused norm at 1 vs 16 rows, at batch 1 and 16
#   bash tools/gpu_next.sh fused    2026-12-07 (fifth session): chapter 12c's decode kernel with the epilogue inside:
#                                   09a/10a/12c cells on the GPU, engine vs HF, batch 1/16/256 with it on and off
#   bash tools/gpu_next.sh fused2   the same kernel: speculative rows on the GPU (greedy identity in fp32), and the
#                                   workloads (W included) with it on and off, a second time
#   bash tools/gpu_next.sh fused3   fused2 cut to about 6 minutes (no W)
#   bash tools/gpu_next.sh cells6   2026-12-07 (sixth session): 10a's, 12c's and 09a's cells on the GPU (09a's timing cell
#                                   now also times in a graph: not yet run on a GPU) (12c's per-layer timing
#                                   now at 256 rows too: a torch matmul there, 09a's GEMV takes up to 16)
#   bash tools/gpu_next.sh h200short  the h200 part without the tile comparison (about 5 minutes): engine vs HF, the
#                                   three workloads with the step table
#   bash tools/gpu_next.sh tp       2 GPUs: TP=2 start-up with and without 08a's compile-in-turn, TP checks, W at TP=2
#   bash tools/gpu_next.sh spec     issue 13: greedy identity of speculative decoding in fp32 with the GEMV on
#                                   (the 2026-12-05 fp32 run predates it: a verify pass of 5 rows and a plain step of
#                                   1 row now take different GEMV tiles)
# Logs in $OUT when set (the device tool brings them back), else /tmp/gpu_next.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 MPLBACKEND=Agg
OUT="${OUT:-/tmp/gpu_next}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "${1:-check}" in
  check)
    for ch in 12b_qkv_epilogue 14b_sampler_kernel 08_model_runner 10a_triton_kernels; do
      timeout 100 python3 tools/run_cells.py nbs/$ch.ipynb > "$OUT/cells_$ch.log" 2>&1; echo "$ch cells rc $?"
      grep -v "Warning\|ok (" "$OUT/cells_$ch.log" | tail -8
    done
    timeout 100 python3 tests/gpu_gemv_bench.py --no-sweep > "$OUT/gemv.log" 2>&1; echo "gemv rc $?"
    grep -v Warning "$OUT/gemv.log" | tail -40
    timeout 240 python3 tests/gpu_engine_check.py --only "fp32 triton" "fp32 torch" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log" ;;
  bench)
    timeout 330 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -60
    NANOVLLM_LIT_GEMV=0 NANOVLLM_LIT_FUSED_QKV=0 NANOVLLM_LIT_GRAPH_SAMPLER=0 NANOVLLM_LIT_FUSED_ACT=0 NANOVLLM_LIT_PDL=0 NANOVLLM_LIT_NORM_KERNEL=0 timeout 200 python3 -m nanovllm_lit.bench --shape 1x128x256,256x512x512 \
      > "$OUT/bench_off.log" 2>&1; echo "bench (GEMV, fused epilogue, graph sampler off) rc $?"; grep -v Warning "$OUT/bench_off.log" | tail -12 ;;
  quick)   # what fits one call when little device time is left: engine vs HF, 08 and 14b cells, two workloads
    timeout 200 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    for ch in 08_model_runner 14b_sampler_kernel; do
      timeout 90 python3 tools/run_cells.py nbs/$ch.ipynb > "$OUT/cells_$ch.log" 2>&1; echo "$ch cells rc $?"
      grep -v "Warning\|ok (" "$OUT/cells_$ch.log" | tail -6
    done
    timeout 200 python3 -m nanovllm_lit.bench --shape 1x128x256,256x512x512 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -40 ;;
  sampler)
    NANOVLLM_LIT_GRAPH_SAMPLER=0 timeout 280 python3 -m nanovllm_lit.bench --shape 1x128x256,256x512x512 --profile \
      > "$OUT/bench_sampler_off.log" 2>&1; echo "bench (graph sampler off) rc $?"; grep -v Warning "$OUT/bench_sampler_off.log" | tail -40 ;;
  spec)
    timeout 300 python3 tests/gpu_spec_check.py --dtype float32 --eps 0.01 > "$OUT/spec_fp32.log" 2>&1; echo "spec rc $?"
    grep -v Warning "$OUT/spec_fp32.log" | tail -12 ;;
  first)   # 2026-12-07, first call: GEMV (new defaults) correctness + sweep + whole step, engine vs HF, the workloads
    timeout 170 python3 tests/gpu_gemv_bench.py --sweep-budget-s 60 > "$OUT/gemv.log" 2>&1; echo "gemv rc $?"
    grep -v Warning "$OUT/gemv.log" | tail -75
    timeout 150 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    timeout 260 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -60 ;;
  pdl)     # 2026-12-07: PDL (10a, 09a, 12b) and 12b's norm kernel checked, then measured with each on and off
    for ch in 09a_gemv 12b_qkv_epilogue; do   # (08, 10a: covered end to end by the engine check below)
      timeout 100 python3 tools/run_cells.py nbs/$ch.ipynb > "$OUT/cells_$ch.log" 2>&1; echo "$ch cells rc $?"
      grep -v "Warning\|ok (" "$OUT/cells_$ch.log" | tail -6
    done
    timeout 150 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    timeout 200 python3 -m nanovllm_lit.bench --shape 1x128x256,256x512x512,W --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -50
    NANOVLLM_LIT_PDL=0 timeout 80 python3 -m nanovllm_lit.bench --shape 1x128x256 --profile > "$OUT/bench_nopdl.log" 2>&1
    echo "bench (PDL off) rc $?"; grep -v Warning "$OUT/bench_nopdl.log" | tail -22
    NANOVLLM_LIT_NORM_KERNEL=0 timeout 80 python3 -m nanovllm_lit.bench --shape 1x128x256 > "$OUT/bench_nonorm.log" 2>&1
    echo "bench (norm kernel off) rc $?"; grep -v Warning "$OUT/bench_nonorm.log" | tail -5 ;;
  day)      # 2026-12-07 (second session), one call: the workloads with every step timed (17a's step table), decode
            # attention's configurations (10a), and whether a Triton matmul beats cuBLAS at 32-256 rows
    timeout 190 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -90
    timeout 120 python3 tests/gpu_attention_sweep.py --budget-s 75 --write "$OUT/attn_best.json" > "$OUT/attn_sweep.log" 2>&1
    echo "sweep rc $?"; grep -v Warning "$OUT/attn_sweep.log" | tail -20
    timeout 120 python3 tests/gpu_gemm_bench.py > "$OUT/gemm.log" 2>&1; echo "gemm rc $?"; grep -v Warning "$OUT/gemm.log" | tail -40 ;;
  h200)     # next call on an H200: engine vs HF, the workloads with the step table (item 5), then the one-row tiles
            # and the fused norm's row limit of 2026-12-07 (fourth session) measured there too
    timeout 140 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    timeout 200 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -90
    timeout 230 python3 tests/gpu_pdl_bench.py --budget-s 200 --rows 1,16 --shapes 1x128x256,16x128x256 --runs 1 \
      --ways 1:today,1:old --env NANOVLLM_LIT_FUSED_NORM=0 > "$OUT/tiles.log" 2>&1
    echo "tiles rc $?"; grep -v "Warning\|^  host\|^    [a-z]" "$OUT/tiles.log" | tail -50 ;;
  norm)
    timeout 100 python3 tools/run_cells.py nbs/09a_gemv.ipynb > "$OUT/cells_09a.log" 2>&1; echo "09a cells rc $?"
    grep -v "Warning\|ok (" "$OUT/cells_09a.log" | tail -12
    timeout 130 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    for run in ${NORM_RUNS:-1 2}; do for fused in 1 0; do
      NANOVLLM_LIT_FUSED_NORM=$fused timeout 80 python3 -m nanovllm_lit.bench --shape 1x128x256 $([ $run = 1 ] && echo --profile) \
        > "$OUT/bench_norm${fused}_$run.log" 2>&1; echo "batch 1, fused norm=$fused (run $run) rc $?"
      grep -E "Throughput|ratio|decode, batch 1|per decode step|GPU, ms|matmul|fused norm" "$OUT/bench_norm${fused}_$run.log"
    done; done ;;
  splitk)   # run 2026-12-07 (third session; chapter 17): split-K for o_proj/down_proj at 32-256 rows vs cuBLAS
    timeout 170 python3 tests/gpu_splitk_bench.py > "$OUT/splitk.log" 2>&1; echo "split-K rc $?"; grep -v Warning "$OUT/splitk.log" | tail -16 ;;
  tiles)
    timeout 130 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    timeout 440 python3 tests/gpu_pdl_bench.py --budget-s 400 --rows 1,16 --shapes 1x128x256,16x128x256 \
      --ways 1:today,1:old,1:today+norm16 --env NANOVLLM_LIT_FUSED_NORM=0 > "$OUT/tiles.log" 2>&1
    echo "tiles rc $?"; grep -v "Warning\|^  host\|^    [a-z]" "$OUT/tiles.log" | tail -80 ;;
  fused)
    for ch in 12c_decode_epilogue 09a_gemv 10a_triton_kernels; do
      timeout 100 python3 tools/run_cells.py nbs/$ch.ipynb > "$OUT/cells_$ch.log" 2>&1; echo "$ch cells rc $?"
      grep -v "Warning\|ok (\|warn_once" "$OUT/cells_$ch.log" | tail -14
    done
    timeout 130 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    for fused in 1 0; do
      NANOVLLM_LIT_FUSED_DECODE=$fused timeout 100 python3 -m nanovllm_lit.bench --shape 1x128x256,16x128x256,256x512x512 \
        --profile > "$OUT/bench_fused$fused.log" 2>&1; echo "bench, fused decode=$fused rc $?"
      grep -E "Throughput|ratio|per decode step|GPU, ms|matmul|attention|kernels" "$OUT/bench_fused$fused.log" | head -40
    done ;;
  fused2)  # (after "fused": the kernel is opt-in now, NANOVLLM_LIT_FUSED_DECODE=1)
    timeout 100 python3 tools/run_cells.py nbs/12c_decode_epilogue.ipynb > "$OUT/cells_12c.log" 2>&1; echo "12c cells rc $?"
    grep -v "Warning\|ok (\|warn_once" "$OUT/cells_12c.log" | tail -8
    NANOVLLM_LIT_FUSED_DECODE=1 timeout 170 python3 tests/gpu_spec_check.py --dtype float32 --eps 0.01 --max-tokens 64 \
      > "$OUT/spec_fp32.log" 2>&1; echo "spec (fused decode on) rc $?"; grep -v Warning "$OUT/spec_fp32.log" | tail -12
    for run in 1 2; do for fused in 0 1; do
      NANOVLLM_LIT_FUSED_DECODE=$fused timeout 75 python3 -m nanovllm_lit.bench --shape 1x128x256,16x128x256,W \
        > "$OUT/bench2_fused${fused}_$run.log" 2>&1; echo "bench, fused decode=$fused (run $run) rc $?"
      grep -E "Throughput|ratio" "$OUT/bench2_fused${fused}_$run.log" | head -12
    done; done ;;
  fused3)  # fused2 cut to what fits 6 minutes: 12c cells, the speculative GPU check with it on, batch 1/16 on and off
    timeout 90 python3 tools/run_cells.py nbs/12c_decode_epilogue.ipynb > "$OUT/cells_12c.log" 2>&1; echo "12c cells rc $?"
    grep -v "Warning\|ok (\|warn_once" "$OUT/cells_12c.log" | tail -8
    NANOVLLM_LIT_FUSED_DECODE=1 timeout 150 python3 tests/gpu_spec_check.py --dtype float32 --eps 0.01 --max-tokens 48 \
      > "$OUT/spec_fp32.log" 2>&1; echo "spec (fused decode on) rc $?"; grep -v Warning "$OUT/spec_fp32.log" | tail -12
    for fused in 0 1; do
      NANOVLLM_LIT_FUSED_DECODE=$fused timeout 60 python3 -m nanovllm_lit.bench --shape 1x128x256,16x128x256 \
        > "$OUT/bench3_fused${fused}.log" 2>&1; echo "bench, fused decode=$fused rc $?"
      grep -E "Throughput|ratio" "$OUT/bench3_fused${fused}.log" | head -8
    done ;;
  h200short)
    timeout 120 python3 tests/gpu_engine_check.py --only "fp32 triton" "bf16 CUDA" > "$OUT/engine_check.log" 2>&1
    echo "engine check rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check.log"
    timeout 220 python3 -m nanovllm_lit.bench --shape W,256x512x512,1x128x256 --profile > "$OUT/bench.log" 2>&1
    echo "bench rc $?"; grep -v Warning "$OUT/bench.log" | tail -90 ;;
  cells6)
    for ch in 10a_triton_kernels 12c_decode_epilogue 09a_gemv; do
      timeout 150 python3 tools/run_cells.py nbs/$ch.ipynb > "$OUT/cells_$ch.log" 2>&1; echo "$ch cells rc $?"
      grep -v "Warning\|ok (\|warn_once" "$OUT/cells_$ch.log" | tail -10
    done ;;
  tp)      # needs 2 GPUs (kind nvidia-h100-x2): TP=2 start-up time with fresh compile caches, every rank compiling for
           # itself (NANOVLLM_LIT_COMPILE_IN_TURN=0) and in turn (08a), then the TP engine checks and W at TP=2
    for turn in 0 1; do
      TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) NANOVLLM_LIT_COMPILE_IN_TURN=$turn timeout 280 \
        python3 -c "import time; t = time.time(); from nanovllm_lit.bench import _engine; \
llm, _ = _engine(None, None, dict(tensor_parallel_size=2)); print(f'TP=2 start-up, compile in turn=$turn: {time.time() - t:.0f} s'); llm.exit()" \
        > "$OUT/tp_start_$turn.log" 2>&1; echo "start-up (in turn=$turn) rc $?"; grep "start-up" "$OUT/tp_start_$turn.log"
    done
    timeout 200 python3 tests/gpu_engine_check.py --tp 2 --only-tp > "$OUT/engine_check_tp.log" 2>&1
    echo "engine check --tp 2 rc $?"; grep -E "^\[|passed in|FAIL" "$OUT/engine_check_tp.log"
    timeout 150 python3 -m nanovllm_lit.bench --tp 2 > "$OUT/bench_tp.log" 2>&1; echo "W tp=2 rc $?"; grep -v Warning "$OUT/bench_tp.log" | tail -5 ;;
  *) echo "unknown part ${1}: check | quick | bench | sampler | spec | first | pdl | day | h200 | norm | splitk | tiles | fused | fused2 | fused3 | tp"; exit 2 ;;
esac
