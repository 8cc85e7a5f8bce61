"""Chapter 09a's Triton GEMV, on the CPU through Triton's interpreter (small shapes: the interpreter is slow).

- `gemv` equals the fp32 product of the same inputs within the dtype's tolerance: fp32, fp16, bf16, odd N and K,
  M from 1 to 16, bias or not, split-K or not, the FMA and the tensor-core path;
- its checks reject what it cannot do;
- the dispatch `linear` (chapter 09) takes it only when it should, and `force_gemv` sends a whole tiny model
  through it with the same logits as F.linear (and tensor-parallel shards still add up).
"""
import os
import pytest
import torch
import torch.nn.functional as F

from nanovllm_lit.layers import gemv_triton, linear as linear_mod
from nanovllm_lit.layers.gemv_triton import GEMV_TOLERANCE, gemv, gemv_config, gemv_error, m_bucket
from nanovllm_lit.layers.linear import (GEMV_MAX_M, MergedColumnParallelLinear, RowParallelLinear, fake_tp,
                                        force_gemv, gemv_enabled, linear, uses_gemv)
from nanovllm_lit.utils.testing import make_tiny_checkpoint

torch.set_num_threads(1)
SMALL = dict(block_n=16, block_k=32)          # several programs and several K steps on tiny shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2])
def test_matches_fp32_reference(dtype, split):
    g = torch.Generator().manual_seed(0)
    N, K = 45, 77                                                        # tails in both directions
    w, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    for M in (1, 2, 3, 5, 8, 13, 16):
        x = torch.randn(M, K, generator=g).to(dtype)
        for bias in (None, b):
            y = gemv(x, w, bias, config=dict(SMALL, split_k=split))
            assert y.shape == (M, N) and y.dtype == dtype
            assert gemv_error(y, x, w, bias) <= GEMV_TOLERANCE[dtype], (M, bias is None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_and_fma_paths_agree_with_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 96, generator=g).to(dtype), torch.randn(40, 96, generator=g).to(dtype)
    for dot in (True, False):
        assert gemv_error(gemv(x, w, config=dict(SMALL, dot=dot)), x, w) <= GEMV_TOLERANCE[dtype]


def test_negative_control_a_wrong_product_fails_the_check():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(4, 64, generator=g).bfloat16(), torch.randn(32, 64, generator=g).bfloat16()
    y = gemv(x, w, config=SMALL)
    assert gemv_error(y, x, w) <= GEMV_TOLERANCE[torch.bfloat16]
    assert gemv_error(y, x, w.roll(1, 1)) > 10 * GEMV_TOLERANCE[torch.bfloat16]   # a shifted K: caught
    assert gemv_error(gemv(x[:, :32], w[:, :32]), x, w) > 10 * GEMV_TOLERANCE[torch.bfloat16]   # half of K


def test_strided_rows_and_the_default_config():
    g = torch.Generator().manual_seed(3)
    buf, w = torch.randn(8, 300, generator=g), torch.randn(50, 260, generator=g)
    x = buf[:5, 20:280]                                                  # a row stride of 300
    assert gemv_error(gemv(x, w), x, w) <= GEMV_TOLERANCE[torch.float32]


def test_input_checks():
    w = torch.randn(8, 16)
    for x, msg in ((torch.randn(GEMV_MAX_M + 1, 16), "1 <= M <= 16"), (torch.randn(0, 16), "1 <= M"),
                   (torch.randn(2, 16).half(), "of one dtype"), (torch.randn(2, 16).double(), "of one dtype"),
                   (torch.randn(2, 15), "weight (N, K) expected")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")): gemv(x, w)
    with pytest.raises(ValueError, match="contiguous along K"): gemv(torch.randn(2, 16), w.T.contiguous().T)
    with pytest.raises(ValueError, match="bias of shape"): gemv(torch.randn(2, 16), w, torch.randn(7))


def test_buckets_and_config_table():
    assert sorted({m_bucket(M) for M in range(1, GEMV_MAX_M + 1)}) == [1, 2, 4, 8, 16]
    key = (123, 456, 4)
    gemv_triton.GEMV_CONFIG[key] = dict(block_n=4, split_k=3)
    try:
        cfg = gemv_config(3, 123, 456, torch.bfloat16)
        assert (cfg["block_n"], cfg["split_k"]) == (4, 3) and "num_warps" in cfg
        x, w = torch.randn(3, 456).bfloat16(), torch.randn(123, 456).bfloat16()
        assert gemv_error(gemv(x, w), x, w) <= GEMV_TOLERANCE[torch.bfloat16]
    finally:
        del gemv_triton.GEMV_CONFIG[key]


def test_dispatch(monkeypatch):
    w, b = torch.randn(6, 4), torch.randn(6)
    assert not uses_gemv(torch.randn(3, 4), w)                           # CPU: F.linear unless forced
    with force_gemv():
        assert uses_gemv(torch.randn(2, 8, 4), w, b)                     # 16 rows after flattening
        assert not uses_gemv(torch.randn(17, 4), w)
        assert not uses_gemv(torch.randn(3, 4), w, b.half())
        assert not uses_gemv(torch.randn(3, 4).double(), w.double())
        x = torch.randn(2, 3, 4)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b))
        xt = torch.randn(4, 3).T                                         # last dim not contiguous: copied first
        torch.testing.assert_close(linear(xt, w), F.linear(xt, w))
    monkeypatch.setenv("NANOVLLM_LIT_GEMV", "0")
    assert not gemv_enabled()                                            # read at the call
    monkeypatch.setenv("NANOVLLM_LIT_GEMV", "1")
    assert gemv_enabled()


