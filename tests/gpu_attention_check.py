"""Standalone GPU check of the attention backends (no nbdev, no pytest): `python tests/gpu_attention_check.py`.

Runs on a CUDA machine with torch + triton (e.g. an H100 with torch 2.11, triton 3.6), importing the package from
this repository. Checks, in bf16 at Qwen3-0.6B's head layout (16 query heads, 8 KV heads, head_dim 128):
  1. Triton store / varlen prefill (own K/V and cached prefix from pages) / decode (auto, 1 and 4 splits)
     against the torch reference backend, block sizes 256 and 16;
  2. CUDA-graph capture of the triton store + decode path through `Attention`, replayed with new lengths;
  3. decode kernel bandwidth at 256 seqs x 1000 tokens (and a few other shapes), prefill throughput.
Prints a compact summary; exit status 1 if any correctness check failed. Takes well under 2 minutes.
"""
import math, os, sys, time, traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
T0 = time.time()

import torch  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("gpu_attention_check: no CUDA device")

import triton  # noqa: E402
from nanovllm_lit.layers.attention import (Attention, scatter_to_pages, set_attention_backend,  # noqa: E402
                                           token_slots, torch_decode, torch_prefill)
from nanovllm_lit.layers import triton_kernels as tk  # noqa: E402
from nanovllm_lit.utils.context import reset_context, set_context  # noqa: E402

DEV, DT = "cuda", torch.bfloat16
H, KVH, D = 16, 8, 128
SCALE = D ** -0.5
TOL = dict(atol=3e-2, rtol=3e-2)
results, failures = [], []


def cu(lens):
    return torch.tensor([0] + list(lens), device=DEV).cumsum(0).int()


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


def section(name):
    def wrap(fn):
        t = time.time()
        try:
            fn()
        except Exception as e:  # keep going: report everything
            failures.append(name)
            results.append(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            traceback.print_exc()
        finally:
            print(f"[{time.time() - t:5.1f}s] {name}", flush=True)
        return fn
    return wrap


def paged_case(k_lens, block_size, seed=0, width=None):
    g = torch.Generator().manual_seed(seed)
    K = [torch.randn(n, KVH, D, generator=g).to(DEV, DT) for n in k_lens]
    V = [torch.randn(n, KVH, D, generator=g).to(DEV, DT) for n in k_lens]
    kc, vc, bt = scatter_to_pages(K, V, block_size, width=width or math.ceil(4096 / block_size), generator=g)
    return K, V, kc, vc, bt


print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
      f"interpreter {tk.INTERPRET}", flush=True)


@section("bf16 correctness: triton vs torch backend")
def _correctness():
    for bs in (256, 16):
        k_lens, q_lens = [1, 300, 1000, 257, 4000], [1, 300, 17, 200, 1]
        K, V, kc, vc, bt = paged_case(k_lens, bs)
        # store
        kc2, vc2 = kc.clone(), vc.clone()
        kn, vn = torch.randn(3, KVH, D, device=DEV, dtype=DT), torch.randn(3, KVH, D, device=DEV, dtype=DT)
        slots = torch.tensor([5, -1, bs * 2 + 7], dtype=torch.int32, device=DEV)
        tk.store_kvcache_triton(kn, vn, kc2, vc2, slots)
        flat = kc2.view(-1, KVH, D)
        ok = torch.equal(flat[5], kn[0]) and torch.equal(flat[bs * 2 + 7], kn[2])
        nchanged = int(((kc2 != kc) & ~(kc2.isnan() & kc.isnan())).any(-1).any(-1).sum())
        assert ok and nchanged <= 2, "store kernel wrote the wrong slots"
        # prefill with cached prefix, from pages
        q = torch.randn(sum(q_lens), H, D, device=DEV, dtype=DT)
        ref = torch_prefill(q, None, None, kc, vc, cu(q_lens), cu(k_lens), SCALE, block_tables=bt)
        out = tk.prefill_attention(q, kc, vc, cu(q_lens), cu(k_lens), max(q_lens), SCALE, block_tables=bt)
        torch.testing.assert_close(out, ref, **TOL)
        e_pp = err(out, ref)
        # prefill without prefix, from the batch's own K/V
        seqs = [300, 1000, 5]
        qf = torch.randn(sum(seqs), H, D, device=DEV, dtype=DT)
        kf = torch.randn(sum(seqs), KVH, D, device=DEV, dtype=DT)
        vf = torch.randn(sum(seqs), 3, KVH, D, device=DEV, dtype=DT)[:, 1]   # strided view, as from a fused QKV
        ref = torch_prefill(qf, kf, vf, None, None, cu(seqs), cu(seqs), SCALE)
        out = tk.prefill_attention(qf, kf, vf, cu(seqs), cu(seqs), max(seqs), SCALE)
        torch.testing.assert_close(out, ref, **TOL)
        e_p = err(out, ref)
        # decode
        qd = torch.randn(len(k_lens), H, D, device=DEV, dtype=DT)
        cl = torch.tensor(k_lens, dtype=torch.int32, device=DEV)
        ref = torch_decode(qd, kc, vc, bt, cl, SCALE)
        e_d = []
        for splits in (None, 1, 4):
            out = tk.decode_attention(qd, kc, vc, bt, cl, SCALE, num_splits=splits)
            assert not out.isnan().any(), "NaN in decode output"
            torch.testing.assert_close(out, ref, **TOL)
            e_d.append(err(out, ref))
        results.append(f"ok   bf16 block {bs:3d}: max|triton-torch| prefill(prefix) {e_pp:.1e}, prefill {e_p:.1e}, "
                       f"decode(auto/1/4 splits) {'/'.join(f'{e:.1e}' for e in e_d)}")


