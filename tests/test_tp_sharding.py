"""Tensor-parallel sharding checked on CPU.

For N in {2, 4}: build the layers of ranks 0..N-1 inside `fake_tp(r, N)` (collectives off), load the FULL
weights through each parameter's `weight_loader`, run every rank, combine the per-rank outputs the way the
collective would (concat for column-style outputs in their per-rank layout, sum for row / embedding, concat
for the LM head), and compare with the unsharded computation in fp32.
One test also runs the real collectives (gloo, 2 processes) to cover the all_reduce / gather code paths.
"""
import socket

import pytest
import torch
import torch.nn.functional as F

from nanovllm_lit.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                        ReplicatedLinear, RowParallelLinear, divide, fake_tp, get_tp_rank,
                                        get_tp_size)
from nanovllm_lit.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm_lit.utils.context import reset_context, set_context

TOL = dict(rtol=1e-5, atol=1e-5)
SIZES = [2, 4]


def load(param, full, *shard_id):
    param.weight_loader(param, full, *shard_id)


def build(n, make):
    "The layers of ranks 0..n-1, each built inside fake_tp(r, n)."
    layers = []
    for r in range(n):
        with fake_tp(r, n):
            layers.append(make())
    return layers


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    reset_context()


# ---------------------------------------------------------------------------------------------- TP state

def test_tp_state_and_fake_tp():
    assert (get_tp_rank(), get_tp_size()) == (0, 1)
    with fake_tp(3, 4):
        assert (get_tp_rank(), get_tp_size()) == (3, 4)
        layer = ColumnParallelLinear(8, 8)
    assert (get_tp_rank(), get_tp_size()) == (0, 1)
    assert (layer.tp_rank, layer.tp_size, layer.collectives) == (3, 4, False)  # read once, at build time
    assert ColumnParallelLinear(8, 8).collectives
    for rank, size in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError):
            with fake_tp(rank, size):
                pass
    with pytest.raises(RuntimeError):  # fake_tp is restored even when the body raises
        with fake_tp(1, 2):
            raise RuntimeError
    assert get_tp_size() == 1


def test_divide():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="num_heads = 6 is not divisible by the tensor-parallel size 4"):
        divide(6, 4, "num_heads")


# ---------------------------------------------------------------------------------------------- linear

