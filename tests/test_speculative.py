"""Speculative decoding (chapter 08c, issue 13) on CPU with tiny checkpoints.

Greedy output equals plain decoding for both proposers on random workloads (hypothesis: EOS, max_tokens,
max_model_len, prefix-cache hits, preemption in a small pool), with the pool's invariants and the KV footprint
bound checked after every step and nothing leaked at the end; a failure injected into a speculative step
recovers with the clean tokens; aborts between steps; seeded requests reproduce alone and in a batch; logprobs
equal plain decoding's; bad configs and bad requests get clear errors while the engine keeps serving."""
import pytest
from engine_checks import footprint_ok
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanovllm_lit.config import Config
from nanovllm_lit.engine.block_manager import check_invariants
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.speculative import ngram_propose, truncated_draft
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3, test_fail

torch.set_num_threads(1)

KW = dict(device="cpu", max_model_len=96, max_num_batched_tokens=192, kvcache_block_size=16)
_S = [(5 * i + 3) % 250 + 3 for i in range(64)]
MENU = [_S[:40], _S[:32] + [7], _S[:16] + [8, 9, 10], [9, 10, 11], [(7 * j) % 250 + 3 for j in range(31)],
        _S[:48], [4], _S[:15], [20, 21, 20, 21, 20]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    target = make_tiny_qwen3(d / "target", num_hidden_layers=2)
    return target, truncated_draft(target, str(d / "draft"), 1)


def specs(ckpts, k=3):
    return {"ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
            "draft": {"method": "draft_model", "model": ckpts[1], "num_speculative_tokens": k}}


def drive(llm, prompts, params):
    "add_request all, step to the end checking the pool after every step; -> [(ids, finish reason, logprobs)]."
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    seqs = {s.seq_id: s for s in llm.scheduler.waiting}
    for _ in range(5000):
        if llm.is_finished(): break
        llm.step()
        check_invariants(llm.scheduler.block_manager, list(seqs.values()))
        footprint_ok(llm)
        for s in seqs.values():
            assert s.num_completion_tokens <= s.max_tokens and len(s) <= llm.scheduler.max_model_len
    else: raise AssertionError("never finished")
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks)
    return [(seqs[i].completion_token_ids, seqs[i].finish_reason, seqs[i].output_logprobs) for i in ids]


def run(ckpt, prompts, params, spec=None, **kw):
    with LLMEngine(ckpt, **{**KW, **kw}, speculative_config=spec) as llm:
        out = drive(llm, prompts, params)
        return out, (llm.speculative_stats() if spec else None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, len(MENU) - 1), st.integers(1, 40)), min_size=1, max_size=6),
       blocks=st.sampled_from([6, 8, 40]), method=st.sampled_from(["ngram", "draft"]), k=st.integers(1, 5),
       eos_at=st.one_of(st.none(), st.integers(0, 5)), max_len=st.sampled_from([64, 96]))
def test_greedy_equals_plain_with_invariants(ckpts, picks, blocks, method, k, eos_at, max_len):
    prompts = [MENU[i] for i, _ in picks]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=eos_at is None) for _, m in picks]
    kw = dict(num_kvcache_blocks=blocks, max_model_len=max_len)
    plain, _ = run(ckpts[0], prompts, params, **kw)
    if eos_at is not None:   # an EOS id the plain run produces somewhere: several requests then stop early
        toks = [t for ids, _, _ in plain for t in ids]
        kw["eos_token_ids"] = {toks[eos_at % len(toks)]}
        plain, _ = run(ckpts[0], prompts, params, **kw)
    got, stats = run(ckpts[0], prompts, params, specs(ckpts, k)[method], **kw)
    assert got == plain
    assert stats["accepted"] <= stats["proposed"]


