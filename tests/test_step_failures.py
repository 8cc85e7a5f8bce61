"""A failure anywhere in a step leaves the engine consistent (issue 9, part D).

An exception (KeyboardInterrupt, RuntimeError) is injected at one call inside `LLMEngine.step` — in
`Scheduler.schedule`, `BlockManager.allocate` / `may_append` / `deallocate`, `Scheduler.preempt`, the model run, or
`Scheduler.postprocess` — before or after that call did its work. The step re-raises the original exception,
and afterwards: no KV block is leaked, every unfinished request is in exactly one queue, and stepping on returns
every request exactly once, with the tokens of a clean run (greedy)."""
import pytest
import torch

from nanovllm_lit.engine.block_manager import check_invariants
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.sequence import SequenceStatus
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)

KW = dict(device="cpu", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=4, kvcache_block_size=16)
SP = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
TARGETS = ("schedule", "allocate", "may_append", "preempt", "deallocate", "run", "postprocess")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


def prompts():
    "Four prompts, two sharing two full blocks; each grows to 54-57 tokens (4 blocks): a pool of 9 must preempt."
    shared = [(5 * i + 3) % 250 + 3 for i in range(32)]
    return [shared + [40, 41], shared + [50], [(7 * j) % 250 + 3 for j in range(31)], [9, 10, 11]]


def target_of(llm, name):
    "The object whose method `name` the fault replaces (on the instance, so `del` restores the class's)."
    sched = llm.scheduler
    return {"schedule": sched, "preempt": sched, "postprocess": sched, "run": llm.model_runner}.get(
        name, sched.block_manager)


def inject(llm, name, at_call, when="before", exc=KeyboardInterrupt):
    """Make the `at_call`-th call of `name` (counted from now) raise a fresh `exc` once, before or after doing its
    work. Returns (state, restore): state["raised"] is the exception once it fired."""
    owner, state = target_of(llm, name), {"calls": 0, "raised": None}
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] != at_call or state["raised"] is not None: return real(*args, **kwargs)
        state["raised"] = e = exc(f"injected into {name} ({when} its work, call {at_call})")
        if when == "after": real(*args, **kwargs)
        raise e
    setattr(owner, name, wrapper)
    return state, lambda: delattr(owner, name)


def check_engine(llm, seqs):
    """Between steps: every block is free or held (ref counts = block-table entries), every unfinished request is in
    exactly one queue in a state the next step can run, and no hashed block holds a running sequence's last token
    (its KV is not written yet)."""
    sched, bm = llm.scheduler, llm.scheduler.block_manager
    check_invariants(bm, seqs)
    waiting, running = list(sched.waiting), list(sched.running)
    queued = [s.seq_id for s in waiting + running]
    assert len(queued) == len(set(queued)), "a sequence queued twice"
    assert sched.waiting_ids == {s.seq_id for s in waiting}
    for s in waiting: assert s.status == SequenceStatus.WAITING and not s.block_table, s
    for s in running:
        assert s.status == SequenceStatus.RUNNING and s.block_table and not s.needs_prefill, s
        last = (len(s) - 1) // bm.block_size
        if last < len(s.block_table): assert bm.blocks[s.block_table[last]].hash is None, s
    for s in seqs:
        if s.is_finished: assert not s.block_table and s.seq_id not in queued, s
        else: assert s.seq_id in queued, f"seq {s.seq_id} is unfinished but in no queue: lost"


def drain(llm, seqs, max_steps=2000):
    "Step until the engine is finished, checking after every step; -> {seq_id: tokens} (each id returned once)."
    got = {}
    for _ in range(max_steps):
        if llm.is_finished(): break
        outs, _ = llm.step()
        for sid, toks in outs:
            assert sid not in got, f"seq {sid} returned twice"
            got[sid] = toks
        check_engine(llm, seqs)
    else: raise AssertionError("the engine never finished")
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks) and not bm.used_block_ids, "blocks leaked"
    return got


@pytest.fixture(scope="module")
def reference(ckpt):
    "Greedy tokens of a clean run (a roomy pool: no preemption)."
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=64) as llm:
        return [o["token_ids"] for o in llm.generate(prompts(), SP, use_tqdm=False)]


