"""Issue 10, batch 1 (GPU only, no nbdev): does PDL pay more when each kernel lets the next one in *before* its wait
(NANOVLLM_LIT_PDL=early, chapter 10a), and when a one-row GEMV loads *all* its weights before the wait (block_k = its
whole slice of K, chapter 09a's default since 2026-12-07; "old": the tiles before)? And the norm read on the way in
at 2-16 rows ("+norm16"), which chapter 09 now keeps to one row?

    python tests/gpu_pdl_bench.py                 # the matmul chain, then the engine at batch 1, each way
    python tests/gpu_pdl_bench.py --engine-run old -- --shape 1x128x256   # (internal) one engine run

1. A decode step's 113 matmuls at 1 (and 16) rows as the engine runs them (qkv_proj and gate_up_proj with the norm
   and residual read on the way in, down_proj with the SiLU read on the way in, then the LM head), one CUDA graph,
   distinct weights per layer: ms per replay for PDL 1 / 0 x today's / the old tiles, fused or plain, each
   output checked against the first way (equal bits where only the PDL mode differs; GEMV_TOLERANCE otherwise).
2. `python -m nanovllm_lit.bench --shape 1x128x256` in a fresh process for each way, twice, alternating.
Prints the card (copy bandwidth measured now) and every figure; exit status 1 if a check failed.
"""
import argparse, json, math, os, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
T0 = time.time()
import torch  # noqa: E402

# one row, the tiles before 2026-12-07 (fourth session): BK = 512 (a quarter to a half of each slice before the wait),
# down_proj split in 4; today's default (chapter 09a's `_one_row`) loads each program's whole slice before the wait
OLD = {(4096, 1024, 1): dict(block_k=512, split_k=1), (6144, 1024, 1): dict(block_k=512, split_k=1),
       (1024, 2048, 1): dict(block_k=512, split_k=1), (1024, 3072, 1): dict(block_k=512, split_k=4),
       (151_936, 1024, 1): dict(block_k=512, split_k=1)}
CONFIGS = {"today": {}, "old": OLD}


def log(msg):
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def use(configs: str):
    "Today's GEMV_CONFIG, updated by the named variant; '+norm16': the fused norm up to 16 rows (09's GEMV_NORM_MAX_M)."
    from nanovllm_lit.layers import gemv_triton as gt, linear
    if configs.endswith("+norm16"): linear.GEMV_NORM_MAX_M, configs = 16, configs[:-len("+norm16")]
    for key, over in CONFIGS[configs].items():
        base = {**gt.gemv_config(key[2], key[0], key[1], torch.bfloat16, "cuda"), **gt.GEMV_CONFIG.get(key, {})}
        gt.GEMV_CONFIG[key] = {**base, **over}


def engine_run(configs: str, bench_args: list[str]):
    use(configs)
    from nanovllm_lit import bench
    bench.main(bench_args)