def test_accepts_and_rejects_both_methods(ckpts):
    prompts = [MENU[i] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 6
    plain, _ = run(ckpts[0], prompts, params, num_kvcache_blocks=40)
    for name, spec in specs(ckpts).items():
        got, stats = run(ckpts[0], prompts, params, spec, num_kvcache_blocks=40)
        assert got == plain
        assert 0 < stats["accepted"] < stats["proposed"], (name, stats)
        pos = stats["per_position"]
        assert sum(pos["proposed"]) == stats["proposed"] and sum(pos["accepted"]) == stats["accepted"]
        assert all(a <= p for a, p in zip(pos["accepted"], pos["proposed"]))


def test_triton_backend(ckpts, monkeypatch):
    "Greedy equality on the triton backend, with verification rows through chapter 12c's fused decode kernel:"
    " several rows of one sequence in one call (this step's keys taken from the other rows, not the cache)."
    from nanovllm_lit.layers import decode_epilogue
    calls, real = [], decode_epilogue.decode_with_epilogue
    def spy(qkv, positions, *args, **kw):
        tables = args[10]                                                  # block_tables
        calls.append(len({tuple(r) for r in tables.tolist()}) < len(tables))   # a sequence with several rows
        return real(qkv, positions, *args, **kw)
    monkeypatch.setattr(decode_epilogue, "decode_with_epilogue", spy)
    monkeypatch.setenv("NANOVLLM_LIT_FUSED_DECODE", "1")                   # opt-in (chapter 12c)
    prompts, params = [MENU[0], MENU[4]], [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)] * 2
    plain, _ = run(ckpts[0], prompts, params, num_kvcache_blocks=40, attention_backend="triton")
    assert calls and not any(calls)
    for spec in specs(ckpts).values():
        calls.clear()
        assert run(ckpts[0], prompts, params, spec, num_kvcache_blocks=40, attention_backend="triton")[0] == plain
        assert any(calls), "no verification pass took the fused kernel with several rows of a sequence"


def test_logprobs_equal_plain(ckpts):
    prompts, params = MENU[:3], [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)] * 3
    plain, _ = run(ckpts[0], prompts, params, num_kvcache_blocks=40)
    for spec in specs(ckpts).values():
        got, _ = run(ckpts[0], prompts, params, spec, num_kvcache_blocks=40)
        for (ids_a, r_a, lp_a), (ids_b, r_b, lp_b) in zip(plain, got):
            assert ids_a == ids_b and r_a == r_b and len(lp_a) == len(lp_b) == 20
            for x, y in zip(lp_a, lp_b):
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_seeded_reproducible_alone_and_in_batch(ckpts, method):
    spec = specs(ckpts)[method]
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.02, seed=7, max_tokens=30, ignore_eos=True)
    others = [SamplingParams(temperature=0.8, max_tokens=10 + i, ignore_eos=True) for i in range(3)]
    alone = run(ckpts[0], [MENU[8]], [sp], spec, num_kvcache_blocks=40)[0][0]
    again = run(ckpts[0], [MENU[8]], [sp], spec, num_kvcache_blocks=40)[0][0]
    crowd = run(ckpts[0], [MENU[0], MENU[8], MENU[4], MENU[2]], [others[0], sp, others[1], others[2]], spec,
                num_kvcache_blocks=40)[0][1]
    tight = run(ckpts[0], [MENU[0], MENU[8], MENU[4], MENU[2]], [others[0], sp, others[1], others[2]], spec,
                num_kvcache_blocks=8)[0][1]                  # preemptions too
    assert alone == again == crowd == tight


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("at", [1, 3])
def test_failed_step_recovers(ckpts, method, at):
    spec = specs(ckpts)[method]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [MENU[0], MENU[3], MENU[4], MENU[8]]
    clean, _ = run(ckpts[0], prompts, [params] * 4, num_kvcache_blocks=12)
    with LLMEngine(ckpts[0], **KW, num_kvcache_blocks=12, speculative_config=spec) as llm:
        ids = [llm.add_request(p, params) for p in prompts]
        runner, calls = llm.model_runner, []
        real = runner.speculate
        def failing(*a):
            calls.append(1)
            if len(calls) == at: raise KeyboardInterrupt("injected")
            return real(*a)
        runner.speculate = failing
        out, failures = {}, 0
        while not llm.is_finished():
            try: out.update(llm.step()[0])
            except KeyboardInterrupt: failures += 1
            check_invariants(llm.scheduler.block_manager, list(llm.scheduler.requests.values()))
        assert failures == 1 and [out[i] for i in ids] == [c[0] for c in clean]
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == len(bm.blocks)


