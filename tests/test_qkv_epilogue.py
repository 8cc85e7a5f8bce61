"""Chapter 12b's fused QKV epilogue: the kernel against the chain of chapters 10-12 (Triton's interpreter on a CPU),
its errors, and the engine on the triton backend (fused) against the torch backend (the unfused reference) for
architectures with and without q/k norms."""
import pytest
import torch

from nanovllm_lit.layers.attention import store_kvcache
from nanovllm_lit.layers.layernorm import rms_norm
from nanovllm_lit.layers.qkv_epilogue import qkv_epilogue, uses_qkv_epilogue
from nanovllm_lit.layers.rotary_embedding import get_rope
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_checkpoint


def chain(qkv, pos, H, KVH, D, rope, wq, wk, k_cache, v_cache, slots):
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    q, k, v = q.view(-1, H, D), k.view(-1, KVH, D), v.view(-1, KVH, D)
    if wq is not None: q, k = rms_norm(q, wq, 1e-6), rms_norm(k, wk, 1e-6)
    q, k = rope(pos, q, k)
    store_kvcache(k, v, k_cache, v_cache, slots)
    return q, k, v


@pytest.mark.parametrize("H,KVH,D,R,norm", [(8, 8, 32, 32, True), (6, 2, 64, 64, True), (5, 1, 48, 32, True),
                                            (4, 2, 32, 32, False), (2, 1, 16, 8, False)])
def test_kernel_equals_chain_fp32(H, KVH, D, R, norm):
    g = torch.Generator().manual_seed(H * 100 + D)
    N, pages, BS = 11, 3, 16
    qkv = torch.randn(N, (H + 2 * KVH) * D, generator=g)
    pos = torch.randint(0, 200, (N,), generator=g)
    rope = get_rope(D, R, 256, 10000.0)
    wq, wk = (torch.rand(D, generator=g) + 0.5, torch.rand(D, generator=g) + 0.5) if norm else (None, None)
    slots = torch.randperm(pages * BS, generator=g)[:N].int()
    slots[[0, 5]] = -1                                             # padding rows: no cache write
    caches = [torch.full((pages, BS, KVH, D), float("nan")) for _ in range(4)]
    got = qkv_epilogue(qkv, pos, H, KVH, D, rope.cos_sin_cache, wq, wk, 1e-6, caches[0], caches[1], slots)
    ref = chain(qkv, pos, H, KVH, D, rope, wq, wk, caches[2], caches[3], slots)
    for a, b in zip(got, ref): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(a.isnan(), b.isnan())                   # the same slots written, nothing else
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-5, atol=1e-5)
    assert got[2].data_ptr() == qkv[:, (H + KVH) * D:].data_ptr()  # v is a view, not a copy


def test_kernel_without_cache_and_empty_batch():
    rope = get_rope(16, 16, 64, 10000.0)
    qkv = torch.randn(3, (2 + 2) * 16)
    q, k, v = qkv_epilogue(qkv, torch.tensor([0, 1, 2]), 2, 1, 16, rope.cos_sin_cache)   # no cache: stores nothing
    rq, rk = rope(torch.tensor([0, 1, 2]), qkv[:, :32].view(3, 2, 16), qkv[:, 32:48].view(3, 1, 16))
    torch.testing.assert_close(q, rq); torch.testing.assert_close(k, rk)
    q, k, v = qkv_epilogue(qkv[:0], torch.tensor([], dtype=torch.long), 2, 1, 16, rope.cos_sin_cache)
    assert q.shape == (0, 2, 16) and k.shape == (0, 1, 16) and v.shape == (0, 1, 16)


def test_kernel_errors():
    rope = get_rope(16, 16, 64, 10000.0)
    pos = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="qkv must be"):
        qkv_epilogue(torch.randn(2, 63), pos, 2, 1, 16, rope.cos_sin_cache)
    with pytest.raises(ValueError, match="even number of columns"):
        qkv_epilogue(torch.randn(2, 64), pos, 2, 1, 16, get_rope(8, 8, 64, 10000.0).cos_sin_cache[:, :7])
    with pytest.raises(ValueError, match="both q_weight and k_weight"):
        qkv_epilogue(torch.randn(2, 64), pos, 2, 1, 16, rope.cos_sin_cache, torch.ones(16), None)
    cache = torch.zeros(2, 16, 1, 16)
    with pytest.raises(ValueError, match="one slot per row"):
        qkv_epilogue(torch.randn(2, 64), pos, 2, 1, 16, rope.cos_sin_cache, None, None, 1e-6, cache, cache.clone(),
                     torch.tensor([0], dtype=torch.int32))


