"""Decode-attention configurations on this GPU (no nbdev, no pytest): `python tests/gpu_attention_sweep.py`.

For each batch shape of a decode step that workload W passes through (256 sequences of mixed lengths down to a few
long ones), times chapter 10a's `decode_attention` replayed from a CUDA graph under every (block_n, num_warps,
num_stages) of a small grid, and prints the default configuration's bandwidth, the best one's, and both as a
ratio to this card's copy bandwidth, measured in the same run. Afterwards every fifth configuration's output is
checked against the default's (bf16, 2e-2). Takes about `--budget-s` seconds (150), shared by the shapes;
`--write F` saves each shape's winner to F (JSON) for a run of the engine with it.
`--splits` instead times the default tiles at split counts 1-16 for the mid-size batches of W (64-128 sequences,
where `decode_num_splits` picks 1 split: 512-1024 programs on ~130 SMs), and prints the best count next to the default.
"""
import itertools, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton
from nanovllm_lit.bench import measure_card
from nanovllm_lit.layers import triton_kernels as tk

if not torch.cuda.is_available(): sys.exit("gpu_attention_sweep: no CUDA device")
budget = float(sys.argv[sys.argv.index("--budget-s") + 1]) if "--budget-s" in sys.argv else 150.0
t0 = time.time()
card = measure_card()
copy = card["bandwidth"]
print(f"{card['name']} | torch {torch.__version__} | triton {triton.__version__} | {time.strftime('%Y-%m-%d')} | "
      f"copy {copy / 1e12:.2f} TB/s")
g = torch.Generator().manual_seed(0)
shapes = [("256 x U[100,2048]", torch.randint(100, 2049, (256,), generator=g).tolist()),
          ("256 x 530", [530] * 256), ("128 x 1200", [1200] * 128), ("32 x 1500", [1500] * 32),
          ("8 x 1800", [1800] * 8), ("2 x 2000", [2000] * 2)]
if "--splits" in sys.argv:
    for n, ctx in ((32, 1500), (48, 1400), (64, 1300), (96, 1200), (128, 1100), (192, 900)):
        r = {S: tk.benchmark_decode(n, ctx, num_splits=S) for S in (1, 2, 3, 4, 6, 8, 16)}
        d = tk.benchmark_decode(n, ctx)
        bw = lambda x: x["gbytes"] * 1e9 / (x["ms"] * 1e-3) / copy
        best = min(r, key=lambda S: r[S]["ms"])
        print(f"{n:3d} x {ctx}: default {d['num_splits']} splits {d['ms'] * 1e3:6.1f} us ({bw(d):.2f} of copy) | best "
              f"{best} splits {r[best]['ms'] * 1e3:6.1f} us ({bw(r[best]):.2f}) | " +
              " ".join(f"{S}:{bw(x):.2f}" for S, x in r.items()))
    sys.exit(0)
grid = [dict(block_n=bn, num_warps=w, num_stages=s)
        for bn, w, s in itertools.product((64, 32, 128), (4, 2, 8), (2, 3, 4))]
failures, winners = 0, {}
for name, lens in shapes:
    default = tk.benchmark_decode(len(lens), lens)
    best, tried, deadline = (default["ms"], "default"), 0, time.time() + budget / len(shapes)
    for cfg in grid:
        if time.time() > deadline: break
        try: r = tk.benchmark_decode(len(lens), lens, **cfg)
        except Exception as e:                                     # e.g. out of shared memory
            print(f"  {name} {cfg}: {type(e).__name__}"); continue
        tried += 1
        if r["ms"] < best[0]: best = (r["ms"], cfg)
    winners[name] = best[1] if isinstance(best[1], dict) else {}
    f = lambda ms: default["gbytes"] * 1e9 / (ms * 1e-3)
    print(f"{name:18s} KV {default['gbytes']:.3f} GB, splits {default['num_splits']:2d}: default {default['ms'] * 1e3:6.1f} us "
          f"{f(default['ms']) / 1e12:.2f} TB/s ({f(default['ms']) / copy:.2f} of copy) | best of {tried} "
          f"{best[0] * 1e3:6.1f} us {f(best[0]) / 1e12:.2f} TB/s ({f(best[0]) / copy:.2f}) {best[1]}")
# correctness of the winners is checked by the engine check; here: every config equals the default on one shape
lens = shapes[0][1]
torch.manual_seed(0)
B, H, KVH, D, BS = len(lens), 16, 8, 128, 256
pages = [triton.cdiv(n, BS) for n in lens]
kc = torch.randn(sum(pages) + 1, BS, KVH, D, dtype=torch.bfloat16, device="cuda"); vc = torch.randn_like(kc)
bt = torch.full((B, 16), -1, dtype=torch.int32, device="cuda")
perm, used = torch.randperm(kc.shape[0], device="cuda").int(), 0
for i, n in enumerate(pages): bt[i, :n] = perm[used:used + n]; used += n
cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
ref = tk.decode_attention(q, kc, vc, bt, cl, D ** -0.5).float()
for cfg in grid[::5]:
    try: o = tk.decode_attention(q, kc, vc, bt, cl, D ** -0.5, **cfg).float()
    except Exception: continue
    if not torch.allclose(o, ref, atol=2e-2, rtol=2e-2): failures += 1; print("MISMATCH", cfg, (o - ref).abs().max().item())
if "--write" in sys.argv:                                      # the winners, for a second run to try in the engine
    import json; Path(sys.argv[sys.argv.index("--write") + 1]).write_text(json.dumps(winners))
print(f"{'FAILED' if failures else 'configs agree'} ({time.time() - t0:.0f} s)")
sys.exit(1 if failures else 0)