def test_tensor_parallel_shards_add_up_through_gemv():
    g = torch.Generator().manual_seed(4)
    W, b, x = torch.randn(5, 8, generator=g), torch.randn(5, generator=g), torch.randn(3, 8, generator=g)
    G, U = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    partials, gates = [], []
    with force_gemv():
        for r in range(2):
            with fake_tp(r, 2): row, mer = RowParallelLinear(8, 5, bias=True), MergedColumnParallelLinear(8, [6, 6])
            row.weight_loader(row.weight, W); row.weight_loader(row.bias, b)
            mer.weight_loader(mer.weight, G, 0); mer.weight_loader(mer.weight, U, 1)
            partials.append(row(x.chunk(2, -1)[r])); gates.append(mer(x).split([3, 3], -1)[0])
    torch.testing.assert_close(sum(partials), x @ W.T + b)              # bias once, by rank 0
    torch.testing.assert_close(torch.cat(gates, -1), x @ G.T)


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen2ForCausalLM"])   # Qwen2: q/k/v biases
def test_tiny_model_logits_equal_with_the_gemv_forced(arch, tmp_path, monkeypatch):
    from transformers import AutoConfig
    from nanovllm_lit.models import model_class_for
    from nanovllm_lit.utils.context import reset_context, set_context
    from nanovllm_lit.utils.loader import load_model
    path = make_tiny_checkpoint(tmp_path, arch, initializer_range=0.1)
    cfg = AutoConfig.from_pretrained(path)
    model = model_class_for(cfg)(cfg)
    load_model(model, path)
    model.eval()
    lens = [5, 1, 8]                                                     # 14 tokens: every matmul has <= 16 rows
    cu = [0, 5, 6, 14]
    ids = torch.randint(3, cfg.vocab_size, (14,), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(n) for n in lens])
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)

    def run():
        set_context(True, cu_seqlens_q=i32(cu), cu_seqlens_k=i32(cu), max_seqlen_q=8, max_seqlen_k=8,
                    slot_mapping=i32(list(range(14))))
        try:
            with torch.no_grad():
                hidden = model(ids, pos)
                return hidden, model.compute_logits(hidden)
        finally:
            reset_context()

    calls, normed = [], []
    real = gemv_triton.gemv
    monkeypatch.setattr(gemv_triton, "gemv", lambda *a, **k: calls.append(a[0].shape) or
                        normed.append(k.get("norm") is not None) or real(*a, **k))
    ref_hidden, ref_logits = run()
    assert not calls                                                     # the CPU path: F.linear
    with force_gemv(): run()                                             # 14 rows: the norm stays its own kernel
    assert len(calls) == 4 * cfg.num_hidden_layers + 1 and not any(normed)   # (09's GEMV_NORM_MAX_M = 1)
    calls.clear(); normed.clear()
    monkeypatch.setattr(linear_mod, "GEMV_NORM_MAX_M", 16)               # the fused kernel at 14 rows: correct too
    with force_gemv(): hidden, logits = run()
    n_linear = 4 * cfg.num_hidden_layers + 1                             # qkv, o, gate_up, down per layer; lm_head
    assert len(calls) == n_linear and calls[-1] == (3, cfg.hidden_size)  # the LM head: the 3 last tokens
    assert calls[3] == (14, 2 * cfg.intermediate_size)                   # down_proj read [gate | up]: SiLU fused
    assert sum(normed) == 2 * cfg.num_hidden_layers and normed[0] and normed[2]   # qkv_proj, gate_up_proj: norm fused
    monkeypatch.setenv("NANOVLLM_LIT_FUSED_NORM", "0")                   # the switch: norms as their own step
    normed.clear()
    with force_gemv(): _, unfused_logits = run()
    assert not any(normed)
    torch.testing.assert_close(unfused_logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    assert logits.shape == (3, cfg.vocab_size)
    scale = ref_logits.abs().max().item()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5 * ref_hidden.abs().max().item())


