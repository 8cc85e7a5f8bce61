"""Would a Triton matmul beat cuBLAS for a decode step's linear layers at 32-256 rows? (`python tests/gpu_gemm_bench.py`)

No nbdev, no pytest. For Qwen3-0.6B's four layer shapes and its LM head, at M = 32, 64, 128, 256 rows (decode
batches above chapter 09a's GEMV), times `F.linear` (cuBLAS) and a plain Triton tiled matmul under a few tile
configurations, each replayed from a CUDA graph of 20 calls; prints per shape the best Triton time against
cuBLAS, both as TFLOP/s and as a ratio to the floor max(FLOPs / bf16 rate, bytes / copy bandwidth), the card
measured in the same run, and the whole step (28 layers + head) both ways. Each Triton result is checked against
`F.linear` (bf16, relative 1e-2 of the largest entry). An experiment, not the engine's code.
"""
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton, triton.language as tl
import torch.nn.functional as F
from nanovllm_lit.bench import measure_card
from nanovllm_lit.layers.triton_kernels import _wait_for_previous_kernel

@triton.jit
def _mm(x_ptr, w_ptr, y_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
        PDL: tl.constexpr):
    pid = tl.program_id(0)
    nm, nn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    g = pid // (GROUP * nn)                                        # grouped order: neighbours share weight tiles
    first_m = g * GROUP
    gm = min(nm - first_m, GROUP)
    pm, pn = first_m + (pid % gm), (pid % (GROUP * nn)) // gm
    rm, rn, rk = pm * BM + tl.arange(0, BM), pn * BN + tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    if PDL:                                # chapter 10a: the first weight tile before the wait (weights are never written)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        _wait_for_previous_kernel(PDL)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    for k0 in range(BK * PDL, K, BK):
        x = tl.load(x_ptr + rm[:, None] * K + k0 + rk[None, :], mask=(rm[:, None] < M) & (k0 + rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k0 + rk[None, :], mask=(rn[:, None] < N) & (k0 + rk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

def mm(x, w, y, cfg, pdl=False):
    bm, bn, bk, warps, stages = cfg
    M, K = x.shape; N = w.shape[0]
    _mm[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](x, w, y, M, N, K, bm, bn, bk, 8, PDL=pdl, num_warps=warps,
                                                    num_stages=stages, **({"launch_pdl": True} if pdl else {}))

def graph_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    return triton.testing.do_bench(g.replay, warmup=5, rep=60) / reps

# Qwen3-0.6B's layers: (out_features, in_features)
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072), "lm_head": (151936, 1024)}

def main():
    card = measure_card()
    print(f"{card['name']} | torch {torch.__version__} | triton {triton.__version__} | {time.strftime('%Y-%m-%d')} | "
          f"copy {card['bandwidth'] / 1e12:.2f} TB/s, bf16 {card['flops'] / 1e12:.0f} TFLOP/s")
    CFGS = [(32, 32, 128, 4, 4), (64, 32, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 128, 8, 3),
            (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3)]
    bad = 0
    for M in (32, 64, 128, 256):
        step_cublas = step_triton = step_floor = 0.0
        chain = {}                                                     # name -> (x, w, y, best cfg)
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            t_cublas = graph_ms(lambda: F.linear(x, w))
            best = (float("inf"), None)
            for cfg in CFGS:
                if cfg[0] > 2 * M and cfg[0] > 32: continue                # tiles far taller than the batch
                try: t = graph_ms(lambda: mm(x, w, y, cfg))
                except Exception as e: print(f"  {name} M={M} {cfg}: {type(e).__name__}"); continue
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-2: bad += 1; print(f"  MISMATCH {name} M={M} {cfg}: {err:.2e}"); continue
                if t < best[0]: best = (t, cfg)
            flops, nbytes = 2 * M * N * K, 2 * (N * K + M * K + M * N)
            floor = max(flops / card["flops"], nbytes / card["bandwidth"]) * 1e3
            chain[name] = (x, w, y, best[1])
            reps = 1 if name == "lm_head" else 28
            step_cublas += reps * t_cublas; step_triton += reps * best[0]; step_floor += reps * floor
            print(f"M={M:3d} {name:8s} cuBLAS {t_cublas * 1e3:7.1f} us ({floor / t_cublas:.2f} of floor) | Triton best "
                  f"{best[0] * 1e3:7.1f} us ({floor / best[0]:.2f}) {best[1]}")
        order = [n for _ in range(28) for n in ("qkv", "o", "gate_up", "down")] + ["lm_head"]
        t_cb = graph_ms(lambda: [F.linear(chain[n][0], chain[n][1]) for n in order], reps=1)
        t_tr = graph_ms(lambda: [mm(*chain[n], pdl=False) for n in order], reps=1)
        t_pdl = graph_ms(lambda: [mm(*chain[n], pdl=True) for n in order], reps=1)
        print(f"M={M:3d} whole step's matmuls (sum of single-shape times): cuBLAS {step_cublas:.3f} ms, Triton {step_triton:.3f} ms; "
              f"as one graph of 113 kernels: cuBLAS {t_cb:.3f} ms, Triton {t_tr:.3f} ms, Triton + PDL {t_pdl:.3f} ms; "
              f"floor {step_floor:.3f} ms")
    print("FAILED" if bad else "all Triton results match F.linear")
    return bad

if __name__ == "__main__":
    sys.exit(1 if main() else 0)
