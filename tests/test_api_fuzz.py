"""The engine's public API under random use, and misuse refused clearly (issue 9, part D).

The fuzz test drives an `LLMEngine` on a tiny CPU checkpoint with a KV pool small enough to preempt: random
mixes of good requests, bad ones (too long, empty, bad token ids, too big for the pool, sampling params as a
dict), `abort_request`s, `step`s and `generate`s, with an exception (KeyboardInterrupt or RuntimeError) injected
at a random call of a random phase — `Scheduler.schedule` / `preempt` / `postprocess`, `BlockManager.allocate` /
`may_append` / `deallocate`, `ModelRunner.run` — before or after that call's work. After every operation the
pool and the queues are consistent; at the end every accepted request ended exactly once: returned with the
greedy tokens of a clean run, or aborted.

Named tests: `abort_request`, calls after `exit()`, one engine from two threads, and bad prompt containers."""
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.sequence import SequenceStatus
from nanovllm_lit.llm import LLM
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3
from test_step_failures import KW, TARGETS, check_engine, inject

torch.set_num_threads(1)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "tiny-qwen3"
_S = [(5 * i + 3) % 250 + 3 for i in range(64)]
MENU = [_S[:40], _S[:32] + [7], _S[:16] + [8, 9, 10], [9, 10, 11], [(7 * j) % 250 + 3 for j in range(31)], _S[:48]]
MAX_TOKENS = (1, 3, 8, 20)
BAD = [  # (prompt, sampling params, error, words in the message); every pool below holds at most 7 blocks of 16
    ([5] * 129, None, ValueError, "max_model_len"),
    ([], None, ValueError, "the prompt is empty"),
    ([5, 256], None, ValueError, "ints in [0, 256)"),
    ([5, -1], None, ValueError, "ints in [0, 256)"),
    ([5, True], None, ValueError, "ints in [0, 256)"),
    ([5, 2.5], None, ValueError, "ints in [0, 256)"),
    ("text", None, ValueError, "no tokenizer"),
    ([5] * 100, SamplingParams(max_tokens=20), ValueError, "KV-cache blocks"),
    ([5, 6], {"temperature": 0}, TypeError, "SamplingParams(**your_dict)"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def clean(ckpt):
    "{(menu index, ignore_eos): greedy tokens of a clean run, max_tokens=20}; shorter runs are prefixes."
    ref = {}
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=64) as llm:
        for ignore_eos in (False, True):
            sp = SamplingParams(temperature=0, max_tokens=max(MAX_TOKENS), ignore_eos=ignore_eos)
            for k, out in enumerate(llm.generate(MENU, sp, use_tqdm=False)): ref[k, ignore_eos] = out["token_ids"]
    return ref


faults = st.none() | st.tuples(st.sampled_from(TARGETS), st.sampled_from([1, 1, 2, 4]), st.sampled_from(["before", "after"]),
                               st.sampled_from([KeyboardInterrupt, RuntimeError]))
KINDS = ["add"] * 3 + ["step"] * 4 + ["bad", "abort", "generate"]     # weights: mostly queueing and stepping


@st.composite
def ops(draw):
    "One operation on the engine: a tuple whose first item says which."
    kind = draw(st.sampled_from(KINDS))
    if kind == "add":
        return kind, draw(st.integers(0, len(MENU) - 1)), draw(st.sampled_from(MAX_TOKENS)), draw(st.booleans())
    if kind == "bad": return kind, draw(st.integers(0, len(BAD) - 1))
    if kind == "abort": return kind, draw(st.integers(0, 30))
    if kind == "step": return kind, draw(faults)
    return kind, draw(st.lists(st.integers(0, len(MENU) - 1), min_size=1, max_size=3)), draw(faults)


class Ledger:
    "What the test knows: every accepted request, and how each ended (returned with tokens, or aborted)."
    def __init__(self, llm, clean):
        self.llm, self.clean = llm, clean
        self.seqs, self.expected, self.returned, self.aborted = {}, {}, {}, set()

    def accept(self, sid, k, max_tokens, ignore_eos):
        self.seqs[sid] = self.llm.scheduler.requests[sid]
        self.expected[sid] = self.clean[k, ignore_eos][:max_tokens]

    def got(self, pairs):
        for sid, toks in pairs:
            assert sid in self.seqs, f"seq {sid} returned, but nobody here queued it"
            assert sid not in self.returned and sid not in self.aborted, f"seq {sid} ended twice"
            self.returned[sid] = toks

    def check(self):
        "After every operation: pool and queues consistent, and the queues hold exactly the pending requests."
        llm = self.llm
        self.got(llm.outputs.items()); llm.outputs.clear()
        check_engine(llm, list(self.seqs.values()))
        sched = llm.scheduler
        assert set(sched.requests) == {s.seq_id for s in list(sched.waiting) + list(sched.running)}
        assert set(sched.requests) <= set(self.seqs), "a request of a failed generate() was left behind"


FIRED = Counter()   # (target, before/after) -> faults that fired, over the whole fuzz run


def with_fault(llm, fault, call):
    "Run `call()` with `fault` armed; -> (result, None) or (None, the injected exception it raised)."
    state, restore = inject(llm, *fault[:2], when=fault[2], exc=fault[3]) if fault else ({"raised": None}, None)
    try: return call(), None
    except (KeyboardInterrupt, RuntimeError) as e:
        assert e is state["raised"], f"not the injected exception: {e!r}"
        FIRED[fault[0], fault[2]] += 1
        return None, e
    finally:
        if restore: restore()


def play(llm, clean, program):
    book = Ledger(llm, clean)
    for op in program:
        kind = op[0]
        if kind == "add":
            _, k, m, ignore_eos = op
            sid = llm.add_request(MENU[k], SamplingParams(temperature=0, max_tokens=m, ignore_eos=ignore_eos))
            book.accept(sid, k, m, ignore_eos)
        elif kind == "bad":
            prompt, sp, exc, words = BAD[op[1]]
            before = len(llm.scheduler.requests)
            with pytest.raises(exc) as e: llm.add_request(prompt, sp)
            assert words in str(e.value) and len(llm.scheduler.requests) == before
        elif kind == "abort":
            ids = sorted(book.seqs)
            sid = ids[op[1] % len(ids)] if ids and op[1] < 25 else 10**9 + op[1]   # mostly known ids, some never issued
            ended = sid in book.returned or sid in book.aborted
            if llm.abort_request(sid):
                assert sid in book.seqs and not ended and book.seqs[sid].finish_reason == "abort"
                book.aborted.add(sid)
            else:   # never issued, ended, or finished in a failed step and not returned yet
                assert sid not in book.seqs or ended or book.seqs[sid].is_finished
        elif kind == "step":
            out, _ = with_fault(llm, op[1], llm.step)
            if out is not None: book.got(out[0])
        else:
            _, ks, fault = op
            sp = SamplingParams(temperature=0, max_tokens=8)
            out, err = with_fault(llm, fault, lambda: llm.generate([MENU[k] for k in ks], sp, use_tqdm=False))
            if err is None: assert [o["token_ids"] for o in out] == [clean[k, False][:8] for k in ks]
        book.check()
    for _ in range(3000):                                          # no more faults: serve everything
        if llm.is_finished(): break
        book.got(llm.step()[0]); book.check()
    assert llm.is_finished()
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks) and not bm.used_block_ids and not llm.scheduler.requests
    assert set(book.returned) | book.aborted == set(book.seqs) and not set(book.returned) & book.aborted
    for sid, toks in book.returned.items():
        assert toks == book.expected[sid], f"seq {sid}: {toks} != clean {book.expected[sid]}"
        assert book.seqs[sid].finish_reason in ("stop", "length")
    return book