def add_all(llm, ps=None, sp=SP):
    ids, seqs = [], []
    for p in ps or prompts():
        ids.append(llm.add_request(p, sp))
        seqs.append(llm.scheduler.waiting[-1])
    return ids, seqs


# ---- the two cases of the issue ---------------------------------------------------------------------------
def test_interrupt_in_may_append_during_schedule(ckpt, reference):
    "The decode step's only sequence was popped from `running` when may_append raised: it must not be lost."
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=16) as llm:
        (sid,), seqs = add_all(llm, prompts()[2:3])
        llm.step()                                      # prefill
        state, restore = inject(llm, "may_append", 1)
        with pytest.raises(KeyboardInterrupt) as e: llm.step()
        restore()
        assert e.value is state["raised"]               # the original exception, re-raised
        assert not llm.is_finished()                    # the request is still pending...
        check_engine(llm, seqs)                         # ... in a queue, holding no leaked block
        assert drain(llm, seqs) == {sid: reference[2]}


def test_interrupt_in_postprocess_after_the_run(ckpt, reference):
    "postprocess appended some tokens and freed a finished sequence's blocks, then raised: nothing lost or leaked."
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=32) as llm:
        short = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)    # finishes in its prefill step
        ids, seqs = add_all(llm, prompts()[2:], short)
        state, restore = inject(llm, "postprocess", 1, "after")
        with pytest.raises(KeyboardInterrupt) as e: llm.step()
        restore()
        assert e.value is state["raised"] and all(s.is_finished for s in seqs)
        assert not llm.is_finished()                    # their results have not been returned yet
        check_engine(llm, seqs)
        got = drain(llm, seqs)                          # the next step returns them
        assert got == {ids[0]: reference[2][:1], ids[1]: reference[3][:1]}


# ---- every phase, before and after its work, at several calls ------------------------------------------------
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("name", TARGETS)
@pytest.mark.parametrize("at_call", [1, 2, 3, 6])   # a clean run preempts twice, allocates 6 times
def test_failure_at_any_call_of_a_step(ckpt, reference, name, when, at_call):
    exc = KeyboardInterrupt if at_call % 2 else RuntimeError
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=9) as llm:   # small: preemption happens
        ids, seqs = add_all(llm)
        state, restore = inject(llm, name, at_call, when, exc)
        got = {}
        while state["raised"] is None and not llm.is_finished():
            try: outs, _ = llm.step()
            except exc as e:
                assert e is state["raised"]
                break
            got.update(outs)
            check_engine(llm, seqs)
        restore()
        check_engine(llm, seqs)
        rest = drain(llm, seqs)
        assert not set(rest) & set(got), "a request returned twice"
        got.update(rest)
    assert state["raised"] is not None or (name == "preempt" and at_call > 2), "the fault never fired"
    assert [got[i] for i in ids] == reference


def test_repeated_failures_then_success(ckpt, reference):
    "A fault on every third run call, for the whole workload: it still ends with the clean tokens."
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=9) as llm:
        ids, seqs = add_all(llm)
        real, calls = llm.model_runner.run, []
        def run(*args):
            calls.append(1)
            if len(calls) % 3 == 0: raise RuntimeError("flaky device")
            return real(*args)
        llm.model_runner.run = run
        got, failures = {}, 0
        while not llm.is_finished():
            try: got.update(llm.step()[0])
            except RuntimeError: failures += 1
            check_engine(llm, seqs)
        del llm.model_runner.run
        bm = llm.scheduler.block_manager
        assert failures > 5 and bm.num_free_blocks == len(bm.blocks)
    assert [got[i] for i in ids] == reference


def test_failed_prefill_never_serves_unwritten_kv_from_the_cache(ckpt, reference):
    "The prefill that hashed the shared blocks fails: the retry must not hit them (their KV was never written)."
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=32) as llm:
        ids, seqs = add_all(llm, prompts()[:2])
        state, restore = inject(llm, "run", 1)
        with pytest.raises(KeyboardInterrupt): llm.step()
        restore()
        bm = llm.scheduler.block_manager
        assert not bm.hash_to_block_id                  # every hash of that step is forgotten
        outs, num_tokens = llm.step()
        assert sorted(s.num_cached_tokens for s in seqs) == [0, 32] and num_tokens == 35   # one recomputed whole
        assert drain(llm, seqs) | dict(outs) == {ids[0]: reference[0], ids[1]: reference[1]}
