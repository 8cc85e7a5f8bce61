"""Pure-function tests of `nanovllm_lit.viz`: records, block grid, block-table hit flags, hit rate, recorder on/off."""
from collections import deque
from types import SimpleNamespace
import pytest

from nanovllm_lit.viz import (BlockCell, BlockGridView, BlockTableView, HitPoint, TracePlayer, TraceRecorder,
                              block_grid, fake_model_step, hit_rate, seq_tables, snapshot)
from nanovllm_lit.engine.block_manager import BlockManager
from nanovllm_lit.engine.sequence import Sequence, SequenceStatus


def handmade_state():
    """A 6-block pool (block size 4) set up by hand, no allocate():
    seq A (10 tokens) holds [2, 0, 5]; seq B (9 tokens) shares 2, 0 (prefix-cache hits) and owns 3;
    block 1 is free but still indexed (cached); block 4 is free and empty; block 5 and 3 are partial."""
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = Sequence(list(range(10)), block_size=4), Sequence(list(range(8)) + [99], block_size=4)
    a.block_table, b.block_table = [2, 0, 5], [2, 0, 3]
    b.num_cached_tokens = 8
    for s in (a, b): s.status = SequenceStatus.RUNNING
    for bid, rc in {2: 2, 0: 2, 5: 1, 3: 1}.items(): bm.blocks[bid].ref_count = rc
    for bid, (h, toks) in {2: (11, [0, 1, 2, 3]), 0: (12, [4, 5, 6, 7]), 1: (13, [7, 7, 7, 7])}.items():
        bm.blocks[bid].update(h, toks)
        bm.hash_to_block_id[h] = bid
    bm.used_block_ids = {0, 2, 3, 5}
    bm.free_block_ids = deque([1, 4])
    return bm, a, b


def test_snapshot_of_handmade_block_manager():
    bm, a, b = handmade_state()
    rec = snapshot(bm, seqs=[a, b], step=3, is_prefill=True, seq_ids=[b.seq_id])
    assert rec["block_tables"] == {a.seq_id: [2, 0, 5], b.seq_id: [2, 0, 3]}
    assert rec["ref_counts"] == {0: 2, 2: 2, 3: 1, 5: 1}
    assert rec["cached_blocks"] == {a.seq_id: 0, b.seq_id: 2}
    assert rec["num_free_blocks"] == 2 and rec["num_blocks"] == 6 and rec["block_size"] == 4
    assert rec["seq_lens"] == {a.seq_id: 10, b.seq_id: 9}
    assert rec["status"] == {a.seq_id: "running", b.seq_id: "running"}
    assert rec["hashed"] == [0, 1, 2] and rec["indexed"] == [0, 1, 2]
    assert rec["step"] == 3 and rec["is_prefill"] is True and rec["seq_ids"] == [b.seq_id]
    # the record is a copy: later changes to the live state do not leak into it
    a.block_table.append(4)
    assert rec["block_tables"][a.seq_id] == [2, 0, 5]


def test_block_grid_states_owners_refcounts_fill():
    bm, a, b = handmade_state()
    g = block_grid(snapshot(bm, seqs=[a, b]))
    assert [c.state for c in g] == ["used", "cached", "used", "used", "free", "used"]
    assert g[0] == BlockCell(0, "used", (a.seq_id, b.seq_id), 2, 4, True)
    assert g[5] == BlockCell(5, "used", (a.seq_id,), 1, 2, False)      # 10 tokens: last block holds 2
    assert g[3].fill == 1 and g[1].owners == () and g[1].fill is None and g[4].hashed is False
    assert all(c.ref_count == len(c.owners) for c in g)


def test_stale_hash_is_not_cached():
    "A free block whose hash entry points elsewhere cannot be hit: it shows as plain free."
    bm, a, b = handmade_state()
    bm.hash_to_block_id[13] = 4          # the index moved on: block 1's hash is stale
    g = block_grid(snapshot(bm, seqs=[a, b]))
    assert g[1].state == "free" and g[1].hashed


def test_hit_flags():
    bm, a, b = handmade_state()
    t = seq_tables(snapshot(bm, seqs=[a, b]))
    assert [(e.block_id, e.hit, e.shared, e.fill) for e in t[b.seq_id]] == [(2, True, True, 4), (0, True, True, 4),
                                                                             (3, False, False, 1)]
    assert not any(e.hit for e in t[a.seq_id])