def test_fuzz_public_api(ckpt, clean):
    stats = {"examples": 0, "faults_fired": 0, "aborted": 0, "returned": 0, "preemptions": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(num_blocks=st.sampled_from([5, 6, 7]), program=st.lists(ops(), min_size=8, max_size=40))
    def one(num_blocks, program):
        with LLMEngine(ckpt, **KW, num_kvcache_blocks=num_blocks) as llm:
            torch.manual_seed(num_blocks)
            llm.model_runner.kv_cache.normal_(0, 10)            # KV never written is garbage, not zeros: a hit on it shows
            llm.scheduler.trace, fired = [], []                   # the trace lists each step's preemptions
            real_rollback = llm.scheduler.rollback
            def rollback(): fired.append(1); return real_rollback()
            llm.scheduler.rollback = rollback
            book = play(llm, clean, program)
        stats["examples"] += 1
        stats["preemptions"] += sum(len(t["preempted"]) for t in llm.scheduler.trace)
        stats["faults_fired"] += len(fired)
        stats["aborted"] += len(book.aborted)
        stats["returned"] += len(book.returned)

    FIRED.clear()
    one()
    print(stats, dict(FIRED))
    assert stats["faults_fired"] >= 100 and stats["aborted"] >= 30 and stats["preemptions"] >= 20, stats
    # every phase failed at least once (preempt, rarely called, maybe not; test_step_failures.py injects a fault
    # into each phase, before and after its work, at several calls)
    assert {t for t, _ in FIRED} >= set(TARGETS) - {"preempt"}, FIRED


# ---- abort_request ----------------------------------------------------------------------------------------
def test_abort_request_by_id(ckpt, clean):
    sp = SamplingParams(temperature=0, max_tokens=8)
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=16) as llm:
        bm, sched = llm.scheduler.block_manager, llm.scheduler
        a, b = llm.add_request(MENU[0], sp), llm.add_request(MENU[3], sp)
        llm.step()                                               # both prefilled: running, holding blocks
        c = llm.add_request(MENU[4], sp)                         # waiting
        seq_a, seq_c = sched.running[0], sched.waiting[0]
        assert llm.abort_request(a) is True                      # a running request
        assert (seq_a.finish_reason, seq_a.status, seq_a.block_table) == ("abort", SequenceStatus.FINISHED, [])
        assert llm.abort_request(c) is True                      # a waiting one
        assert seq_c.finish_reason == "abort" and not sched.waiting and c not in sched.waiting_ids
        assert [s.seq_id for s in sched.running] == [b] and set(sched.requests) == {b}
        assert llm.abort_request(a) is False                     # twice: nothing to do
        assert llm.abort_request(10**9) is False                 # never issued
        with pytest.raises(TypeError, match="the int that add_request returned"): llm.abort_request([b])
        with pytest.raises(TypeError, match="the int that add_request returned"): llm.abort_request(seq_a)
        done = {}
        while not llm.is_finished(): done.update(llm.step()[0])
        assert done == {b: clean[3, False][:8]}                  # the others did not notice
        assert llm.abort_request(b) is False                     # finished: its result stands
        assert bm.num_free_blocks == len(bm.blocks)