_GEMV_FOR_HOPPER = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import gemv_triton as g
assert not g.INTERPRET
def build(fn, types, const):
    sig = {**types, **{k: "constexpr" for k in const}}
    triton.compile(ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=const),
                   target=GPUTarget("cuda", 90, 32))
types = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16", y_ptr="*bf16", lock_ptr="*i32", M="i32", N="i32", K="i32",
             stride_xm="i32", stride_wn="i32", k_len="i32",
             res_ptr="*bf16", g_ptr="*bf16", res_out_ptr="*bf16", eps="fp32")
for bm, bn, bk, dot in ((1, 4, 512, False), (4, 8, 256, False), (16, 32, 256, True), (16, 32, 128, True)):
    for partial, bias, fold in ((False, True, False), (True, False, False), (True, True, True), (True, False, True)):
        t = {**types, "out_ptr": "*fp32"} if partial else types
        for act, norm, pdl in ((False, 0, False), (True, 0, False), (False, 0, True), (True, 0, True),
                               (False, 1, True), (False, 2, False), (False, 2, True)):
            if norm and partial: continue                                    # gemv never splits K under a norm
            build(g._gemv_kernel, t, dict(BM=bm, BN=bn, BK=bk, DOT=dot, UPCAST=False, PARTIAL=partial, HAS_BIAS=bias,
                                          FOLD=fold, ACT=act, NORM=norm, PDL=pdl))
build(g._sum_splits_kernel, dict(part_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", M="i32", N="i32", S="i32"),
      dict(BN=1024, HAS_BIAS=True))
print("compiled")
'''

_FOLD_PTX = r'''
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import gemv_triton as g
types = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", y_ptr="*bf16", lock_ptr="*i32", M="i32",
             N="i32", K="i32", stride_xm="i32", stride_wn="i32", k_len="i32", res_ptr="*bf16", g_ptr="*bf16",
             res_out_ptr="*bf16", eps="fp32")
const = dict(BM=1, BN=16, BK=256, DOT=False, UPCAST=False, PARTIAL=True, HAS_BIAS=False, FOLD=True, ACT=False,
             NORM=0, PDL=PDL)
sig = {**types, **{k: "constexpr" for k in const}}
k = triton.compile(ASTSource(fn=g._gemv_kernel, signature={n: sig[n] for n in g._gemv_kernel.arg_names},
                             constexprs=const), target=GPUTarget("cuda", 90, 32))
