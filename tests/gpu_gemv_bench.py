"""GPU check and benchmark of chapter 09a's Triton GEMV (no nbdev, no pytest): `python tests/gpu_gemv_bench.py`.

On a CUDA machine with torch + triton (e.g. the H200 with torch 2.11, triton 3.6), importing the package from this
repository. In bf16, for Qwen3-0.6B's five weight shapes and M in {1, 2, 4, 8, 16}:
  1. correctness of `gemv` (default configs, with and without bias, and inside a replayed CUDA graph) against the
     fp32 product of the same inputs, within GEMV_TOLERANCE relative to the largest output; at most 5
     compilations for M = 1..16;
  2. a config sweep (tiles, warps, split-K), every candidate checked for correctness too, printing the best config
     per (shape, M bucket) as GEMV_CONFIG entries to paste into nbs/09a_gemv.ipynb;
  3. times inside CUDA graphs (many copies of each weight per graph, so they come from HBM, not L2): F.linear,
     gemv with the default configs and with the sweep's best, in us, GB/s and as a ratio to the copy bandwidth
     measured in the same run; then a whole decode step's matmuls (28 layers x 4 + the LM head).
Prints markdown tables; exit status 1 if any correctness check failed. Aims at well under 3 minutes
(`--sweep-budget-s` caps the sweep; `--no-sweep` skips it).
"""
import argparse, math, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
T0 = time.time()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("gpu_gemv_bench: no CUDA device")

from nanovllm_lit.bench import measure_card  # noqa: E402
from nanovllm_lit.layers import gemv_triton as gt  # noqa: E402
from nanovllm_lit.layers.gemv_triton import GEMV_TOLERANCE, gemv, gemv_config, gemv_error, m_bucket  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024),
          "down_proj": (1024, 3072), "lm_head": (151_936, 1024)}
LAYER = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
MS = (1, 2, 4, 8, 16)
failures = []


def log(msg):
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def check(name, ok, detail=""):
    if not ok:
        failures.append(f"{name}: {detail}")
        print(f"FAIL {name}: {detail}", flush=True)


def weights(N, K, target_bytes=256 << 20, cap=64):
    "Enough distinct copies of an (N, K) bf16 weight that one graph replay streams them from HBM, not L2."
    n = max(2, min(cap, math.ceil(target_bytes / (2 * N * K))))
    return [torch.randn(N, K, device=DEV, dtype=DT) for _ in range(n)]


def graph_us(calls, reps=20):
    "Time of one replay of a CUDA graph of `calls` (closures), in us; each closure is run once first (JIT)."
    for f in calls: f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls: f()
    g.replay(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps): g.replay()
    end.record(); end.synchronize()
    del g
    return start.elapsed_time(end) * 1e3 / reps


def nbytes(M, N, K):
    return 2 * (N * K + M * K + M * N)


def variants():
    try: return len(gt._gemv_kernel.device_caches[torch.cuda.current_device()][0])
    except Exception: return -1                                     # another Triton layout: not counted


def correctness():
    g = torch.Generator(device=DEV).manual_seed(0)
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=DEV, generator=g).to(DT)
        b = torch.randn(N, device=DEV, generator=g).to(DT)
        before = variants()
        for M in range(1, 17):
            x = torch.randn(M, K, device=DEV, generator=g).to(DT)
            for bias in (None, b):
                e = gemv_error(gemv(x, w, bias), x, w, bias)
                check(f"{name} M={M} bias={bias is not None}", e <= GEMV_TOLERANCE[DT], f"error {e:.2e}")
        n = variants() - before
        check(f"{name}: compilations for M = 1..16", n <= 5 * 2, f"{n}")   # x2: with and without bias
        # a CUDA graph: capture at M = 4, replay with new inputs
        x = torch.randn(4, K, device=DEV, generator=g).to(DT)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph): y = gemv(x, w, b)
        x.copy_(torch.randn(4, K, device=DEV, generator=g).to(DT)); graph.replay(); torch.cuda.synchronize()
        e = gemv_error(y, x, w, b)
        check(f"{name}: graph replay", e <= GEMV_TOLERANCE[DT] and torch.equal(y, gemv(x, w, b)), f"error {e:.2e}")
        del graph
        # split-K folded into the last program (09a) == the two-kernel version, bit for bit, 50 calls in a row
        for M in (1, 4, 16):
            x = torch.randn(M, K, device=DEV, generator=g).to(DT)
            for split in (2, 4, 8):
                two = gemv(x, w, b, config=dict(split_k=split, fold=False))
                same = all(torch.equal(gemv(x, w, b, config=dict(split_k=split)), two) for _ in range(50))
                check(f"{name} M={M} split {split}: folded == two kernels", same)
        check("split-K counters all back at zero", gt.split_locks(DEV).count_nonzero().item() == 0)
    log(f"correctness: {len(failures)} failures")