@section("CUDA graph: triton store + decode through Attention")
def _graph():
    BS = 256
    k_lens = [100, 1000, 3000, 1]
    _, _, kc, vc, bt = paged_case(k_lens, BS)
    kc.nan_to_num_(0.0); vc.nan_to_num_(0.0)
    tri, ref = Attention(H, D, SCALE, KVH), Attention(H, D, SCALE, KVH)
    tri.k_cache, tri.v_cache = kc, vc
    ref.k_cache, ref.v_cache = kc.clone(), vc.clone()
    set_attention_backend(tri, "triton")
    B = len(k_lens) + 1                                                 # + one padding row
    bt_pad = torch.cat([bt, torch.full((1, bt.shape[1]), -1, dtype=torch.int32, device=DEV)])
    q = torch.randn(B, H, D, device=DEV, dtype=DT)
    k, v = torch.randn(B, KVH, D, device=DEV, dtype=DT), torch.randn(B, KVH, D, device=DEV, dtype=DT)

    def step(lens):
        slots = [int(token_slots(bt[i].cpu(), n - 1, n, BS)) for i, n in enumerate(lens)] + [-1]
        return (torch.tensor(slots, dtype=torch.int32, device=DEV),
                torch.tensor(list(lens) + [0], dtype=torch.int32, device=DEV))

    slot_mapping, context_lens = step(k_lens)
    set_context(False, slot_mapping=slot_mapping, context_lens=context_lens, block_tables=bt_pad)
    tri(q, k, v); ref(q, k, v)                                          # warm-up (compile), same store on both
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri(q, k, v)
    worst = 0.0
    for lens in ([101, 1001, 3001, 2], [102, 1002, 3002, 3]):
        sm, cl = step(lens)
        for dst, src in ((slot_mapping, sm), (context_lens, cl), (q, torch.randn_like(q)),
                         (k, torch.randn_like(k)), (v, torch.randn_like(v))):
            dst.copy_(src)
        graph.replay()
        expected = ref(q, k, v)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, **TOL)
        assert out[-1].abs().max() == 0, "padding row not zero"
        assert torch.equal(tri.k_cache, ref.k_cache) and torch.equal(tri.v_cache, ref.v_cache), "caches differ"
        worst = max(worst, err(out, expected))
    reset_context()
    results.append(f"ok   CUDA graph replay (2 steps, padding row): max|graph-eager torch| {worst:.1e}, caches equal")


@section("decode bandwidth")
def _bench_decode():
    g = torch.Generator().manual_seed(0)
    shapes = [("256 x 1000", 256, 1000), ("256 x U[100,2048]", 256, torch.randint(100, 2049, (256,), generator=g).tolist()),
              ("64 x 2000", 64, 2000), ("8 x 8000", 8, 8000), ("1 x 16000", 1, 16000)]
    for name, b, lens in shapes:
        r = tk.benchmark_decode(b, lens)
        results.append(f"perf decode {name:18s}: {r['ms'] * 1e3:7.1f} us, {r['gbytes']:.3f} GB KV -> "
                       f"{r['gb_per_s']:6.0f} GB/s ({r['gb_per_s'] / 3000:4.0%} of ~3 TB/s), splits {r['num_splits']}")
    # per-step estimate for the engine: 28 layers of Qwen3-0.6B at 256 x 1000
    r = tk.benchmark_decode(256, 1000)
    results.append(f"perf decode 256x1000 x 28 layers ~ {28 * r['ms']:.1f} ms of attention per engine step")


@section("prefill throughput")
def _bench_prefill():
    seqs = [1024] * 16
    N = sum(seqs)
    q = torch.randn(N, H, D, device=DEV, dtype=DT)
    k, v = torch.randn(N, KVH, D, device=DEV, dtype=DT), torch.randn(N, KVH, D, device=DEV, dtype=DT)
    c = cu(seqs)
    flops = sum(2 * s * s * H * D for s in seqs)                       # causal: half of 4*s*s*H*D
    ms = triton.testing.do_bench(lambda: tk.prefill_attention(q, k, v, c, c, 1024, SCALE), warmup=10, rep=50)
    qq, kk, vv = (x.view(16, 1024, -1, D).transpose(1, 2) for x in (q, k, v))
    kk, vv = kk.repeat_interleave(H // KVH, 1), vv.repeat_interleave(H // KVH, 1)
    ms_sdpa = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True), warmup=10, rep=50)
    results.append(f"perf prefill 16 x 1024: triton {ms * 1e3:.0f} us ({flops / ms / 1e9:.0f} TFLOP/s), "
                   f"torch SDPA {ms_sdpa * 1e3:.0f} us ({flops / ms_sdpa / 1e9:.0f} TFLOP/s)")


print("\n==== summary ====")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
      f"{time.strftime('%Y-%m-%d')}")
for line in results:
    print(line)
print(f"{'FAILED: ' + ', '.join(failures) if failures else 'all correctness checks passed'} "
      f"({time.time() - T0:.0f} s)")
sys.exit(1 if failures else 0)