def test_hit_flags_after_real_allocate():
    bm = BlockManager(num_blocks=8, block_size=16)
    system = list(range(100, 132))
    a, b = Sequence(system + [1, 2, 3]), Sequence(system + [7, 8])
    for s in (a, b): bm.allocate(s)
    t = seq_tables(snapshot(bm, seqs=[a, b]))
    assert [e.hit for e in t[a.seq_id]] == [False, False, False]
    assert [e.hit for e in t[b.seq_id]] == [True, True, False]
    # freed, still cached: then re-hit
    bm.deallocate(a); bm.deallocate(b)
    assert [c.state for c in block_grid(snapshot(bm))][:4] == ["cached", "cached", "free", "free"]
    c = Sequence(system + [5])
    bm.allocate(c)
    assert seq_tables(snapshot(bm, seqs=[c]))[c.seq_id][0].hit


def rec(step, is_prefill, seq_ids, cached, lens, bs=4):
    tables = {s: list(range(-(-lens[s] // bs))) for s in lens}
    return {"step": step, "is_prefill": is_prefill, "seq_ids": seq_ids, "preempted": [], "num_free_blocks": 0,
            "block_tables": tables, "ref_counts": {}, "cached_blocks": cached, "block_size": bs, "seq_lens": lens}


def test_hit_rate_tokens_and_cumulative():
    trace = [rec(0, True, [0], {0: 0}, {0: 10}),
             rec(1, True, [1, 2], {1: 2, 2: 1}, {0: 11, 1: 9, 2: 6}),
             rec(2, False, [0, 1, 2], {0: 0, 1: 2, 2: 1}, {0: 12, 1: 10, 2: 7})]
    hr = hit_rate(trace)
    assert hr[0] == HitPoint(0, True, 0, 10, 0.0)
    assert hr[1] == HitPoint(1, True, 12, 15, 12 / 25)
    assert hr[2] == HitPoint(2, False, 0, 0, 12 / 25)                   # decode steps do not dilute the rate
    assert hit_rate([]) == [] and hit_rate([rec(0, False, [0], {0: 0}, {0: 3})])[0].rate == 0.0


def test_hit_rate_builtin_trace_counts_blocks():
    r = rec(0, True, [0, 1], {0: 0, 1: 2}, {0: 10, 1: 9})
    for k in ("block_size", "seq_lens"): del r[k]
    assert hit_rate([r])[0] == HitPoint(0, True, 2, 6, 2 / 6)


class FakeScheduler:
    "Minimal stand-in with the Scheduler's shape: one seq per step, preempts seq 1 at step 1."
    def __init__(self):
        self.block_manager = BlockManager(num_blocks=4, block_size=4)
        self.s0, self.s1 = Sequence([1, 2, 3], block_size=4), Sequence([4, 5, 6], block_size=4)
        self.running, self.waiting, self.n = deque(), deque([self.s0, self.s1]), 0
    def schedule(self):
        self.n += 1
        if self.n == 1:
            for s in (self.s0, self.s1): self.block_manager.allocate(s)
            self.running.extend(self.waiting); self.waiting.clear()
            return [self.s0, self.s1], True
        if self.n == 2:
            s = self.running.pop(); self.block_manager.deallocate(s); self.waiting.appendleft(s)
            return [self.s0], False
        return [], False
    def postprocess(self, seqs, token_ids):
        for s, t in zip(seqs, token_ids): s.append_token(t)


def test_recorder_off_by_default_and_restores():
    sched = FakeScheduler()
    rec_ = TraceRecorder(sched)
    assert not rec_.active and "schedule" not in vars(sched)          # not started: nothing wrapped, zero cost
    assert sched.schedule.__func__ is FakeScheduler.schedule
    with rec_:
        assert "schedule" in vars(sched)
        fake_model_step(sched); fake_model_step(sched)
    assert "schedule" not in vars(sched) and sched.schedule.__func__ is FakeScheduler.schedule
    fake_model_step(sched)                                               # not recorded
    assert len(rec_) == 2 and [f["step"] for f in rec_] == [0, 1]
    assert rec_[0]["is_prefill"] and rec_[0]["seq_ids"] == [sched.s0.seq_id, sched.s1.seq_id]
    assert rec_[1]["preempted"] == [sched.s1.seq_id] and rec_[1]["block_tables"][sched.s1.seq_id] == []


def test_recorder_refuses_to_stack_and_takes_an_engine():
    sched = FakeScheduler()
    engine = SimpleNamespace(scheduler=sched)
    with TraceRecorder(engine) as r:
        assert r.scheduler is sched
        with pytest.raises(RuntimeError, match="already wrapped"): TraceRecorder(sched).start()
    assert "schedule" not in vars(sched)


def test_recorder_max_frames():
    sched = FakeScheduler()
    with TraceRecorder(sched, max_frames=1) as r:
        for _ in range(3): fake_model_step(sched)
    assert len(r) == 1


def test_views_and_player():
    bm, a, b = handmade_state()
    r0 = snapshot(bm, seqs=[a, b], is_prefill=True, seq_ids=[a.seq_id, b.seq_id])
    h = BlockGridView(r0).to_html()
    assert h == BlockGridView(r0)._repr_html_()
    assert h.count('class="nvl-block') == 6 and h.count("nvl-used") == 4 and h.count("nvl-cached") == 1
    assert "×2" in h
    t = BlockTableView(r0).to_html()
    assert t.count("nvl-hit") == 2 and t.count("nvl-computed") == 4
    a.append_token(7)
    r1 = {**snapshot(bm, seqs=[a, b], step=1, is_prefill=False, seq_ids=[a.seq_id, b.seq_id])}
    p = TracePlayer([r0, r1])
    g0 = p.grid.value
    p.step_button.click()
    assert p.slider.value == 1 and p.grid.value != g0
    p.step_button.click()
    assert p.slider.value == 1                                           # clipped at the end
    p.back.click()
    assert p.grid.value == g0
    bundle = p._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "nvl-grid" in bundle["text/html"]
    with pytest.raises(ValueError, match="non-empty"): TracePlayer([])


def test_snapshot_of_sequences_only():
    bm = BlockManager(num_blocks=8, block_size=16)
    system = list(range(100, 132))
    a, b = Sequence(system + [1]), Sequence(system + [2, 3])
    for s in (a, b): bm.allocate(s)
    r = snapshot([a, b])
    assert r["ref_counts"] == snapshot(bm, seqs=[a, b])["ref_counts"] and r["num_free_blocks"] is None
    assert snapshot(b)["cached_blocks"] == {b.seq_id: 2}
    assert "nvl-hit" in BlockTableView(b).to_html() and BlockGridView(a).cells[0].owners == (a.seq_id,)


def real_scheduler(num_blocks):
    import json, os, tempfile
    from nanovllm_lit.config import Config
    from nanovllm_lit.engine.scheduler import Scheduler
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3", "max_position_embeddings": 1024, "eos_token_id": 1}, f)
    return Scheduler(Config(d, device="cpu", kvcache_block_size=16, num_kvcache_blocks=num_blocks, max_model_len=1024))


def test_recorder_on_real_scheduler_matches_builtin_trace():
    from nanovllm_lit.sampling_params import SamplingParams
    sched = real_scheduler(10)
    assert sched.trace is None                                           # built-in trace: off by default too
    sched.trace = []
    seqs = [Sequence([200 + 50 * i + j for j in range(40)], SamplingParams(max_tokens=n)) for i, n in
            enumerate((12, 24, 24))]
    for s in seqs: sched.add(s)
    with TraceRecorder(sched) as rec_:
        while not sched.is_finished(): fake_model_step(sched)
    assert len(rec_) == len(sched.trace)
    for mine, builtin in zip(rec_, sched.trace):
        for k in ("is_prefill", "seq_ids", "preempted", "num_free_blocks", "ref_counts"):
            assert mine[k] == builtin[k], k
        for sid, table in builtin["block_tables"].items():
            assert mine["block_tables"][sid] == table and mine["cached_blocks"][sid] == builtin["cached_blocks"][sid]
    pre = [(r["step"], sid) for r in rec_ for sid in r["preempted"]]
    assert pre and pre[0][1] == seqs[2].seq_id
    retake = next(r for r in rec_.frames[pre[0][0] + 1:] if r["is_prefill"])
    assert retake["cached_blocks"][seqs[2].seq_id] == 2                  # the victim re-takes its cached blocks
    # the built-in trace drives the same views (counted in blocks, no hash state)
    p = TracePlayer(sched.trace)
    assert "nvl-grid" in p.grid.value and hit_rate(sched.trace)[-1].rate > 0