def candidates(M):
    "Configs to try for M rows (the split-K factor is an argument, not a compilation: cheap to vary)."
    bm = m_bucket(M)
    out = []
    for split in (1, 2, 4, 8):
        if bm >= 2:                              # tensor cores, rows padded to 16
            for bn, bk, warps in ((32, 128, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8), (32, 256, 4)):
                out.append(dict(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=3, dot=True))
        fma = {1: ((8, 256, 4), (16, 256, 4), (32, 256, 8), (16, 512, 8), (4, 512, 4)),
               2: ((8, 256, 4), (16, 256, 8), (8, 512, 8), (4, 256, 4)),
               4: ((4, 256, 4), (8, 256, 8), (16, 256, 8), (4, 512, 8)),
               8: ((4, 256, 8), (8, 256, 8)), 16: ()}[bm]
        for bn, bk, warps in fma:
            out.append(dict(block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=3, dot=False))
    return out


def sweep(budget_s):
    "Best config per (shape, M) by in-graph time; -> {(N, K, BM): (config, us)}."
    best, t_start = {}, time.time()
    for M in MS:
        for name, (N, K) in SHAPES.items():
            if time.time() - t_start > budget_s:
                log(f"sweep budget spent: {name} M={M} and later keep the heuristic"); return best
            ws = weights(N, K, target_bytes=128 << 20, cap=16)
            x = torch.randn(M, K, device=DEV, dtype=DT)
            for cfg in candidates(M):
                if cfg["split_k"] > 1 and -(-K // cfg["block_k"]) < cfg["split_k"]: continue
                try:
                    e = gemv_error(gemv(x, ws[0], config=cfg), x, ws[0])
                    check(f"sweep {name} M={M} {cfg}", e <= GEMV_TOLERANCE[DT], f"error {e:.2e}")
                    us = graph_us([lambda w=w: gemv(x, w, config=cfg) for w in ws], reps=5) / len(ws)
                except Exception as exc:   # e.g. out of shared memory / registers: not a candidate here
                    print(f"  skip {name} M={M} {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
                    continue
                key = (N, K, m_bucket(M))
                if key not in best or us < best[key][1]: best[key] = (cfg, us)
            del ws
        log(f"sweep M={M} done")
    return best


def table(card_bw, tuned):
    print("\n| matmul | M | F.linear us | GB/s | x BW | gemv (heuristic) us | GB/s | x BW | gemv (tuned) us | GB/s | x BW | F.linear / tuned |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    per = {}
    for name, (N, K) in SHAPES.items():
        ws = weights(N, K)
        for M in MS:
            x = torch.randn(M, K, device=DEV, dtype=DT)
            cfg = tuned.get((N, K, m_bucket(M)), (None,))[0]
            t_ref = graph_us([lambda w=w: F.linear(x, w) for w in ws]) / len(ws)
            t_heur = graph_us([lambda w=w: gemv(x, w) for w in ws]) / len(ws)
            t_tuned = graph_us([lambda w=w: gemv(x, w, config=cfg) for w in ws]) / len(ws) if cfg else t_heur
            per[name, M] = (t_ref, t_heur, t_tuned)
            cells = []
            for t in (t_ref, t_heur, t_tuned):
                gbs = nbytes(M, N, K) / t / 1e3
                cells += [f"{t:.2f}", f"{gbs:.0f}", f"{gbs * 1e9 / card_bw:.2f}"]
            print(f"| {name} | {M} | " + " | ".join(cells) + f" | {t_ref / t_tuned:.2f} |")
        del ws
    return per


def whole_step(card_bw, tuned):
    "28 layers' 4 matmuls (distinct weights) + the LM head, one CUDA graph per M: F.linear vs gemv."
    layers = [{n: torch.randn(*SHAPES[n], device=DEV, dtype=DT) for n in LAYER} for _ in range(28)]
    head = torch.randn(*SHAPES["lm_head"], device=DEV, dtype=DT)
    total = sum(2 * math.prod(SHAPES[n]) for n in LAYER) * 28 + 2 * math.prod(SHAPES["lm_head"])
    print(f"\n| whole step (28 x 4 matmuls + lm_head), weights {total / 1e9:.3f} GB, floor {total / card_bw * 1e3:.3f} ms "
          f"| M | F.linear ms | gemv, split-K in 2 kernels ms | gemv heuristic ms | gemv tuned ms | tuned x floor | F.linear / tuned |")
    print("|---|---|---|---|---|---|---|---|")
    for M in MS:
        xs = {n: torch.randn(M, SHAPES[n][1], device=DEV, dtype=DT) for n in SHAPES}
        cfg = lambda n: tuned.get((*SHAPES[n], m_bucket(M)), (None,))[0]
        def calls(fn):
            out = [lambda l=l, n=n: fn(xs[n], l[n], n) for l in layers for n in LAYER]
            return out + [lambda: fn(xs["lm_head"], head, "lm_head")]
        t_ref = graph_us(calls(lambda x, w, n: F.linear(x, w))) / 1e3
        t_two = graph_us(calls(lambda x, w, n: gemv(x, w, config=dict(fold=False)))) / 1e3
        t_heur = graph_us(calls(lambda x, w, n: gemv(x, w))) / 1e3
        t_tuned = graph_us(calls(lambda x, w, n: gemv(x, w, config=cfg(n)))) / 1e3
        floor = total / card_bw * 1e3
        print(f"| | {M} | {t_ref:.3f} | {t_two:.3f} | {t_heur:.3f} | {t_tuned:.3f} | {t_tuned / floor:.2f} | {t_ref / t_tuned:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-budget-s", type=float, default=75)
    args = ap.parse_args()
    torch.manual_seed(0)
    card = measure_card()
    log(f"{card['name']}: copy bandwidth {card['bandwidth'] / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul {card['flops'] / 1e12:.0f} TFLOP/s; torch {torch.__version__}")
    correctness()
    tuned = {} if args.no_sweep else sweep(args.sweep_budget_s)
    if tuned:
        print("\n# best configs by in-graph time (paste into nbs/09a_gemv.ipynb, or GEMV_CONFIG.update(...))")
        print(f"# {card['name']}, copy bandwidth {card['bandwidth'] / 1e12:.2f} TB/s")
        print("GEMV_CONFIG.update({")
        for key, (cfg, us) in sorted(tuned.items()):
            N, K, bm = key
            heur = gemv_config(bm, N, K, DT, DEV)
            print(f"    {key}: dict({', '.join(f'{k}={v!r}' for k, v in cfg.items())}),   "
                  f"# {us:.2f} us, {nbytes(bm, N, K) / us / 1e3:.0f} GB/s; heuristic was {heur}")
        print("})")
    log("timing")
    table(card["bandwidth"], tuned)
    whole_step(card["bandwidth"], tuned)
    log(f"done: {len(failures)} failures")
    if failures:
        print("\n".join(failures[:20]))
        sys.exit(1)


if __name__ == "__main__":
    main()