# ---- after exit() -----------------------------------------------------------------------------------------
def test_calls_after_exit_are_refused(ckpt):
    llm = LLMEngine(ckpt, **KW, num_kvcache_blocks=8)
    llm.exit()
    for call in (lambda: llm.add_request([1, 2, 3]), lambda: llm.generate([[1, 2, 3]], use_tqdm=False), llm.step,
                 lambda: llm.abort_request(0)):
        with pytest.raises(RuntimeError, match="the engine has exited"): call()
    assert llm.is_finished() and not llm.scheduler.waiting       # nothing was queued
    llm.exit()                                                   # a second exit does nothing
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=8) as other: pass
    with pytest.raises(RuntimeError, match="create a new engine"): other.add_request([1])


# ---- one engine, two threads ------------------------------------------------------------------------------
def test_one_engine_from_two_threads_is_refused(ckpt, clean):
    sp = SamplingParams(temperature=0, max_tokens=8)
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=32) as llm:
        real_run, inside, release = llm.model_runner.run, threading.Event(), threading.Event()
        def slow_run(*args):
            inside.set()
            assert release.wait(30)
            return real_run(*args)
        llm.model_runner.run = slow_run
        result, errors = {}, []
        def thread_a():
            try: result["a"] = llm.generate(MENU[:3], sp, use_tqdm=False)
            except BaseException as e: errors.append(e)
        a = threading.Thread(target=thread_a)
        a.start()
        assert inside.wait(30)                                  # thread A is inside its first step
        refused = []
        for call in (llm.step, lambda: llm.add_request([1, 2, 3], sp), lambda: llm.generate([[1, 2]], sp),
                     lambda: llm.abort_request(0)):
            with pytest.raises(RuntimeError, match="in another thread; use one engine per thread") as e: call()
            refused.append(str(e.value))
        release.set(); a.join(30)
        del llm.model_runner.run
        assert not a.is_alive() and not errors
        assert [o["token_ids"] for o in result["a"]] == [clean[k, False][:8] for k in range(3)]
        assert llm.is_finished() and llm.outputs == {}          # no request of thread B slipped in
        assert refused[0].startswith("step() refused")
        # and once A is done, this thread may use the engine
        assert llm.generate([MENU[3]], sp, use_tqdm=False)[0]["token_ids"] == clean[3, False][:8]


