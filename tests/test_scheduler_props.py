"""Scheduler + BlockManager under thousands of random workloads with a fake model step: random prompt lengths,
shared prefixes, random max_tokens and EOS, requests arriving mid-run, and a KV pool small enough to force
preemption. After every schedule() and postprocess() the BlockManager invariants hold (`check_invariants`) and
so do the scheduler's own (queues, budgets, statuses); every accepted sequence finishes within a bounded number
of steps, with exactly the tokens an unconstrained run produces; then every block is free. Bad requests get a
clear ValueError and the others still finish."""
import functools, json, math, os, pickle, random, tempfile
from collections import Counter, deque
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from transformers import Qwen3Config

from nanovllm_lit.config import Config
from nanovllm_lit.engine.block_manager import check_invariants
from nanovllm_lit.engine.scheduler import Scheduler
from nanovllm_lit.engine.sequence import Sequence, SequenceStatus
from nanovllm_lit.sampling_params import SamplingParams

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
EOS = frozenset({1, 2})
VOCAB = 40


@functools.lru_cache(maxsize=None)
def model_dir() -> str:
    d = tempfile.mkdtemp(prefix="nanovllm_lit_sched_")
    Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=512, eos_token_id=1).save_pretrained(d)
    with open(os.path.join(d, "generation_config.json"), "w") as f: json.dump({"eos_token_id": sorted(EOS)}, f)
    return d


@functools.lru_cache(maxsize=None)
def base_config() -> Config:
    return Config(model_dir(), device="cpu", max_model_len=512, max_num_batched_tokens=512, num_kvcache_blocks=8)


def make_config(**kw) -> Config:
    return replace(base_config(), **kw)          # re-runs __post_init__: all checks apply


def fake_model(seqs, is_prefill):
    "The next token is a fixed function of the sequence's tokens (so recompute after preemption is reproducible)."
    return [hash((tuple(s.token_ids), 12345)) % VOCAB for s in seqs]


def check_scheduler(sched, everyone):
    bm = sched.block_manager
    check_invariants(bm, everyone)
    waiting, running = list(sched.waiting), list(sched.running)
    assert not {id(s) for s in waiting} & {id(s) for s in running}, "a sequence in both queues"
    assert sched.waiting_ids == {s.seq_id for s in waiting} and len(sched.waiting_ids) == len(waiting)
    assert len(running) <= sched.max_num_seqs
    for s in waiting:
        assert s.status == SequenceStatus.WAITING and not s.block_table and s.num_cached_tokens == 0
    for s in running:
        assert s.status == SequenceStatus.RUNNING and s.block_table
    for s in everyone:
        if s.is_finished: assert not s.block_table and s.finish_reason in ("stop", "length")


def drive(sched, arrivals, everyone, stats):
    """Run to completion. `arrivals`: list of (step, seq) added when the clock reaches `step` (or at once when the
    scheduler idles). Checks everything after every step; returns the number of steps."""
    arrivals = sorted(arrivals, key=lambda a: a[0])
    step, i = 0, 0
    limit = sum(s.max_tokens for s in everyone)   # every step appends >= 1 token, never more than max_tokens
    while True:
        while i < len(arrivals) and (arrivals[i][0] <= step or sched.is_finished()):
            sched.add(arrivals[i][1]); i += 1
        if sched.is_finished(): break
        seqs, is_prefill = sched.schedule()
        assert seqs, "a step with nothing scheduled"
        check_scheduler(sched, everyone)
        for s in seqs:                     # what a tensor-parallel worker receives is enough to run the step
            w = pickle.loads(pickle.dumps(s))
            assert (len(w), w.num_cached_tokens, w.block_table, w.last_token) == \
                (len(s), s.num_cached_tokens, s.block_table, s.last_token)
            if is_prefill: assert w[w.num_cached_tokens:] == s[s.num_cached_tokens:]   # also after a preemption
        if is_prefill:
            assert sum(len(s) - s.num_cached_tokens for s in seqs) <= sched.max_num_batched_tokens
            assert all(s.num_cached_tokens < len(s) for s in seqs)
            stats["cached_tokens"] += sum(s.num_cached_tokens for s in seqs)
        else:
            assert all(len(s.block_table) == s.num_blocks for s in seqs)
        if sched.trace is not None and sched.trace[-1]["preempted"]: stats["preemptions"] += len(sched.trace[-1]["preempted"])
        sched.postprocess(seqs, fake_model(seqs, is_prefill))
        check_scheduler(sched, everyone)
        step += 1
        assert step <= limit, "no progress"
    assert sched.block_manager.num_free_blocks == len(sched.block_manager.blocks)
    assert not sched.block_manager.used_block_ids
    return step