@pytest.mark.parametrize("bias", [False, True])
def test_replicated(bias):
    W, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(5, 8)
    with fake_tp(1, 2):
        layer = ReplicatedLinear(8, 12, bias=bias)
    load(layer.weight, W)
    if bias:
        load(layer.bias, b)
    torch.testing.assert_close(layer(x), F.linear(x, W, b if bias else None), **TOL)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_column_parallel(n, bias):
    W, b, x = torch.randn(16, 8), torch.randn(16), torch.randn(5, 8)
    layers = build(n, lambda: ColumnParallelLinear(8, 16, bias=bias))
    for layer in layers:
        assert layer.weight.shape == (16 // n, 8)
        load(layer.weight, W)
        if bias:
            load(layer.bias, b)
    out = torch.cat([layer(x) for layer in layers], -1)  # all-gather = concat of output slices
    torch.testing.assert_close(out, F.linear(x, W, b if bias else None), **TOL)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_merged_column_parallel(n, bias, fused):
    sizes = [8, 12]
    Ws, bs, x = [torch.randn(s, 8) for s in sizes], [torch.randn(s) for s in sizes], torch.randn(5, 8)
    layers = build(n, lambda: MergedColumnParallelLinear(8, sizes, bias=bias))
    for layer in layers:
        if fused:  # the whole [gate; up] at once
            load(layer.weight, torch.cat(Ws))
            if bias:
                load(layer.bias, torch.cat(bs))
        else:
            for i in range(len(sizes)):
                load(layer.weight, Ws[i], i)
                if bias:
                    load(layer.bias, bs[i], i)
    # per-rank layout: [part 0 slice, part 1 slice]; rebuild each part by concatenating its slices over ranks
    per_rank = [layer(x).split([s // n for s in sizes], -1) for layer in layers]
    for i in range(len(sizes)):
        got = torch.cat([p[i] for p in per_rank], -1)
        torch.testing.assert_close(got, F.linear(x, Ws[i], bs[i] if bias else None), **TOL)


def test_merged_errors():
    with fake_tp(0, 4):
        with pytest.raises(ValueError, match=r"output_sizes\[1\] = 6 is not divisible"):
            MergedColumnParallelLinear(8, [8, 6])
        layer = MergedColumnParallelLinear(8, [8, 8])
    with pytest.raises(ValueError, match="shard_id 2 out of range"):
        load(layer.weight, torch.randn(8, 8), 2)
    with pytest.raises(ValueError, match="part 0 has 4 rows, expected 8"):
        load(layer.weight, torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="does not match expected"):  # wrong input width: no silent broadcast
        load(layer.weight, torch.randn(8, 1), 0)


def _qkv_reference(x, Wq, Wk, Wv, bq, bk, bv, bias):
    return (F.linear(x, Wq, bq if bias else None), F.linear(x, Wk, bk if bias else None),
            F.linear(x, Wv, bv if bias else None))


# (total heads, total kv heads): kv >= n splits kv heads, kv < n replicates them (not supported by nano-vllm)
QKV_CASES = [(8, 8), (8, 4), (8, 2), (8, 1)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("heads", QKV_CASES, ids=lambda h: f"H{h[0]}-KV{h[1]}")
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_parallel(n, heads, bias):
    H, KVH = heads
    hs, hidden = 4, 16
    Wq, Wk, Wv = torch.randn(H * hs, hidden), torch.randn(KVH * hs, hidden), torch.randn(KVH * hs, hidden)
    bq, bk, bv = torch.randn(H * hs), torch.randn(KVH * hs), torch.randn(KVH * hs)
    x = torch.randn(5, hidden)
    layers = build(n, lambda: QKVParallelLinear(hidden, hs, H, KVH, bias=bias))
    for layer in layers:
        for sid, w, b in zip("qkv", (Wq, Wk, Wv), (bq, bk, bv)):
            load(layer.weight, w, sid)
            if bias:
                load(layer.bias, b, sid)
    replicas = max(1, n // KVH)
    kv_local = max(1, KVH // n)
    for layer in layers:
        assert (layer.num_heads, layer.num_kv_heads, layer.num_kv_head_replicas) == (H // n, kv_local, replicas)
    per_rank = [layer(x).split([H // n * hs, kv_local * hs, kv_local * hs], -1) for layer in layers]
    q_ref, k_ref, v_ref = _qkv_reference(x, Wq, Wk, Wv, bq, bk, bv, bias)
    torch.testing.assert_close(torch.cat([p[0] for p in per_rank], -1), q_ref, **TOL)
    owners = range(0, n, replicas)  # one rank per replica group
    torch.testing.assert_close(torch.cat([per_rank[r][1] for r in owners], -1), k_ref, **TOL)
    torch.testing.assert_close(torch.cat([per_rank[r][2] for r in owners], -1), v_ref, **TOL)
    for r in range(n):  # replicas hold identical copies of their group's kv head
        torch.testing.assert_close(per_rank[r][1], per_rank[r - r % replicas][1], rtol=0, atol=0)
        torch.testing.assert_close(per_rank[r][2], per_rank[r - r % replicas][2], rtol=0, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("heads", QKV_CASES, ids=lambda h: f"H{h[0]}-KV{h[1]}")
def test_qkv_fused_load(n, heads):
    H, KVH = heads
    hs, hidden = 4, 16
    W, b = torch.randn((H + 2 * KVH) * hs, hidden), torch.randn((H + 2 * KVH) * hs)
    for r in range(n):
        with fake_tp(r, n):
            fused, parts = QKVParallelLinear(hidden, hs, H, KVH, bias=True), QKVParallelLinear(hidden, hs, H, KVH, bias=True)
        load(fused.weight, W); load(fused.bias, b)
        for sid, w, bb in zip("qkv", W.split([H * hs, KVH * hs, KVH * hs]), b.split([H * hs, KVH * hs, KVH * hs])):
            load(parts.weight, w, sid); load(parts.bias, bb, sid)
        torch.testing.assert_close(fused.weight, parts.weight, rtol=0, atol=0)
        torch.testing.assert_close(fused.bias, parts.bias, rtol=0, atol=0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("heads", QKV_CASES, ids=lambda h: f"H{h[0]}-KV{h[1]}")
def test_attention_block_sharded(n, heads):
    "qkv (column, by heads) -> causal GQA attention per rank -> o_proj (row): sum over ranks == unsharded block."
    H, KVH = heads
    hs, hidden, T = 4, 16, 6
    Wq, Wk, Wv, Wo = (torch.randn(H * hs, hidden), torch.randn(KVH * hs, hidden), torch.randn(KVH * hs, hidden),
                      torch.randn(hidden, H * hs))
    x = torch.randn(T, hidden)

    def attend(q, k, v, h, kvh):  # q (T, h*hs), k/v (T, kvh*hs) -> (T, h*hs)
        q, k, v = (t.view(T, -1, hs).transpose(0, 1) for t in (q, k, v))
        k, v = k.repeat_interleave(h // kvh, 0), v.repeat_interleave(h // kvh, 0)  # GQA: group g reads kv head g
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(0, 1).reshape(T, h * hs)

    ref = F.linear(attend(x @ Wq.T, x @ Wk.T, x @ Wv.T, H, KVH), Wo)
    total = torch.zeros_like(ref)
    for r in range(n):
        with fake_tp(r, n):
            qkv, o_proj = QKVParallelLinear(hidden, hs, H, KVH), RowParallelLinear(H * hs, hidden)
        for sid, w in zip("qkv", (Wq, Wk, Wv)):
            load(qkv.weight, w, sid)
        load(o_proj.weight, Wo)
        q, k, v = qkv(x).split([qkv.num_heads * hs, qkv.num_kv_heads * hs, qkv.num_kv_heads * hs], -1)
        total += o_proj(attend(q, k, v, qkv.num_heads, qkv.num_kv_heads))  # the all-reduce, by hand
    torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-4)


def test_qkv_errors():
    with fake_tp(0, 4):  # 3 kv heads cannot be replicated evenly over 4 ranks
        with pytest.raises(ValueError, match="the size must then be a multiple of num_kv_heads"):
            QKVParallelLinear(16, 4, 12, 3)
    with fake_tp(0, 2):  # 3 kv heads cannot be split over 2 ranks
        with pytest.raises(ValueError, match="num_kv_heads = 3 is not divisible"):
            QKVParallelLinear(16, 4, 6, 3)
    with fake_tp(0, 4):
        with pytest.raises(ValueError, match="num_heads = 6 is not divisible"):
            QKVParallelLinear(16, 4, 6, 2)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        QKVParallelLinear(16, 4, 6, 4)
    layer = QKVParallelLinear(16, 4, 4, 2)
    with pytest.raises(ValueError, match="shard_id must be 'q', 'k' or 'v'"):
        load(layer.weight, torch.randn(16, 16), "o")
    with pytest.raises(ValueError, match="k has 16 rows, expected 8"):
        load(layer.weight, torch.randn(16, 16), "k")
    with pytest.raises(ValueError, match="fused weight has 12 rows, expected 32"):
        load(layer.weight, torch.randn(12, 16))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_row_parallel(n, bias):
    W, b, x = torch.randn(12, 16), torch.randn(12), torch.randn(5, 16)
    layers = build(n, lambda: RowParallelLinear(16, 12, bias=bias))
    for layer in layers:
        assert layer.weight.shape == (12, 16 // n)
        load(layer.weight, W)
        if bias:
            load(layer.bias, b)
    partials = [layer(xs) for layer, xs in zip(layers, x.chunk(n, -1))]  # each rank gets its input slice
    torch.testing.assert_close(sum(partials), F.linear(x, W, b if bias else None), **TOL)  # all-reduce = sum
    if bias:  # the bias is added exactly once, by rank 0
        torch.testing.assert_close(layers[1](x.chunk(n, -1)[1]), F.linear(x.chunk(n, -1)[1], W.chunk(n, 1)[1]), **TOL)


def test_row_errors():
    with fake_tp(0, 4):
        with pytest.raises(ValueError, match="input_size = 6 is not divisible"):
            RowParallelLinear(6, 4)
        layer = RowParallelLinear(8, 4, bias=True)
    with pytest.raises(ValueError, match=r"expected \(4, 8\)"):
        load(layer.weight, torch.randn(4, 6))
    with pytest.raises(ValueError, match="does not match expected"):
        load(layer.bias, torch.randn(2))


@pytest.mark.parametrize("n", SIZES)
def test_mlp_column_then_row(n):
    "gate_up (merged column) -> SiLU*mul -> down (row): one sum over ranks gives the unsharded MLP."
    hidden, inter = 8, 16
    G, U, D, x = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter), torch.randn(5, hidden)
    total = 0
    for r in range(n):
        with fake_tp(r, n):
            gate_up, down = MergedColumnParallelLinear(hidden, [inter, inter]), RowParallelLinear(inter, hidden)
        load(gate_up.weight, G, 0); load(gate_up.weight, U, 1); load(down.weight, D)
        g, u = gate_up(x).chunk(2, -1)
        total = total + down(F.silu(g) * u)
    torch.testing.assert_close(total, (F.silu(x @ G.T) * (x @ U.T)) @ D.T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- embed / head

@pytest.mark.parametrize("n", SIZES)
def test_vocab_parallel_embedding(n):
    V, D = 32, 6
    E = torch.randn(V, D)
    ids = torch.tensor([0, 1, 7, 8, 15, 16, 23, 24, 31, 31, 0])
    layers = build(n, lambda: VocabParallelEmbedding(V, D))
    for layer in layers:
        assert layer.weight.shape == (V // n, D)
        load(layer.weight, E)
    outs = [layer(ids) for layer in layers]
    for r, out in enumerate(outs):  # each rank fills only the rows of ids it owns
        owned = (ids >= r * V // n) & (ids < (r + 1) * V // n)
        assert (out[~owned] == 0).all()
    torch.testing.assert_close(sum(outs), E[ids], rtol=0, atol=0)  # all-reduce = sum


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_parallel_lm_head(n, bias):
    V, D = 32, 6
    E, b = torch.randn(V, D), torch.randn(V)
    hidden = torch.randn(10, D)
    layers = build(n, lambda: ParallelLMHead(V, D, bias=bias))
    for layer in layers:
        load(layer.weight, E)
        if bias:
            load(layer.bias, b)
    full = F.linear(hidden, E, b if bias else None)  # (10, V)
    # prefill of 3 sequences (3, 5, 2 new tokens): logits for the last token of each only
    set_context(True, cu_seqlens_q=torch.tensor([0, 3, 8, 10], dtype=torch.int32))
    parts = [layer(hidden) for layer in layers]
    assert all(p.shape == (3, V // n) for p in parts)
    torch.testing.assert_close(torch.cat(parts, -1), full[[2, 7, 9]], **TOL)  # gather = concat over vocab
    # decode: one token per sequence, every row kept
    set_context(False)
    torch.testing.assert_close(torch.cat([layer(hidden[:4]) for layer in layers], -1), full[:4], **TOL)


def test_lm_head_unsharded_prefill():
    V, D = 16, 4
    E, hidden = torch.randn(V, D), torch.randn(7, D)
    head = ParallelLMHead(V, D)
    load(head.weight, E)
    set_context(True, cu_seqlens_q=torch.tensor([0, 7], dtype=torch.int32))
    torch.testing.assert_close(head(hidden), hidden[6:] @ E.T, **TOL)


def test_vocab_errors():
    with fake_tp(0, 3):
        with pytest.raises(ValueError, match="vocab size 32 is not divisible by the tensor-parallel size 3"):
            VocabParallelEmbedding(32, 4)
        with pytest.raises(ValueError, match="vocab size 32 is not divisible"):
            ParallelLMHead(32, 4)
    emb = VocabParallelEmbedding(32, 4)
    with pytest.raises(ValueError, match="expected vocab size 32"):
        load(emb.weight, torch.randn(16, 4))
    with pytest.raises(ValueError, match="does not match expected"):
        load(emb.weight, torch.randn(32, 3))


# ---------------------------------------------------------------------------------------------- real collectives

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert (get_tp_rank(), get_tp_size()) == (rank, world)
        g = torch.Generator().manual_seed(0)  # same full weights on every rank
        W_row, b_row, x = torch.randn(6, 8, generator=g), torch.randn(6, generator=g), torch.randn(3, 8, generator=g)
        E, hidden = torch.randn(16, 4, generator=g), torch.randn(5, 4, generator=g)
        ids = torch.tensor([0, 5, 9, 15])
        row = RowParallelLinear(8, 6, bias=True)
        load(row.weight, W_row); load(row.bias, b_row)
        torch.testing.assert_close(row(x.chunk(world, -1)[rank]), x @ W_row.T + b_row, **TOL)  # all_reduce
        emb = VocabParallelEmbedding(16, 4)
        load(emb.weight, E)
        torch.testing.assert_close(emb(ids), E[ids], rtol=0, atol=0)  # all_reduce
        head = ParallelLMHead(16, 4)
        load(head.weight, E)
        set_context(True, cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32))
        logits = head(hidden)  # gather to rank 0
        if rank == 0:
            torch.testing.assert_close(logits, hidden[[1, 4]] @ E.T, **TOL)
        else:
            assert logits is None
    finally:
        dist.destroy_process_group()


def test_real_collectives_gloo():
    mp = pytest.importorskip("torch.multiprocessing")
    mp.spawn(_gloo_worker, args=(2, _free_port()), nprocs=2, join=True)
