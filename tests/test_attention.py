"""Attention over the paged KV cache (chapters 10_attention and 10a_triton_kernels).

- torch backend vs a dense reference (plain causal attention on the unpaged K/V, float64 SDPA): varlen prefill,
  prefill with a cached prefix, decode; GQA ratios 1/2/4, head_dim 64/128, block sizes 16/32; slot -1 skipped.
- Triton kernels vs the torch backend on small shapes: under TRITON_INTERPRET=1 on a CPU-only machine (the
  kernel module turns the interpreter on itself when no CUDA device is present), compiled on a GPU.
- GPU only (marked `gpu`, skipped without CUDA): bf16 Triton vs torch at Qwen3-0.6B's head layout, and a
  CUDA-graph capture/replay of the Triton store + decode path through `Attention`.
Free cache slots are filled with NaN, so any read past a sequence's length shows up as NaN in the output.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nanovllm_lit.layers.attention import (Attention, available_backends, set_attention_backend, store_kvcache,
                                           torch_decode, torch_prefill)
from nanovllm_lit.utils.context import reset_context, set_context

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = "triton" in available_backends()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
HEADS = [(4, 4), (4, 2), (8, 2)]                   # (num_heads, num_kv_heads): GQA ratios 1, 2, 4


@pytest.fixture(autouse=True)
def _clean_context():
    torch.set_num_threads(1)
    yield
    reset_context()


# ---------------------------------------------------------------- helpers (independent of the package)
def dense_attention(q, k, v, scale):
    "Causal attention of q (the last Lq positions) over k/v (all Lk positions), float64, K/V heads repeated."
    Lq, H, _ = q.shape
    Lk, KVH, _ = k.shape
    k = k.double().repeat_interleave(H // KVH, 1).transpose(0, 1)
    v = v.double().repeat_interleave(H // KVH, 1).transpose(0, 1)
    mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
    o = F.scaled_dot_product_attention(q.double().transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def build_pages(K, V, block_size, extra_blocks=2, seed=0, width=None):
    "Write each sequence's K/V into shuffled pages by hand; free slots NaN. -> k_cache, v_cache, block_tables."
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(len(k) / block_size) for k in K]
    num_blocks = sum(need) + extra_blocks
    KVH, D = K[0].shape[1:]
    kc = torch.full((num_blocks, block_size, KVH, D), float("nan"), dtype=K[0].dtype)
    vc = kc.clone()
    perm = torch.randperm(num_blocks, generator=g).tolist()
    bt = torch.full((len(K), width or max(need) + 1), -1, dtype=torch.int32)
    for i, (k, v) in enumerate(zip(K, V)):
        pages = [perm.pop() for _ in range(need[i])]
        bt[i, :len(pages)] = torch.tensor(pages)
        for t in range(len(k)):
            kc[pages[t // block_size], t % block_size] = k[t]
            vc[pages[t // block_size], t % block_size] = v[t]
    dev = K[0].device
    return kc.to(dev), vc.to(dev), bt.to(dev)


def rand_seqs(lens, heads, D, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, D, generator=g).to(device, dtype) for n in lens]


def cu(lens, device="cpu"):
    return torch.tensor([0] + list(lens), device=device).cumsum(0).int()


def slots_of(bt_row, start, end, block_size):
    t = torch.arange(start, end)
    return bt_row.cpu().long()[t // block_size] * block_size + t % block_size


# ---------------------------------------------------------------- store
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kvcache_skips_minus_one(block_size):
    kc, vc = torch.zeros(3, block_size, 2, 8), torch.zeros(3, block_size, 2, 8)
    key, value = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    slots = torch.tensor([block_size + 3, -1, 0, 3 * block_size - 1], dtype=torch.int32)
    store_kvcache(key, value, kc, vc, slots)
    assert torch.equal(kc[1, 3], key[0]) and torch.equal(kc[0, 0], key[2]) and torch.equal(kc[2, -1], key[3])
    assert torch.equal(vc[1, 3], value[0]) and torch.equal(vc[2, -1], value[3])
    assert int((kc.abs().sum((-1, -2)) > 0).sum()) == 3           # the -1 row wrote nowhere


# ---------------------------------------------------------------- torch backend vs dense reference
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,KVH", HEADS)
def test_torch_prefill_varlen(H, KVH, D, block_size):
    lens = [7, 33, 1, 20]
    Q, K, V = rand_seqs(lens, H, D, 1), rand_seqs(lens, KVH, D, 2), rand_seqs(lens, KVH, D, 3)
    out = torch_prefill(torch.cat(Q), torch.cat(K), torch.cat(V), torch.empty(0), torch.empty(0), cu(lens), cu(lens),
                        D ** -0.5)
    ref = torch.cat([dense_attention(q, k, v, D ** -0.5) for q, k, v in zip(Q, K, V)])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,KVH", HEADS)
def test_torch_prefill_cached_prefix(H, KVH, D, block_size):
    k_lens = [40, 2 * block_size + 5, 17, 9]
    q_lens = [40, 5, 1, 4]                                          # seq 1: prefix ends on a page boundary
    Q, K, V = rand_seqs(k_lens, H, D, 1), rand_seqs(k_lens, KVH, D, 2), rand_seqs(k_lens, KVH, D, 3)
    kc, vc, bt = build_pages(K, V, block_size)
    q = torch.cat([Qi[-n:] for Qi, n in zip(Q, q_lens)])
    out = torch_prefill(q, None, None, kc, vc, cu(q_lens), cu(k_lens), D ** -0.5, block_tables=bt)
    ref = torch.cat([dense_attention(Qi[-n:], k, v, D ** -0.5) for Qi, k, v, n in zip(Q, K, V, q_lens)])
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,KVH", HEADS)
def test_torch_decode(H, KVH, D, block_size):
    k_lens = [1, 50, block_size, block_size + 1, 3]
    K, V = rand_seqs(k_lens, KVH, D, 2), rand_seqs(k_lens, KVH, D, 3)
    kc, vc, bt = build_pages(K, V, block_size)
    q = torch.randn(len(k_lens), H, D)
    out = torch_decode(q, kc, vc, bt, torch.tensor(k_lens, dtype=torch.int32), D ** -0.5)
    ref = torch.cat([dense_attention(q[i:i + 1], K[i], V[i], D ** -0.5) for i in range(len(k_lens))])
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # a padding row (context 0) gives zeros, not NaN
    out = torch_decode(q, kc, vc, bt, torch.tensor([0] + k_lens[1:], dtype=torch.int32), D ** -0.5)
    assert out[0].abs().max() == 0 and not out.isnan().any()


@pytest.mark.parametrize("H,KVH", HEADS)
def test_attention_module_request(H, KVH, D=64, block_size=16):
    """Prefill (one sequence with a cached prefix) then decode through `Attention`, vs dense attention."""
    k_lens, cached, steps = [45, 12], [32, 0], 3
    total = [n + steps for n in k_lens]
    Q, K, V = rand_seqs(total, H, D, 1), rand_seqs(total, KVH, D, 2), rand_seqs(total, KVH, D, 3)
    attn = Attention(H, D, D ** -0.5, KVH)
    attn.k_cache, attn.v_cache, bt = build_pages(K, V, block_size, width=8)
    # forget everything but the cached prefixes: the module must store the rest itself
    for i, c in enumerate(cached):
        s = slots_of(bt[i], c, total[i], block_size)
        attn.k_cache.view(-1, KVH, D)[s] = float("nan")
        attn.v_cache.view(-1, KVH, D)[s] = float("nan")
    q_lens = [n - c for n, c in zip(k_lens, cached)]
    slots = torch.cat([slots_of(bt[i], cached[i], k_lens[i], block_size) for i in range(2)]).int()
    set_context(True, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens), slots, block_tables=bt)
    cat = lambda X: torch.cat([X[i][cached[i]:k_lens[i]] for i in range(2)])
    out = attn(cat(Q), cat(K), cat(V))
    ref = torch.cat([dense_attention(Q[i][cached[i]:k_lens[i]], K[i][:k_lens[i]], V[i][:k_lens[i]], D ** -0.5)
                     for i in range(2)])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for step in range(steps):
        pos = [n + step for n in k_lens]
        slots = torch.cat([slots_of(bt[i], p, p + 1, block_size) for i, p in enumerate(pos)]).int()
        slots = torch.cat([slots, torch.tensor([-1], dtype=torch.int32)])         # plus a CUDA-graph padding row
        set_context(False, slot_mapping=slots, context_lens=torch.tensor([p + 1 for p in pos] + [0], dtype=torch.int32),
                    block_tables=torch.cat([bt, torch.full((1, bt.shape[1]), -1, dtype=torch.int32)]))
        pick = lambda X: torch.stack([X[i][p] for i, p in enumerate(pos)] + [torch.randn_like(X[0][0])])
        before = attn.k_cache.clone()
        out = attn(pick(Q), pick(K), pick(V))
        ref = torch.cat([dense_attention(Q[i][p:p + 1], K[i][:p + 1], V[i][:p + 1], D ** -0.5) for i, p in enumerate(pos)])
        torch.testing.assert_close(out[:2].double(), ref, atol=1e-5, rtol=1e-5)
        assert out[2].abs().max() == 0
        changed = (attn.k_cache != before) & ~(before.isnan() & attn.k_cache.isnan())
        assert int(changed.any(-1).any(-1).sum()) == 2                            # two slots written, not three


def test_backend_selection():
    model = torch.nn.Sequential(Attention(4, 16, 0.25, 2), torch.nn.Linear(2, 2), Attention(4, 16, 0.25, 2))
    assert available_backends()[0] == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(model, "xformers")
    if "flash-attn" not in available_backends():
        with pytest.raises(ValueError, match="not available"):
            set_attention_backend(model, "flash-attn")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Attention(4, 16, 0.25, 3)
    if HAS_TRITON:
        set_attention_backend(model, "triton")
        assert [m.backend for m in model.modules() if isinstance(m, Attention)] == ["triton", "triton"]


def test_importing_attention_does_not_import_triton():
    import subprocess, sys
    code = ("import sys, torch; before = 'triton' in sys.modules; import nanovllm_lit.layers.attention as a; "
            "a.available_backends(); assert before or 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- triton kernels vs torch backend (small shapes)
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5) if DEV == "cpu" else dict(atol=1e-4, rtol=1e-4)   # fp32 products are exact (ieee) on GPU too


@needs_triton
def test_triton_interpreter_on_cpu():
    from nanovllm_lit.layers import triton_kernels as tk
    assert tk.INTERPRET == (not HAS_CUDA)


@needs_triton
@pytest.mark.parametrize("H,KVH,D,block_size", [(4, 2, 16, 16), (4, 1, 64, 32), (2, 2, 32, 16)])
def test_triton_store(H, KVH, D, block_size):
    from nanovllm_lit.layers.triton_kernels import store_kvcache_triton
    qkv = torch.randn(6, 3, KVH, D, device=DEV)                    # key/value as strided views of a fused tensor
    slots = torch.tensor([3, -1, 0, block_size + 1, 2 * block_size - 1, -1], dtype=torch.int32, device=DEV)
    kc1, vc1 = torch.zeros(2, block_size, KVH, D, device=DEV), torch.zeros(2, block_size, KVH, D, device=DEV)
    kc2, vc2 = kc1.clone(), vc1.clone()
    store_kvcache(qkv[:, 1], qkv[:, 2], kc1, vc1, slots)
    store_kvcache_triton(qkv[:, 1], qkv[:, 2], kc2, vc2, slots)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


@needs_triton
@pytest.mark.parametrize("H,KVH,D,block_size,num_splits", [
    (4, 2, 16, 16, None), (4, 1, 64, 32, 3), (8, 2, 32, 16, 2), (4, 4, 128, 16, 1)])
def test_triton_decode(H, KVH, D, block_size, num_splits):
    from nanovllm_lit.layers.triton_kernels import decode_attention
    k_lens = [5, 40, 17, 1]
    K, V = rand_seqs(k_lens, KVH, D, 2, device=DEV), rand_seqs(k_lens, KVH, D, 3, device=DEV)
    kc, vc, bt = build_pages(K, V, block_size)
    q = torch.randn(len(k_lens), H, D, device=DEV)
    cl = torch.tensor([5, 40, 0, 1], dtype=torch.int32, device=DEV)   # includes a padding row
    out = decode_attention(q, kc, vc, bt, cl, D ** -0.5, num_splits=num_splits)
    torch.testing.assert_close(out, torch_decode(q, kc, vc, bt, cl, D ** -0.5), **TOL)
    assert out[2].abs().max() == 0


@needs_triton
@pytest.mark.parametrize("H,KVH,D,block_size", [(4, 2, 16, 16), (4, 1, 64, 32), (8, 2, 32, 16)])
def test_triton_prefill(H, KVH, D, block_size):
    from nanovllm_lit.layers.triton_kernels import prefill_attention
    k_lens, q_lens = [37, 16 + block_size, 9], [5, 16, 1]
    K, V = rand_seqs(k_lens, KVH, D, 2, device=DEV), rand_seqs(k_lens, KVH, D, 3, device=DEV)
    kc, vc, bt = build_pages(K, V, block_size)
    q = torch.randn(sum(q_lens), H, D, device=DEV)
    args = (cu(q_lens, DEV), cu(k_lens, DEV))
    ref = torch_prefill(q, None, None, kc, vc, *args, D ** -0.5, block_tables=bt)
    out = prefill_attention(q, kc, vc, *args, max(q_lens), D ** -0.5, block_tables=bt, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, **TOL)
    # no prefix: K/V from the batch itself
    qf = torch.randn(sum(k_lens), H, D, device=DEV)
    argsf = (cu(k_lens, DEV), cu(k_lens, DEV))
    ref = torch_prefill(qf, torch.cat(K), torch.cat(V), None, None, *argsf, D ** -0.5)
    v_view = torch.stack([torch.cat(V), torch.cat(K)], 1)[:, 0]     # v as a strided view, as from a fused QKV
    out = prefill_attention(qf, torch.cat(K), v_view, *argsf, max(k_lens), D ** -0.5, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref, **TOL)


# ---------------------------------------------------------------- GPU: bf16 at Qwen3-0.6B's layout, CUDA graphs
QWEN = dict(H=16, KVH=8, D=128)


def _bf16_case(block_size=256, k_lens=(1, 300, 1000, 257, 4000), seed=0):
    H, KVH, D = QWEN["H"], QWEN["KVH"], QWEN["D"]
    K = rand_seqs(k_lens, KVH, D, seed + 1)
    V = rand_seqs(k_lens, KVH, D, seed + 2)
    kc, vc, bt = build_pages(K, V, block_size, width=math.ceil(4096 / block_size))
    to = lambda x: x.to("cuda", torch.bfloat16)
    return [to(k) for k in K], [to(v) for v in V], to(kc), to(vc), bt.cuda()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [256, 16])
def test_gpu_bf16_triton_vs_torch(block_size):
    from nanovllm_lit.layers.triton_kernels import decode_attention, prefill_attention
    H, KVH, D = QWEN["H"], QWEN["KVH"], QWEN["D"]
    k_lens, q_lens = [1, 300, 1000, 257, 4000], [1, 300, 17, 200, 1]
    K, V, kc, vc, bt = _bf16_case(block_size, k_lens)
    tol = dict(atol=3e-2, rtol=3e-2)
    q = torch.randn(sum(q_lens), H, D, device="cuda", dtype=torch.bfloat16)
    args = (cu(q_lens, "cuda"), cu(k_lens, "cuda"))
    torch.testing.assert_close(prefill_attention(q, kc, vc, *args, max(q_lens), D ** -0.5, block_tables=bt),
                               torch_prefill(q, None, None, kc, vc, *args, D ** -0.5, block_tables=bt), **tol)
    qd = torch.randn(len(k_lens), H, D, device="cuda", dtype=torch.bfloat16)
    cl = torch.tensor(k_lens, dtype=torch.int32, device="cuda")
    ref = torch_decode(qd, kc, vc, bt, cl, D ** -0.5)
    for splits in (None, 1, 4):
        torch.testing.assert_close(decode_attention(qd, kc, vc, bt, cl, D ** -0.5, num_splits=splits), ref, **tol)
    seqs = [300, 1000]                                              # no prefix, from the batch's own K/V
    qf = torch.randn(sum(seqs), H, D, device="cuda", dtype=torch.bfloat16)
    kf, vf = torch.cat([K[1], K[2]]), torch.cat([V[1], V[2]])
    a = (cu(seqs, "cuda"), cu(seqs, "cuda"))
    torch.testing.assert_close(prefill_attention(qf, kf, vf, *a, max(seqs), D ** -0.5),
                               torch_prefill(qf, kf, vf, None, None, *a, D ** -0.5), **tol)


@gpu
@pytest.mark.gpu
def test_gpu_cuda_graph_decode():
    """Capture store + decode of the triton backend through `Attention`, replay with new inputs and lengths."""
    H, KVH, D, BS = QWEN["H"], QWEN["KVH"], QWEN["D"], 256
    k_lens = [100, 1000, 3000, 1]
    _, _, kc, vc, bt = _bf16_case(BS, k_lens)
    tri, ref = Attention(H, D, D ** -0.5, KVH), Attention(H, D, D ** -0.5, KVH)
    tri.k_cache, tri.v_cache = kc, vc
    ref.k_cache, ref.v_cache = kc.clone(), vc.clone()
    set_attention_backend(tri, "triton")
    B = len(k_lens) + 1                                             # one padding row, as the runner pads batches
    bt_pad = torch.cat([bt, torch.full((1, bt.shape[1]), -1, dtype=torch.int32, device="cuda")])
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(B, KVH, D, device="cuda", dtype=torch.bfloat16), torch.randn(B, KVH, D, device="cuda", dtype=torch.bfloat16)

    def step_inputs(lens):
        slots = [int(slots_of(bt[i], n - 1, n, BS)) for i, n in enumerate(lens)] + [-1]
        return (torch.tensor(slots, dtype=torch.int32, device="cuda"),
                torch.tensor(list(lens) + [0], dtype=torch.int32, device="cuda"))

    slot_mapping, context_lens = step_inputs(k_lens)
    set_context(False, slot_mapping=slot_mapping, context_lens=context_lens, block_tables=bt_pad)
    out = tri(q, k, v)                                              # warm-up: compiles the kernels
    ref(q, k, v)                                                    # ...and the same store on the reference cache
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri(q, k, v)
    for lens in ([101, 1001, 3001, 2], [102, 1002, 3002, 3]):
        sm, cl = step_inputs(lens)
        for dst, src in ((slot_mapping, sm), (context_lens, cl), (q, torch.randn_like(q)), (k, torch.randn_like(k)),
                         (v, torch.randn_like(v))):
            dst.copy_(src)
        graph.replay()
        expected = ref(q, k, v)                                      # eager torch backend, same context tensors
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
        assert out[-1].abs().max() == 0
        torch.testing.assert_close(tri.k_cache, ref.k_cache, atol=0, rtol=0, equal_nan=True)   # free slots are NaN
        torch.testing.assert_close(tri.v_cache, ref.v_cache, atol=0, rtol=0, equal_nan=True)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only switched on where there is no GPU")
def test_interpreter_works_when_triton_was_imported_first():
    "Triton imported before the kernel module (as an HF forward pass can do) must not break the interpreter."
    import subprocess, sys, textwrap
    code = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton.language as tl                      # built for the compiler
        import torch
        from triton.runtime.interpreter import InterpretedFunction
        assert not isinstance(tl.cdiv, InterpretedFunction)
        import nanovllm_lit.layers.triton_kernels as tk   # turns the interpreter on
        assert isinstance(tl.cdiv, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)
        key = torch.randn(3, 2, 16); k_cache = torch.zeros(4, 16, 2, 16); v_cache = torch.zeros_like(k_cache)
        tk.store_kvcache_triton(key, key, k_cache, v_cache, torch.tensor([0, -1, 17], dtype=torch.int32))
        assert torch.equal(k_cache.view(-1, 2, 16)[[0, 17]], key[[0, 2]])
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


_DECODE_FOR_HOPPER = r'''
import re, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import triton_kernels as tk
assert not tk.INTERPRET
fn = tk._decode_kernel
types = dict(q_ptr="*bf16", q_stride_b="i32", q_stride_h="i32", k_cache_ptr="*bf16", v_cache_ptr="*bf16",
             c_stride_slot="i32", c_stride_h="i32", block_tables_ptr="*i32", bt_stride="i32", context_lens_ptr="*i32",
             out_ptr="*bf16", o_stride_b="i32", o_stride_h="i32", part_o_ptr="*fp32", part_lse_ptr="*fp32",
             qk_scale="fp32", lock_ptr="*i32")
for pdl in (True, False):
    for fold in (False, True):
        const = dict(H=16, GROUP=2, GROUP_P=16, D=128, D_P=128, BLOCK_SIZE=256, BLOCK_N=64, NUM_SPLITS=33,
                     PRECISION="tf32", FOLD=fold, SPLITS_P=64, PDL=pdl)
        sig = {**types, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=const),
                           target=GPUTarget("cuda", 90, 32))
        ptx = k.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl and ("griddepcontrol.launch_dependents" in ptx) == pdl
        if pdl:                                    # PDL: the wait comes before the kernel reads or writes anything
            wait = ptx.index("griddepcontrol.wait")
            assert all(ptx.find(op) == -1 or ptx.find(op) > wait for op in ("ld.global", "st.global"))
red = tk._decode_reduce_kernel
types_red = dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16", o_stride_b="i32", o_stride_h="i32")
const = dict(H=16, D=128, D_P=128, NUM_SPLITS=33, SPLITS_P=64, PDL=True)
sig = {**types_red, **{k: "constexpr" for k in const}}
triton.compile(ASTSource(fn=red, signature={n: sig[n] for n in red.arg_names}, constexprs=const),
               target=GPUTarget("cuda", 90, 32))
ptx = [ln.strip() for ln in k.asm["ptx"].splitlines()]
atom = next(i for i, ln in enumerate(ptx) if re.search(r"atom\..*acq_rel.*add", ln))
last_store = max(i for i, ln in enumerate(ptx[:atom]) if re.search(r"st\.global", ln))
last_barrier = max(i for i, ln in enumerate(ptx[:atom]) if re.search(r"bar\.sync|barrier\.sync", ln))
assert last_store < last_barrier, "no barrier between the partials' stores and the atomic"
assert any("ld.global.cg" in ln for ln in ptx[atom:]), "the partials are not read past L1 after the atomic"
print("compiled")
'''


def test_decode_kernel_with_merge_in_last_split_compiles_for_hopper(triton_for_hopper):
    "10a's decode kernels, merge folded in or not, PDL or not, compile for sm_90; the fold's PTX has barrier -> atomic"
    " -> .cg loads; with PDL, griddepcontrol.wait comes before any global load or store."
    assert "compiled" in triton_for_hopper(_DECODE_FOR_HOPPER)