PREFIXES = [[random.Random(k).randint(3, VOCAB - 1) for _ in range(80)] for k in range(3)]


@st.composite
def workloads(draw):
    "A config with a small pool, and 1-7 requests sized to fit it alone but not all together; a few bad ones."
    bs = draw(st.sampled_from([16, 16, 32]))
    num_blocks = draw(st.integers(2, 10))
    max_model_len = draw(st.sampled_from([48, 64, 100, 160]))
    cfg = dict(kvcache_block_size=bs, num_kvcache_blocks=num_blocks, max_model_len=max_model_len,
               max_num_batched_tokens=draw(st.integers(max_model_len, 2 * max_model_len)),
               max_num_seqs=draw(st.sampled_from([1, 2, 3, 4, 6, 8])))
    room = min(max_model_len, num_blocks * bs)          # the most KV tokens one sequence may ever hold
    reqs = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["ok"] * 30 + ["too_long", "huge", "empty"]))
        max_tokens = None
        if kind == "empty": prompt = []
        elif kind == "too_long": prompt = [5] * draw(st.integers(max_model_len + 1, max_model_len + 20))
        else:
            n = draw(st.integers(1, max(1, room // 3)) | st.integers(1, max(1, room - 1)))   # short prompts grow more
            pre = draw(st.sampled_from([None, 0, 1, 2]))
            cut = draw(st.sampled_from([bs, 2 * bs, n]))
            prompt = PREFIXES[pre][:min(cut, n)] if pre is not None else []
            prompt = prompt + [draw(st.integers(3, VOCAB - 1)) for _ in range(n - len(prompt))]
            if kind == "huge": max_tokens = num_blocks * bs + 1                     # can never fit the pool
            elif not draw(st.integers(0, 9)): max_tokens = max(1, room - n + 1)     # exactly at the boundary
            else: max_tokens = draw(st.integers(1, max(1, room - n + 1)) | st.integers(1, 48))
        if max_tokens is None: max_tokens = draw(st.integers(1, 48))
        reqs.append(dict(prompt=prompt, max_tokens=max_tokens, ignore_eos=draw(st.booleans()),
                         arrival=draw(st.sampled_from([0, 0, 0, 1, 3, 8]))))
    return cfg, reqs


@functools.lru_cache(maxsize=None)
def peak_blocks_alone(n, max_tokens, mml, bs):
    "Observed, not derived: the most blocks one request ever holds, run alone (EOS ignored) in a pool that never runs dry."
    sched = Scheduler(make_config(kvcache_block_size=bs, num_kvcache_blocks=4096, max_model_len=mml))
    seq = Sequence([3] * n, SamplingParams(max_tokens=max_tokens, ignore_eos=True), block_size=bs)
    sched.add(seq)
    peak = 0
    while not sched.is_finished():
        seqs, _ = sched.schedule()
        peak = max(peak, len(seq.block_table))
        sched.postprocess(seqs, [3] * len(seqs))
    return peak


def fits(cfg, req):
    "Would this request, alone, fit the pool? (Judged by running it, so the test does not repeat add's formula.)"
    n, mml, bs = len(req["prompt"]), cfg["max_model_len"], cfg["kvcache_block_size"]
    return 0 < n <= mml and peak_blocks_alone(n, req["max_tokens"], mml, bs) <= cfg["num_kvcache_blocks"]


def test_footprint_at_max_model_len():
    "A sequence stops on reaching max_model_len, so it never feeds more than max_model_len - 1 tokens after prefill."
    sched = Scheduler(make_config(kvcache_block_size=16, num_kvcache_blocks=2, max_model_len=33))
    seq = Sequence([5] * 10, SamplingParams(max_tokens=100, ignore_eos=True), block_size=16)
    sched.add(seq)                                   # peaks at 32 tokens = 2 blocks: accepted
    while not sched.is_finished():
        seqs, _ = sched.schedule()
        sched.postprocess(seqs, [5] * len(seqs))
    assert len(seq) == 33 and seq.finish_reason == "length"
    full = Sequence([5] * 33, SamplingParams(max_tokens=4), block_size=16)
    with pytest.raises(ValueError, match="never fit"): sched.add(full)   # a 33-token prompt needs 3 blocks


def test_footprint_stops_short_of_max_model_len():
    "max_model_len=65, 4 blocks of 16: a 60-token prompt with max_tokens=10 stops at 65 tokens, so KV for 64 fits."
    sched = Scheduler(make_config(kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=65,
                                  max_num_batched_tokens=65))
    seq = Sequence([5] * 60, SamplingParams(max_tokens=10, ignore_eos=True), block_size=16)
    sched.check(seq)
    assert sched.is_finished() and not sched.waiting_ids                 # check is side-effect free
    sched.add(seq)
    drive(sched, [], [seq], Counter())
    assert (len(seq), seq.finish_reason) == (65, "length")
    with pytest.raises(ValueError, match="needs 5 KV-cache blocks"):      # a 65-token prompt is prefilled whole
        sched.check(Sequence([5] * 65, SamplingParams(max_tokens=1), block_size=16))


def test_add_refuses_a_queued_sequence():
    sched = Scheduler(make_config(kvcache_block_size=16, num_kvcache_blocks=4, max_model_len=64))
    seq = Sequence([5] * 10, SamplingParams(max_tokens=4), block_size=16)
    sched.add(seq)
    with pytest.raises(ValueError, match="not a new sequence"): sched.add(seq)
    assert len(sched.waiting) == 1 and sched.waiting_ids == {seq.seq_id}


def run_workload(cfg_kw, reqs, stats, trace=True):
    cfg = make_config(**cfg_kw)
    sched = Scheduler(cfg)
    sched.trace = [] if trace else None
    arrivals, everyone = [], []
    for r in reqs:
        sp = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"])
        if not r["prompt"]:
            with pytest.raises(ValueError, match="empty"): Sequence(r["prompt"], sp, cfg.kvcache_block_size)
            stats["refused"] += 1
            continue
        seq = Sequence(r["prompt"], sp, cfg.kvcache_block_size)
        if fits(cfg_kw, r):
            arrivals.append((r["arrival"], seq)); everyone.append(seq)
        else:                                       # refused at the door, with a message saying why
            with pytest.raises(ValueError, match="max_model_len|never fit"): sched.add(seq)
            stats["refused"] += 1
    drive(sched, arrivals, everyone, stats)
    for s in everyone:
        assert s.is_finished and 1 <= s.num_completion_tokens <= s.max_tokens
        last = s.token_ids[-1]
        if s.finish_reason == "stop": assert last in EOS and not s.ignore_eos
        else: assert s.num_completion_tokens == s.max_tokens or len(s) >= cfg.max_model_len
        if not s.ignore_eos: assert not EOS & set(s.completion_token_ids[:-1])   # stopped at the first EOS
    return everyone


def reference_completions(cfg_kw, reqs):
    "The same accepted requests in a pool so big nothing is ever preempted."
    big = dict(cfg_kw, num_kvcache_blocks=400, max_num_seqs=64)
    stats = Counter()
    seqs = run_workload(big, [r for r in reqs if fits(cfg_kw, r)], stats)
    assert stats["preemptions"] == 0
    return [s.completion_token_ids for s in seqs]


def test_random_workloads():
    stats = Counter()

    @settings(max_examples=1200, **SETTINGS)
    @given(workloads())
    def one(w):
        cfg_kw, reqs = w
        s = Counter()
        seqs = run_workload(cfg_kw, reqs, s)
        stats["runs"] += 1
        stats["runs_with_preemption"] += s["preemptions"] > 0
        stats["runs_with_cache_hits"] += s["cached_tokens"] > 0
        stats["runs_with_refusals"] += s["refused"] > 0
        stats["seqs"] += len(seqs)
        if s["preemptions"]:                           # recompute must not change any output
            assert [q.completion_token_ids for q in seqs] == reference_completions(cfg_kw, reqs)

    one()
    print(dict(stats))
    assert stats["runs"] >= 1000
    assert stats["runs_with_preemption"] >= 0.2 * stats["runs"], stats
    assert stats["runs_with_cache_hits"] >= 0.1 * stats["runs"], stats
    assert stats["runs_with_refusals"] >= 0.1 * stats["runs"], stats


# ---------------------------------------------------------------- named cases
def test_bad_requests_are_refused_and_the_others_finish():
    cfg = make_config(num_kvcache_blocks=4, kvcache_block_size=16, max_model_len=128, max_num_batched_tokens=128)
    sched = Scheduler(cfg)
    good = [Sequence([7] * 10, SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(3)]
    sched.add(good[0])
    with pytest.raises(ValueError, match="max_model_len"): sched.add(Sequence([7] * 129))
    with pytest.raises(ValueError, match="never fit"): sched.add(Sequence([7] * 60, SamplingParams(max_tokens=6)))
    with pytest.raises(ValueError, match="block_size"): sched.add(Sequence([7] * 5, block_size=32))
    with pytest.raises(ValueError, match="empty"): Sequence([])
    for s in good[1:]: sched.add(s)
    drive(sched, [], good, Counter())
    assert all(s.is_finished and s.num_completion_tokens == 8 for s in good)


def test_footprint_boundary_is_exact():
    # 60 + 5 - 1 = 64 KV slots = 4 blocks of 16: accepted and runs; one more token would not fit
    cfg = make_config(num_kvcache_blocks=4, kvcache_block_size=16, max_model_len=128, max_num_batched_tokens=128)
    sched = Scheduler(cfg)
    s = Sequence([9] * 60, SamplingParams(max_tokens=5, ignore_eos=True))
    sched.add(s)
    drive(sched, [], [s], Counter())
    assert s.num_completion_tokens == 5
    with pytest.raises(ValueError, match="never fit"):
        Scheduler(cfg).add(Sequence([9] * 60, SamplingParams(max_tokens=6, ignore_eos=True)))
    # a prompt of exactly max_model_len is allowed and yields one token
    cfg = make_config(num_kvcache_blocks=4, kvcache_block_size=16, max_model_len=64, max_num_batched_tokens=64)
    sched = Scheduler(cfg)
    s = Sequence([9] * 64, SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add(s)
    drive(sched, [], [s], Counter())
    assert s.num_completion_tokens == 1 and s.finish_reason == "length"


def test_max_num_seqs_bounds_the_running_set():
    cfg = make_config(num_kvcache_blocks=64, max_num_seqs=3)
    sched = Scheduler(cfg)
    sched.trace = []
    seqs = [Sequence([5 + i] * 10, SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(7)]
    drive(sched, [(0, s) for s in seqs], seqs, Counter())
    assert max(len(t["block_tables"]) for t in sched.trace) == 3
    assert all(len(t["seq_ids"]) <= 3 for t in sched.trace)


def test_scheduler_needs_a_sized_pool():
    with pytest.raises(ValueError, match="num_kvcache_blocks"):
        Scheduler(make_config(num_kvcache_blocks=None))


def test_trace_is_off_by_default_and_records_each_step():
    sched = Scheduler(make_config(num_kvcache_blocks=5))
    assert sched.trace is None
    seqs = [Sequence([5 + i] * 20, SamplingParams(max_tokens=20, ignore_eos=True)) for i in range(2)]
    drive(sched, [(0, s) for s in seqs], seqs, Counter())        # runs fine untraced
    sched = Scheduler(make_config(num_kvcache_blocks=5))
    sched.trace = []
    seqs = [Sequence([5 + i] * 20, SamplingParams(max_tokens=20, ignore_eos=True)) for i in range(2)]
    steps = drive(sched, [(0, s) for s in seqs], seqs, Counter())
    assert [t["step"] for t in sched.trace] == list(range(steps))
    assert any(t["preempted"] for t in sched.trace)
    for t in sched.trace:
        assert set(t) >= {"step", "is_prefill", "seq_ids", "preempted", "num_free_blocks", "block_tables",
                          "ref_counts", "cached_blocks", "finished"}
        refs = Counter(b for table in t["block_tables"].values() for b in table)
        assert t["ref_counts"] == dict(refs)
        assert t["num_free_blocks"] + len(t["ref_counts"]) == 5
    assert sorted(sid for t in sched.trace for sid in t["finished"]) == sorted(s.seq_id for s in seqs)


class _NoScanDeque(deque):
    "A waiting queue that fails any membership test or scan: queueing must not look through the queue."
    def __contains__(self, item): raise AssertionError("Scheduler.add scanned the waiting queue (O(n) per add)")
    def __iter__(self): raise AssertionError("Scheduler.add iterated over the waiting queue (O(n) per add)")
    def index(self, *a): raise AssertionError("Scheduler.add searched the waiting queue (O(n) per add)")
    def count(self, *a): raise AssertionError("Scheduler.add searched the waiting queue (O(n) per add)")


def test_queueing_does_not_scan_the_queue():
    "add() is O(1): 2,000 requests never look through `waiting` (the duplicate check is a set of ids)."
    sched = Scheduler(make_config(num_kvcache_blocks=64))
    sched.waiting = _NoScanDeque()
    seqs = [Sequence([1, 2, 3, i % 200], SamplingParams(max_tokens=4), block_size=16) for i in range(2000)]
    for seq in seqs: sched.add(seq)
    assert len(sched.waiting) == 2000 and len(sched.waiting_ids) == 2000
    with pytest.raises(ValueError, match="not a new sequence"): sched.add(seqs[7])   # still refused, by id