# ---- bad prompt containers and sampling params -------------------------------------------------------------
def test_bad_containers_get_clear_errors(ckpt, clean):
    sp = SamplingParams(temperature=0, max_tokens=8)
    with LLMEngine(ckpt, **KW, num_kvcache_blocks=16) as llm:
        cases = [(lambda: llm.generate(None), TypeError, "got None"),
                 (lambda: llm.generate({"q1": MENU[0]}), TypeError, "prompts is a dict"),
                 (lambda: llm.generate({(1, 2), (3, 4)}), TypeError, "prompts is a set"),
                 (lambda: llm.generate(frozenset({(1, 2)})), TypeError, "prompts is a frozenset"),
                 (lambda: llm.generate(42), TypeError, "got int"),
                 (lambda: llm.generate([MENU[0]], {"temperature": 0}), TypeError, "pass SamplingParams(**your_dict)"),
                 (lambda: llm.generate([MENU[0]], [{"temperature": 0}]), TypeError, "prompt 0: sampling_params"),
                 (lambda: llm.add_request(MENU[0], {"temperature": 0}), TypeError, "pass SamplingParams(**your_dict)"),
                 (lambda: llm.generate([MENU[0]], 0.5), TypeError, "got float")]
        for call, exc, words in cases:
            with pytest.raises(exc) as e: call()
            assert words in str(e.value), (words, str(e.value))
        assert llm.is_finished()                                # nothing half-queued
        gen = (p for p in [MENU[0], MENU[3]])                   # a generator of prompts is a batch, like a list
        sps = (s for s in [sp, sp])
        assert [o["token_ids"] for o in llm.generate(gen, sps, use_tqdm=False)] == [clean[0, False][:8], clean[3, False][:8]]


def test_lone_surrogate_in_a_prompt():
    if not (ASSETS / "model.safetensors").is_file(): pytest.skip("embedded model not built")
    with LLM(str(ASSETS), device="cpu", max_model_len=128, num_kvcache_blocks=16) as llm:
        with pytest.raises(ValueError, match=r"prompt 1: the prompt holds a lone surrogate '\\ud800' at character 4"):
            llm.generate(["fine", "bad \ud800 text"], use_tqdm=False)
        with pytest.raises(ValueError, match="lone surrogate"): llm.add_request("\udfff")
        assert llm.is_finished()
        assert llm.generate(["fine"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]["token_ids"]
