"""Reliability of the per-step context and of sampling (issue 9, part A).

- Two engines driven from two threads must not see each other's batch (the `Context` is thread-local, ch. 16),
  and two engines interleaved step by step in one thread must each give what they give alone.
- A tiny temperature (1e-38, 1e-7) samples the greedy token instead of NaN-driven garbage (ch. 03a, 14);
  no temperature that reaches the sampler (NaN, negative) lets NaN pick the token.
- `SamplingParams` is immutable, so its construction-time checks cannot be bypassed (ch. 03a).
"""
import dataclasses, threading
from pathlib import Path
import pytest
import torch

from nanovllm_lit import LLM, SamplingParams
from nanovllm_lit.layers.sampler import Sampler
from nanovllm_lit.utils.context import get_context

torch.set_num_threads(1)

MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "tiny-qwen3")   # the embedded model
ENGINE = dict(device="cpu", max_model_len=128, max_num_seqs=4)
PROMPTS = ["Once upon a time", "The cat sat on"]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def token_ids(llm, prompts=PROMPTS, sp=GREEDY):
    return [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def engines():
    pair = [LLM(MODEL, **ENGINE) for _ in range(2)]
    yield pair
    for llm in pair: llm.exit()


# ---------------------------------------------------------------- the context is per thread
def test_two_engines_in_two_threads_match_single_threaded(engines):
    ref = token_ids(engines[0])
    assert token_ids(engines[1]) == ref                      # same model, same answer, one thread
    rounds, runs, start = 15, {0: [], 1: []}, threading.Barrier(2)

    def serve(k):
        start.wait()                                         # both threads generate at the same time
        for _ in range(rounds):
            try: runs[k].append(token_ids(engines[k]))
            except Exception as e: runs[k].append(f"raised {type(e).__name__}: {e}")

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
    for t in threads: t.start()
    for t in threads: t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    bad = [(k, i, r) for k in runs for i, r in enumerate(runs[k]) if r != ref]
    assert not bad, f"{len(bad)} of {2 * rounds} threaded runs differ from the single-threaded run; first: {bad[0]}"
    assert len(runs[0]) == len(runs[1]) == rounds
    assert get_context().slot_mapping is None                 # this (main) thread's context was never touched


def test_two_engines_interleaved_in_one_thread(engines):
    a, b = engines
    jobs = {a: (PROMPTS, SamplingParams(temperature=0, max_tokens=12)),
            b: (["A dog", "In the morning the", "She said"], SamplingParams(temperature=0, max_tokens=7))}
    alone = {llm: token_ids(llm, *job) for llm, job in jobs.items()}
    ids = {llm: [llm.add_request(p, job[1]) for p in job[0]] for llm, job in jobs.items()}
    done, steps = {a: {}, b: {}}, 0
    while not (a.is_finished() and b.is_finished()):
        for llm in (a, b):                                    # a step of A, a step of B, ...
            if llm.is_finished(): continue
            finished, _ = llm.step()
            done[llm].update(finished)
            steps += 1
            assert get_context().slot_mapping is None and not get_context().is_prefill   # reset after each step
    assert steps > 10                                         # prefills and decodes of both really interleaved
    for llm in (a, b): assert [done[llm][i] for i in ids[llm]] == alone[llm]


# ---------------------------------------------------------------- tiny temperatures are greedy
def test_sampler_tiny_temperature_is_greedy():
    torch.manual_seed(0)
    logits = 10 * torch.randn(64, 500)
    logits[0, :2] = torch.tensor([1.0, 1.0 + 2**-23])          # a near-tie: at T = 1e-7 a plain softmax flips a coin
    logits[0, 2:] = -5.0
    sampler = Sampler()
    for t in (1e-38, 1e-7, 1e-6):
        for _ in range(20):
            got = sampler(logits, torch.full((64,), t))
            assert torch.equal(got, logits.argmax(-1)), f"T={t}: not the arg-max"


def test_sampler_never_lets_nan_pick_the_token():
    torch.manual_seed(0)
    logits = 10 * torch.randn(6, 300)
    logits[:, 0] = -50.0                                      # token 0 is never the arg-max
    temps = torch.tensor([float("nan"), -1.0, 1e-38, 0.0, 1e-30, 1e-20])
    for _ in range(20): assert torch.equal(Sampler()(logits, temps), logits.argmax(-1))
    inf_row = torch.tensor([[-3.0, 2.0, float("inf"), 0.0]])
    assert Sampler()(inf_row, torch.tensor([0.8])).tolist() == [2]   # inf logit: NaN probabilities -> arg-max


def test_greedy_threshold_is_documented_and_sane():
    from nanovllm_lit.sampling_params import GREEDY_BELOW
    assert GREEDY_BELOW == 1e-5
    logits = torch.tensor([[1000.0, -1000.0, 3.0]])             # large but realistic logits stay finite at the threshold
    assert torch.isfinite(logits / GREEDY_BELOW).all() and torch.isfinite(torch.softmax(logits / GREEDY_BELOW, -1)).all()


@pytest.mark.parametrize("t", [1e-38, 1e-7])
def test_engine_tiny_temperature_gives_greedy_tokens(engines, t):
    greedy = token_ids(engines[0], sp=SamplingParams(temperature=0, max_tokens=10))
    tiny = token_ids(engines[0], sp=SamplingParams(temperature=t, max_tokens=10))
    assert tiny == greedy and all(len(x) > 1 for x in tiny)


# ---------------------------------------------------------------- SamplingParams is immutable
@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", 0.5),
                                          ("max_tokens", 0), ("ignore_eos", True)])
def test_sampling_params_refuse_mutation(field, value):
    sp = SamplingParams(temperature=0.7, max_tokens=5)
    before = dataclasses.astuple(sp)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(sp, field, value)
    assert dataclasses.astuple(sp) == before


def test_sampling_params_replace_revalidates():
    sp = SamplingParams(temperature=0.7, max_tokens=5)
    with pytest.raises(ValueError, match="temperature"): dataclasses.replace(sp, temperature=float("nan"))
    sp2 = dataclasses.replace(sp, max_tokens=9)
    assert (sp2.temperature, sp2.max_tokens, sp.max_tokens) == (0.7, 9, 5)
    assert hash(sp2) == hash(SamplingParams(temperature=0.7, max_tokens=9))   # frozen + eq: usable as a key