print(k.asm["ptx"])
'''


def test_pdl_gemv_loads_weights_before_its_wait_and_writes_after(triton_for_hopper):
    "In the PTX for sm_90 with PDL: global loads (the first weight tile) before griddepcontrol.wait, every store and"
    " atomic after it, then launch_dependents; without PDL neither instruction is there."
    lines = [ln.strip() for ln in triton_for_hopper("PDL = True" + _FOLD_PTX).splitlines()]
    at = lambda word: [i for i, ln in enumerate(lines) if word in ln and not ln.startswith("//")]
    wait, release = at("griddepcontrol.wait"), at("griddepcontrol.launch_dependents")
    assert len(wait) == 1 and len(release) == 1 and wait[0] < release[0]
    assert min(at("ld.global")) < wait[0], "no weight load before the wait"
    assert wait[0] < min(at("st.global") + at("atom.")), "a store or atomic before the wait"
    plain = triton_for_hopper("PDL = False" + _FOLD_PTX)
    assert "griddepcontrol" not in plain
    # the norm's variant (09a, "The norm, read on the way in"): it also stores the new residual, after the wait too
    norm = triton_for_hopper("PDL = True" + _FOLD_PTX.replace("PARTIAL=True", "PARTIAL=False").replace(
        "FOLD=True", "FOLD=False").replace("NORM=0", "NORM=2"))
    lines = [ln.strip() for ln in norm.splitlines()]
    wait = at("griddepcontrol.wait")
    assert len(wait) == 1 and min(at("ld.global")) < wait[0] < min(at("st.global"))
    assert len(at("st.global")) >= 2                                     # y and the residual


def test_pdl_early_release_comes_before_the_wait_and_every_write_after(triton_for_hopper):
    "NANOVLLM_LIT_PDL=early (PDL = 2, chapter 10a): launch_dependents, then the wait; weights still load before it."
    lines = [ln.strip() for ln in triton_for_hopper("PDL = 2" + _FOLD_PTX).splitlines()]
    at = lambda word: [i for i, ln in enumerate(lines) if word in ln and not ln.startswith("//")]
    wait, release = at("griddepcontrol.wait"), at("griddepcontrol.launch_dependents")
    assert len(wait) == 1 and len(release) == 1 and release[0] < wait[0]
    assert min(at("ld.global")) < wait[0] < min(at("st.global") + at("atom."))


def test_pdl_mode_from_the_environment(monkeypatch):
    "pdl_enabled: 0 without CUDA whatever the switch says; a value other than 0, 1 or early is an error naming it."
    from nanovllm_lit.layers.triton_kernels import pdl_enabled
    for mode in ("0", "1", "early"):
        monkeypatch.setenv("NANOVLLM_LIT_PDL", mode)
        assert pdl_enabled("cpu") == 0
    monkeypatch.setenv("NANOVLLM_LIT_PDL", "yes")
    with pytest.raises(ValueError, match="NANOVLLM_LIT_PDL.*'yes'"): pdl_enabled("cpu")


@pytest.mark.parametrize("K", [64, 1000, 1024, 2048, 3072, 5000, 20000])
def test_one_row_tiles_take_each_programs_slice_in_one_step(K):
    "One row, bf16 (09a's `_one_row`): each program's slice of K is one tile of <= 2,048 columns (so PDL loads all of"
    " it before the wait), unless K > 8 x 1,024; the product is still right (Triton's interpreter)."
    cfg = gemv_config(1, 96, K, torch.bfloat16)
    k_len = -(-(-(-K // cfg["split_k"])) // cfg["block_k"]) * cfg["block_k"]     # as gemv computes it
    assert cfg["block_k"] <= 2048 and (k_len == cfg["block_k"] or K > 8 * 1024) and k_len * cfg["split_k"] >= K
    assert -(-K // k_len) == cfg["split_k"] or K > 8 * 1024                       # no empty slice
    if K in (1000, 3072):
        g = torch.Generator().manual_seed(K)
        x, w = torch.randn(1, K, generator=g).bfloat16(), torch.randn(96, K, generator=g).bfloat16()
        assert gemv_error(gemv(x, w), x, w) <= GEMV_TOLERANCE[torch.bfloat16]


def test_the_fused_norm_is_kept_to_one_row():
    "09's uses_gemv_norm: one row yes, two rows no (GEMV_NORM_MAX_M), the GEMV itself still yes."
    from nanovllm_lit.layers.linear import force_gemv, uses_gemv, uses_gemv_norm
    w, g = torch.randn(8, 16), torch.randn(16)
    with force_gemv():
        assert uses_gemv_norm(torch.randn(1, 16), w, None, g)
        assert uses_gemv(torch.randn(2, 16), w) and not uses_gemv_norm(torch.randn(2, 16), w, None, g)


def test_folded_split_k_orders_its_memory_accesses_in_ptx(triton_for_hopper):
    "In the PTX for sm_90: partials stored, a CTA barrier, the acq_rel GPU-scope atomic, then L1-bypassing loads."
    import re
    lines = [ln.strip() for ln in triton_for_hopper("PDL = False" + _FOLD_PTX).splitlines()]
    def first(pattern, start=0):
        return next(i for i in range(start, len(lines)) if re.search(pattern, lines[i]))
    store = first(r"^(@%p\d+ )?st\.global.*\.(f32|b32)")          # a partial (fp32) stored
    atom = first(r"atom\..*acq_rel\.gpu.*add|atom\.acq_rel\.gpu.*add|atom\.global\.gpu\.acq_rel\.add")
    assert store < first(r"bar\.sync|barrier\.sync", store) < atom, "no barrier between the partial's stores and the atomic"
    assert first(r"ld\.global\.cg", atom) > atom                     # partials read past L1, after the atomic


def test_gemv_passes_tritons_compiler_for_hopper(triton_for_hopper):
    "The kernels compile for sm_90 (no GPU needed: Triton ships ptxas); the interpreter alone cannot show this."
    assert "compiled" in triton_for_hopper(_GEMV_FOR_HOPPER)


def test_fused_activation_switch_and_tp_partial_sums(tmp_path, monkeypatch):
    "NANOVLLM_LIT_FUSED_ACT=0 keeps SiLU·mul as its own step; on, down_proj's fused GEMV == the unfused one."
    from nanovllm_lit.layers.linear import force_gemv, uses_gemv_silu_mul
    from nanovllm_lit.models.qwen3 import Qwen3MLP
    torch.manual_seed(3)
    mlp = Qwen3MLP(32, 48, bias=True)
    for p in mlp.parameters(): torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(5, 32)
    with torch.no_grad():
        plain = mlp(x)                                                   # the CPU: no GEMV, no fusion
        assert not uses_gemv_silu_mul(mlp.gate_up_proj(x), mlp.down_proj.weight)
        with force_gemv():
            assert uses_gemv_silu_mul(mlp.gate_up_proj(x), mlp.down_proj.weight, mlp.down_proj.bias)
            fused = mlp(x)
            monkeypatch.setenv("NANOVLLM_LIT_FUSED_ACT", "0")
            assert not uses_gemv_silu_mul(mlp.gate_up_proj(x), mlp.down_proj.weight)
            unfused = mlp(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused, torch.zeros_like(fused))


_ENGINE_GEMVS_FOR_HOPPER = r'''
import os, subprocess, tempfile, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from nanovllm_lit.layers import gemv_triton as g
from nanovllm_lit.layers.linear import GEMV_NORM_MAX_M
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
g._SMS[torch.device("cuda", 0)] = 132                        # the configurations of an H100 / H200
SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024), "down_proj": (1024, 3072),
          "lm_head": (151_936, 1024)}