def test_abort_between_steps_and_bad_input_keeps_serving(ckpts):
    with LLMEngine(ckpts[0], **KW, num_kvcache_blocks=40, speculative_config=specs(ckpts)["draft"]) as llm:
        sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        a, b = llm.add_request(MENU[0], sp), llm.add_request(MENU[4], sp)
        for _ in range(3): llm.step()
        assert llm.abort_request(a)
        test_fail(lambda: llm.add_request([1, 2, 10_000], sp), ValueError, "prompt token ids")
        out = {}
        while not llm.is_finished(): out.update(llm.step()[0])
        assert b in out and a not in out
        bm = llm.scheduler.block_manager
        assert bm.num_free_blocks == len(bm.blocks)
    alone, _ = run(ckpts[0], [MENU[4]], [sp])
    assert out[b] == alone[0][0]


def test_config_errors_and_defaults(ckpts, tmp_path):
    target = ckpts[0]
    cfg = Config(target, device="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert cfg.overlap_scheduling is False and cfg.speculative_config.prompt_lookup_max == 5
    bad = lambda spec, **kw: (lambda: Config(target, device="cpu", **kw, speculative_config=spec))
    test_fail(bad({"method": "ngram", "num_speculative_tokens": True}), ValueError, "num_speculative_tokens")
    test_fail(bad({"method": "medusa", "num_speculative_tokens": 2}), ValueError, "unknown method 'medusa'")
    test_fail(bad({"method": "draft_model", "num_speculative_tokens": 2, "model": ckpts[1], "x": 1}), ValueError,
              "unknown key(s) ['x']")
    test_fail(bad({"method": "draft_model", "num_speculative_tokens": 2, "model": str(tmp_path / "no")}),
              FileNotFoundError, "draft model directory not found")
    (tmp_path / "empty").mkdir()
    test_fail(bad({"method": "draft_model", "num_speculative_tokens": 2, "model": str(tmp_path / "empty")}),
              FileNotFoundError, "no config.json")
    other = make_tiny_qwen3(tmp_path / "v512", num_hidden_layers=1, vocab_size=512)
    test_fail(bad({"method": "draft_model", "num_speculative_tokens": 2, "model": other}), ValueError, "vocab_size (512)")
    short = make_tiny_qwen3(tmp_path / "short", num_hidden_layers=1, max_position_embeddings=64)
    test_fail(bad({"method": "draft_model", "num_speculative_tokens": 2, "model": short}, max_model_len=128),
              ValueError, "lower max_model_len")
    test_fail(bad({"method": "ngram", "num_speculative_tokens": 2}, tensor_parallel_size=2), ValueError,
              "tensor_parallel_size=1")
    with LLMEngine(target, **KW, num_kvcache_blocks=8) as llm:
        test_fail(llm.speculative_stats, RuntimeError, "no speculative_config")
    with pytest.raises(TypeError, match="unknown option"):
        LLMEngine(target, **KW, speculative=True)


def test_ngram_propose_examples():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 3, 3, 1) == [9, 1, 2]
    assert ngram_propose([7, 7, 7], 4, 2, 1) == [7, 7, 7, 7]
    assert ngram_propose([1, 2, 3, 4], 3, 2, 1) == [] and ngram_propose([5], 2, 2, 1) == []