def chain(M: int, pdl: str, configs: str, failures: list, ref: dict, fused: bool = True):
    "ms per replay of one decode step's matmuls at M rows, the engine's way; checks the outputs against `ref`."
    from nanovllm_lit.layers import gemv_triton as gt
    os.environ["NANOVLLM_LIT_PDL"] = pdl
    saved = dict(gt.GEMV_CONFIG); use(configs)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        r = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
        H, I = 1024, 3072
        layers = [dict(qkv=r(4096, H), o=r(H, 2048), gu=r(2 * I, H), down=r(H, I), n1=1 + r(H), n2=1 + r(H))
                  for _ in range(28)]
        head = r(151_936, H)
        x, res, attn, gu_in = r(M, H), r(M, H), r(M, 2048), r(M, 2 * I)
        outs = []
        def step():
            outs.clear()
            for L in layers:   # the inputs are fixed (not the chain's): every kernel reads what the stream order allows
                if fused and M == 1:   # as the engine runs them: norm + residual (one row), SiLU read on the way in
                    outs.append(gt.gemv(x, L["qkv"], norm=(L["n1"], 1e-6), residual=res)[0])
                    outs.append(gt.gemv(attn, L["o"]))
                    outs.append(gt.gemv(x, L["gu"], norm=(L["n2"], 1e-6), residual=res)[0])
                    outs.append(gt.gemv(gu_in, L["down"], act="silu_mul"))
                elif fused:
                    outs.extend([gt.gemv(x, L["qkv"]), gt.gemv(attn, L["o"]), gt.gemv(x, L["gu"]),
                                 gt.gemv(gu_in, L["down"], act="silu_mul")])
                else:          # plain products (the norm and SiLU would be kernels of their own)
                    outs.extend([gt.gemv(x, L["qkv"]), gt.gemv(attn, L["o"]), gt.gemv(x, L["gu"]),
                                 gt.gemv(gu_in[:, :I], L["down"])])
            outs.append(gt.gemv(x, head))
        step(); torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph): step()
        graph.replay(); torch.cuda.synchronize()
        got = [o.clone() for o in outs]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50): graph.replay()
        end.record(); end.synchronize()
        ms = start.elapsed_time(end) / 50
        key = (M, configs, fused)
        if key in ref:                           # the same configs, another PDL mode: the same bits
            ok = all(torch.equal(a, b) for a, b in zip(got, ref[key]))
        else:
            ref[key] = got
            base = ref.get((M, "today", fused))
            ok = base is None or all(((a.float() - b.float()).abs().max() <= 2 * 2 ** -7 * b.float().abs().max())
                                     .item() for a, b in zip(got, base))
        if not ok: failures.append(f"chain M={M} PDL={pdl} {configs}: outputs differ")
        del graph
        return ms, ok
    finally:
        gt.GEMV_CONFIG.clear(); gt.GEMV_CONFIG.update(saved)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-run")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--rows", default="1,16", help="row counts for the matmul chain")
    ap.add_argument("--shapes", default="1x128x256", help="engine workloads (bench --shape)")
    ap.add_argument("--ways", default="1:old,1:today,early:today", help="PDL:configs for the engine")
    ap.add_argument("--env", default="", help="extra engine ways: NAME=VALUE applied to the first way, comma-separated")
    ap.add_argument("rest", nargs="*")
    a = ap.parse_args()
    if a.engine_run: return engine_run(a.engine_run, a.rest)
    from nanovllm_lit.bench import measure_card
    card = measure_card()
    log(f"{card['name']}: copy {card['bandwidth'] / 1e12:.2f} TB/s, bf16 {card['flops'] / 1e12:.0f} TFLOP/s, "
        f"torch {torch.__version__}")
    weights = 2 * (28 * 1024 * (4096 + 2048 + 6144 + 3072) + 151_936 * 1024)
    print(f"\nweights {weights / 1e9:.3f} GB, floor {weights / card['bandwidth'] * 1e3:.3f} ms\n")
    print("| rows | fused norm, SiLU | PDL | configs | ms per step's matmuls | x floor | check |\n"
          "|---|---|---|---|---|---|---|")
    failures, ref = [], {}
    for M in map(int, a.rows.split(",")):
        for fused in (True, False):
            for configs in (("today", "old") if M == 1 else ("today",)):
                for pdl in ("1", "0"):
                    try: ms, ok = chain(M, pdl, configs, failures, ref, fused)
                    except Exception as e:
                        print(f"| {M} | {fused} | {pdl} | {configs} | {type(e).__name__}: {str(e)[:100]} | | |"); continue
                    print(f"| {M} | {fused} | {pdl} | {configs} | {ms:.3f} | "
                          f"{ms / (weights / card['bandwidth'] * 1e3):.2f} | {'ok' if ok else 'FAIL'} |", flush=True)
    os.environ.pop("NANOVLLM_LIT_PDL", None)
    torch.cuda.empty_cache()
    log("engine at batch 1")
    ways = [tuple(w.split(":")) + ({},) for w in a.ways.split(",")]
    ways += [(ways[0][0], ways[0][1], dict([kv.split("=")])) for kv in a.env.split(",") if kv]
    for run in range(a.runs):
        for pdl, configs, extra in ways:
            if time.time() - T0 > a.budget_s: log("budget spent"); break
            env = {**os.environ, "NANOVLLM_LIT_PDL": pdl, **extra}
            args = ["--shape", a.shapes] + (["--profile"] if run == 0 else [])
            p = subprocess.run([sys.executable, __file__, "--engine-run", configs, "--", *args], env=env,
                               capture_output=True, text=True, timeout=150)
            keep = [ln for ln in p.stdout.splitlines() if any(w in ln for w in (
                "tok/s", "Throughput", "ratio", "per decode step", "kernels", "matmul", "attention", "wall"))]
            print(f"\n## PDL={pdl}, configs={configs} {extra or ''}, run {run + 1}: rc {p.returncode}\n" + "\n".join(keep[:30]))
            if p.returncode: print(p.stderr[-1500:]); failures.append(f"engine PDL={pdl} {configs}: rc {p.returncode}")
    log(f"done: {len(failures)} failures")
    if failures: print("\n".join(failures)); sys.exit(1)


if __name__ == "__main__":
    main()