def test_switch(monkeypatch):
    x = torch.zeros(2, 4)
    assert uses_qkv_epilogue("triton", x) and uses_qkv_epilogue("flash-attn", x)
    assert not uses_qkv_epilogue("torch", x) and not uses_qkv_epilogue("triton", x.long())
    monkeypatch.setenv("NANOVLLM_LIT_FUSED_QKV", "0")
    assert not uses_qkv_epilogue("triton", x)


@pytest.mark.parametrize("arch,extra", [("Qwen3ForCausalLM", {}), ("LlamaForCausalLM", {}),
                                        ("Qwen2ForCausalLM", {"num_attention_heads": 6, "num_key_value_heads": 2})])
def test_engine_triton_fused_equals_torch_backend(tmp_path, arch, extra):
    path = make_tiny_checkpoint(tmp_path / arch, arch, **extra)
    kw = dict(device="cpu", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=4, kvcache_block_size=16,
              num_kvcache_blocks=12)
    prompts = [[5, 6, 7, 8] * 5, [5, 6, 7, 8] * 5 + [9], [40, 41, 42]]        # the second hits the first's prefix
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    out = {}
    for backend in ("torch", "triton"):
        with LLMEngine(path, attention_backend=backend, **kw) as llm:
            if backend == "triton":                                 # the fused path is the one that runs
                attn = llm.model_runner.model.model.layers[0].self_attn
                calls = []
                original = attn.fused_epilogue
                attn.fused_epilogue = lambda *a: calls.append(1) or original(*a)
            out[backend] = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert calls, "the triton backend did not take the fused epilogue"
    assert out["triton"] == out["torch"]


def test_tp2_triton_fused_equals_one_rank_torch(tmp_path):
    "Under TP each rank runs the kernel on its own heads (2 of 4 query heads, 1 of 2 KV heads), gloo on a CPU."
    path = make_tiny_checkpoint(tmp_path / "q3", "Qwen3ForCausalLM")
    kw = dict(device="cpu", max_model_len=96, max_num_batched_tokens=192, kvcache_block_size=16, num_kvcache_blocks=12)
    prompts = [[5, 6, 7, 8] * 4, [9, 10, 11]]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLMEngine(path, attention_backend="torch", **kw) as llm:
        ref = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    with LLMEngine(path, attention_backend="triton", tensor_parallel_size=2, **kw) as llm:
        got = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == ref


_COMPILE_FOR_HOPPER = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import qkv_epilogue as qe
assert not qe.INTERPRET
ptrs = dict(qkv_ptr="*bf16", q_out_ptr="*bf16", k_out_ptr="*bf16", q_w_ptr="*bf16", k_w_ptr="*bf16", cs_ptr="*fp32",
            positions_ptr="*i64", slot_ptr="*i32", k_cache_ptr="*bf16", v_cache_ptr="*bf16")
ints = dict(qkv_stride="i32", cs_stride="i32", c_stride_slot="i32", c_stride_h="i32", eps="fp32")
for store, pdl in ((True, True), (True, False), (False, False)):
    for norm, tail in ((True, 0), (False, 32)):
        const = dict(H=16, KVH=8, H_P=16, KVH_P=8, D=128, HALF=(128 - tail) // 2, HALF_P=64, TAIL=tail,
                     TAIL_P=max(1, tail), HAS_NORM=norm, STORE=store, PDL=pdl)
        sig = {**ptrs, **ints, **{k: "constexpr" for k in const}}
        sig = {name: sig[name] for name in qe._qkv_epilogue_kernel.arg_names}
        triton.compile(ASTSource(fn=qe._qkv_epilogue_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32))
fn = qe._rms_norm_kernel
types = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", res_out_ptr="*bf16", K="i32",
             stride_x="i32", stride_r="i32", eps="fp32")
for has_res in (True, False):
    for pdl in (True, False):
        const = dict(BLOCK=1024, HAS_RES=has_res, PDL=pdl)
        sig = {**types, **{k: "constexpr" for k in const}}
        ptx = triton.compile(ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=const),
                             target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl
        if pdl:                                  # the norm weight loads before the wait, every store after it
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("st.global")
print("compiled")
'''


def test_kernel_passes_tritons_compiler_for_hopper(triton_for_hopper):
    "The interpreter accepts code the compiler rejects; compile the kernels for sm_90 (no GPU needed: Triton ships"
    " ptxas); the norm kernel with PDL loads its weight before griddepcontrol.wait and stores after it."
    assert "compiled" in triton_for_hopper(_COMPILE_FOR_HOPPER)
