"""Split-K for the narrow projections at 17-256 rows? (`python tests/gpu_splitk_bench.py`; an experiment, not the engine's code)

`o_proj` (2048 -> 1024) and `down_proj` (3072 -> 1024) have only 1,024 outputs: at 32-256 rows that is 16-128 output
tiles for 132 SMs, and cuBLAS reads them at a third of their floor (chapter 17, 2026-12-07). Here a Triton matmul
also splits K over S programs per tile; each stores its fp32 partial, and the last one of a tile to finish adds the
S partials in order and writes bf16 (chapter 09a's fold, per (row block, column block)). Prints per shape and row
count the best split against cuBLAS, then the whole step's 113 matmuls as one graph: all cuBLAS, and cuBLAS with
the split kernel for those two layers. Every result is checked against `F.linear` (relative 1e-2 of the largest).
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch, triton, triton.language as tl
import torch.nn.functional as F

@triton.jit
def _mm_splitk(x_ptr, w_ptr, y_ptr, part_ptr, lock_ptr, M, N, K, k_len,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid, s, S = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    nn = tl.cdiv(N, BN)
    pm, pn = pid // nn, pid % nn
    rm, rn, rk = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    k_start = s * k_len
    for k0 in range(k_start, k_start + k_len, BK):
        kk = k0 + rk[None, :]
        x = tl.load(x_ptr + rm[:, None] * K + kk, mask=(rm[:, None] < M) & (kk < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + kk, mask=(rn[:, None] < N) & (kk < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if S == 1:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (s * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)
        tl.debug_barrier()
        if tl.atomic_add(lock_ptr + pid, 1, sem="acq_rel") == S - 1:     # the last of this tile's S programs
            total = tl.zeros([BM, BN], tl.float32)
            for j in range(0, S):
                total += tl.load(part_ptr + (j * M + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(lock_ptr + pid, 0)

LOCKS = {}
def mm_splitk(x, w, y, part, cfg):
    bm, bn, bk, warps, stages, S = cfg
    M, K = x.shape; N = w.shape[0]
    k_len = triton.cdiv(triton.cdiv(K, S), bk) * bk
    S = triton.cdiv(K, k_len)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if x.device not in LOCKS: LOCKS[x.device] = torch.zeros(1 << 16, dtype=torch.int32, device=x.device)
    _mm_splitk[(tiles, S)](x, w, y, part, LOCKS[x.device], M, N, K, k_len, bm, bn, bk, num_warps=warps, num_stages=stages)

CFGS = [(bm, bn, 128, 4, 3, s) for bm in (32, 64) for bn in (32, 64, 128) for s in (1, 2, 4, 8)]

if __name__ == "__main__":
    if not torch.cuda.is_available(): sys.exit("gpu_splitk_bench: no CUDA device")
    from nanovllm_lit.bench import measure_card
    card = measure_card()
    print(f"{card['name']} | torch {torch.__version__} | triton {triton.__version__} | {time.strftime('%Y-%m-%d')} | "
          f"copy {card['bandwidth'] / 1e12:.2f} TB/s, bf16 {card['flops'] / 1e12:.0f} TFLOP/s")
    from gpu_gemm_bench import SHAPES, graph_ms                   # the same layers, timed the same way
    bad = 0
    for M in (32, 64, 128, 256):
        bufs, best_cfg = {}, {}
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            part = torch.empty(8 * M * N, device="cuda", dtype=torch.float32) if name in ("o", "down") else None
            bufs[name] = (x, w, y, part)
            if part is None: continue
            ref = F.linear(x, w).float()
            t_cublas, best = graph_ms(lambda: F.linear(x, w)), (float("inf"), None)
            for cfg in CFGS:
                try: t = graph_ms(lambda: mm_splitk(x, w, y, part, cfg))
                except Exception as e: print(f"  {name} M={M} {cfg}: {type(e).__name__}"); continue
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2: bad += 1; print(f"  MISMATCH {name} M={M} {cfg}: {err:.2e}"); continue
                if t < best[0]: best = (t, cfg)
            best_cfg[name] = best[1]
            floor = max(2 * M * N * K / card["flops"], 2 * (N * K + M * K + M * N) / card["bandwidth"]) * 1e3
            print(f"M={M:3d} {name:5s} cuBLAS {t_cublas * 1e3:6.1f} us ({floor / t_cublas:.2f} of floor) | split-K best "
                  f"{best[0] * 1e3:6.1f} us ({floor / best[0]:.2f}) {best[1]}")
        order = [n for _ in range(28) for n in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
        lin = lambda n: F.linear(bufs[n][0], bufs[n][1])
        t_all = graph_ms(lambda: [lin(n) for n in order], reps=1)
        t_mix = graph_ms(lambda: [mm_splitk(*bufs[n], best_cfg[n]) if n in best_cfg else lin(n) for n in order], reps=1)
        print(f"M={M:3d} whole step's matmuls as one graph: cuBLAS {t_all:.3f} ms, with split-K o/down {t_mix:.3f} ms "
              f"({t_all / t_mix:.2f}x)")
    print("FAILED" if bad else "all split-K results match F.linear")
    sys.exit(1 if bad else 0)
