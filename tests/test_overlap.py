"""Overlap scheduling (chapter 08b) computes what the synchronous loop computes (issue 10, part 2).

On a tiny CPU checkpoint, greedy (and seeded) requests give the same tokens, finish reasons and logprobs with
`overlap_scheduling` on and off: random workloads with EOS, max_tokens, max_model_len, prefix-cache hits and
preemption (hypothesis), with the pool's invariants and the KV footprint bound checked after every step; a
failure injected into any phase of an overlapped step; aborts while a step is in flight; and two
tensor-parallel ranks (gloo), where rank 0 broadcasts the sampled ids the next step embeds."""
import pytest
from engine_checks import footprint_ok
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanovllm_lit.engine.block_manager import check_invariants
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.sequence import PENDING_TOKEN
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)

KW = dict(device="cpu", max_model_len=96, max_num_batched_tokens=192, kvcache_block_size=16)
_S = [(5 * i + 3) % 250 + 3 for i in range(64)]
MENU = [_S[:40], _S[:32] + [7], _S[:16] + [8, 9, 10], [9, 10, 11], [(7 * j) % 250 + 3 for j in range(31)],
        _S[:48], [4], _S[:15]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


def drive(llm, prompts, params, check=True):
    "add_request all, step to the end checking the pool after every step; -> [(ids, finish reason, logprobs)]."
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    seqs = {s.seq_id: s for s in llm.scheduler.waiting}
    for _ in range(5000):
        if llm.is_finished(): break
        llm.step()
        if check:
            check_invariants(llm.scheduler.block_manager, list(seqs.values()))
            footprint_ok(llm)
            for s in seqs.values():      # between steps at most the last token is pending
                assert s.num_pending <= 1 and PENDING_TOKEN not in s.completion_token_ids
    else: raise AssertionError("never finished")
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks) and llm._inflight is None
    return [(seqs[i].completion_token_ids, seqs[i].finish_reason, seqs[i].output_logprobs) for i in ids]


def both(ckpt, prompts, params, **kw):
    out = []
    for overlap in (False, True):
        with LLMEngine(ckpt, **{**KW, **kw}, overlap_scheduling=overlap) as llm: out.append(drive(llm, prompts, params))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, len(MENU) - 1), st.integers(1, 40)), min_size=1, max_size=7),
       num_blocks=st.integers(6, 40), max_num_seqs=st.integers(1, 5), eos=st.booleans(),
       max_model_len=st.sampled_from([64, 96]))
def test_overlap_equals_sync(ckpt, picks, num_blocks, max_num_seqs, eos, max_model_len):
    prompts = [MENU[k] for k, _ in picks]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=not eos) for _, m in picks]
    kw = dict(num_kvcache_blocks=num_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
              eos_token_ids={17, 101, 233} if eos else set())
    try: sync, over = both(ckpt, prompts, params, **kw)
    except ValueError as e:          # a request too big for this pool: refused the same way in both loops
        assert "KV-cache blocks" in str(e) or "max_model_len" in str(e)
        return
    assert sync == over


def test_seeds_logprobs_and_stop_tokens(ckpt):
    "Seeded sampling, filters, logprobs and stop_token_ids are per request: the overlapped loop gives the same."
    params = [SamplingParams(temperature=1.0, seed=7, max_tokens=25, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=30, stop_token_ids=[50, 60]),
              SamplingParams(temperature=0, max_tokens=20, logprobs=1)]
    sync, over = both(ckpt, MENU[:3], params, num_kvcache_blocks=40, max_num_seqs=4)
    assert sync == over and all(len(lp) == len(t) for t, _, lp in over[::2])


def test_abort_while_in_flight(ckpt):
    "An abort between steps drops the request's in-flight token and frees its blocks; the others are unaffected."
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=40, overlap_scheduling=True) as llm:
        ref = [o["token_ids"] for o in llm.generate(MENU[:3], sp, use_tqdm=False)]
        ids = [llm.add_request(p, sp) for p in MENU[:3]]
        got = {}
        for _ in range(4): got.update(llm.step()[0])
        victim = llm.scheduler.requests[ids[1]]
        assert victim.num_pending == 1 and llm._inflight is not None
        assert llm.abort_request(ids[1])
        assert victim.num_pending == 0 and not victim.block_table and victim.finish_reason == "abort"
        while not llm.is_finished(): got.update(llm.step()[0])
        assert ids[1] not in got and got[ids[0]] == ref[0] and got[ids[2]] == ref[2]
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == len(bm.blocks)


TARGETS = [("scheduler", "schedule"), ("scheduler", "resolve"), ("scheduler", "preempt"),
           ("block_manager", "allocate"), ("block_manager", "may_append"), ("block_manager", "deallocate"),
           ("block_manager", "hash_block"), ("model_runner", "run_async")]


@pytest.mark.parametrize("owner,name", TARGETS)
@pytest.mark.parametrize("when", ["before", "after"])
def test_failure_in_any_phase(ckpt, owner, name, when):
    "A failure at several calls of every phase: re-raised, pool consistent, and every request gets clean tokens."
    sp = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True)
    prompts = MENU[:4]
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=64, overlap_scheduling=False) as llm:
        clean = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    fired = 0
    for at_call in (1, 2, 4, 7):
        with LLMEngine(ckpt, **KW, num_kvcache_blocks=7, max_num_seqs=4, overlap_scheduling=True) as llm:
            obj = {"scheduler": llm.scheduler, "block_manager": llm.scheduler.block_manager,
                   "model_runner": llm.model_runner}[owner]
            real, calls = getattr(obj, name), []
            def wrapper(*a, **k):
                calls.append(1)
                if len(calls) != at_call: return real(*a, **k)
                if when == "after": real(*a, **k)
                raise KeyboardInterrupt(f"{name} call {at_call}")
            setattr(obj, name, wrapper)
            ids = [llm.add_request(p, sp) for p in prompts]
            seqs = list(llm.scheduler.requests.values())
            got, failures = {}, 0
            while not llm.is_finished():
                try: got.update(llm.step()[0])
                except KeyboardInterrupt: failures += 1
                check_invariants(llm.scheduler.block_manager, seqs)
            fired += failures
            assert failures <= 1 and [got[i] for i in ids] == clean, (name, at_call, when)
            bm = llm.scheduler.block_manager
            assert bm.num_free_blocks == len(bm.blocks)
    assert fired >= 1          # the failure really happened at least once for this phase


def test_tensor_parallel_overlap(ckpt):
    "Two ranks (gloo): rank 1 embeds the ids rank 0 broadcast; tokens equal the one-rank synchronous run."
    prompts = MENU[:5]
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, ignore_eos=True) for i in range(5)]
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=12, overlap_scheduling=False) as llm:
        ref = drive(llm, prompts, params)
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=12, tensor_parallel_size=2, overlap_scheduling=True) as llm:
        assert drive(llm, prompts, params) == ref