types = dict(x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", out_ptr="*fp32", y_ptr="*bf16", lock_ptr="*i32", M="i32",
             N="i32", K="i32", stride_xm="i32", stride_wn="i32", k_len="i32", res_ptr="*bf16", g_ptr="*bf16",
             res_out_ptr="*bf16", eps="fp32")
seen = set()
for name, (N, K) in SHAPES.items():
    for bm in (1, 2, 4, 8, 16):
        cfg = g.gemv_config(bm, N, K, torch.bfloat16, "cuda:0")
        norm = 2 if name in ("qkv_proj", "gate_up_proj") and bm <= GEMV_NORM_MAX_M else 0   # as the engine calls it
        if norm: cfg["split_k"] = 1
        k_len = -(-(-(-K // cfg["split_k"])) // cfg["block_k"]) * cfg["block_k"]        # as gemv() derives them
        split = -(-K // k_len)
        const = dict(BM=max(bm, 16) if cfg["dot"] else bm, BN=cfg["block_n"], BK=cfg["block_k"], DOT=cfg["dot"],
                     UPCAST=False, PARTIAL=split > 1, HAS_BIAS=False, FOLD=split > 1, ACT=name == "down_proj",
                     NORM=norm, PDL=1)
        key = tuple(sorted(const.items())) + (cfg["num_warps"], cfg["num_stages"])
        if key in seen: continue
        seen.add(key)
        sig = {**types, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn=g._gemv_kernel, signature={n: sig[n] for n in g._gemv_kernel.arg_names},
                                     constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        line = next(l for l in usage.splitlines() if "REG:" in l)
        fields = dict(kv.split(":") for kv in line.split() if ":" in kv)
        print(name, bm, fields["REG"], fields["STACK"], fields["LOCAL"], flush=True)
'''


def test_the_engines_gemvs_compile_for_sm90_without_spilling(triton_for_hopper):
    "Every GEMV variant the engine launches for Qwen3-0.6B at 1-16 rows (09a's configurations on 132 SMs, the norm"
    " at GEMV_NORM_MAX_M rows, the SiLU in down_proj, PDL) keeps to registers on sm_90: no local memory, and at most"
    " 16 bytes of stack a thread (down_proj's folded split-K at 2-16 rows keeps 8). The norm's tensor-core variant"
    " at 16 rows spilled 328 bytes a thread and ran 2.6x slower (chapter 09a): this is the test that would have"
    " caught it without a GPU."
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this Triton ships no cuobjdump")
    rows = [ln.split() for ln in triton_for_hopper(_ENGINE_GEMVS_FOR_HOPPER).splitlines() if ln.strip()]
    assert len(rows) >= 6 and {r[0] for r in rows} >= {"qkv_proj", "o_proj", "down_proj", "lm_head"}   # (gate_up_proj
    spilled = [r for r in rows if int(r[3]) > 16 or r[4] != "0"]      # compiles as qkv_proj: the same K, constants)
    assert not spilled, f"(name, rows, registers, stack, local): {spilled}"
    assert all(int(r[2]) <= 255 for r in rows)
