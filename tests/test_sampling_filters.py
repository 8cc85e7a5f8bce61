"""Sampling filters (top-k, top-p, min-p), per-request seeds and log-probabilities (issue 11, part A).

The filtered sampler must draw from exactly the distribution HF transformers' logits warpers define
(temperature, then top-k, top-p, min-p), a seeded request must give the same tokens whatever its neighbours,
and log-probabilities are log_softmax of the raw logits. A batch using none of it stays on chapter 14's path.
"""
import dataclasses, pickle
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from nanovllm_lit.config import Config
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.model_runner import ModelRunner, prepare_sample
from nanovllm_lit.engine.sequence import Sequence
from nanovllm_lit.layers.sampler import chi2_quantile, chi2_stat, sample
from nanovllm_lit.layers.sampling_filters import (SamplingBatch, filter_probs, logprobs_of, min_p_keep, race_noise,
                                                  sample_batch, sample_filtered, top_k_keep, top_p_keep)
from nanovllm_lit.sampling_params import MAX_LOGPROBS, SamplingParams
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)
LOGITS = torch.tensor([3.0, 2.4, 2.0, 1.7, 1.2, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0])
CONFIGS = [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=6, top_p=0.8),
           dict(top_k=8, top_p=0.95, min_p=0.1), dict(top_k=3, min_p=0.3), dict(top_p=0.7, min_p=0.2)]
N = 20_000


def hf_probs(logits, T, top_k=-1, top_p=1.0, min_p=0.0):
    "HF transformers' sampling distribution: its warpers in generate's order, then softmax (float64)."
    warpers = [TemperatureLogitsWarper(T)]
    if top_k > 0: warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1: warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0: warpers.append(MinPLogitsWarper(min_p))
    scores = logits.double().reshape(-1, logits.shape[-1])
    for w in warpers: scores = w(torch.zeros(len(scores), 0, dtype=torch.long), scores)
    return torch.softmax(scores, -1)


def params(n, T, top_k=-1, top_p=1.0, min_p=0.0):
    return (torch.full((n,), T), torch.full((n,), top_k), torch.full((n,), top_p), torch.full((n,), min_p))


def judge(tokens, ref, alpha=0.001):
    "(passes, draws outside ref's support, X²) of sampled tokens against the probabilities ref."
    counts = torch.bincount(tokens, minlength=len(ref)).double()
    kept = ref > 0
    outside, df = int(counts[~kept].sum()), int(kept.sum()) - 1
    if df == 0: return outside == 0, outside, 0.0
    stat = chi2_stat(counts[kept], ref[kept])
    return outside == 0 and stat < chi2_quantile(1 - alpha, df), outside, stat


# --- SamplingParams -------------------------------------------------------------------------------------------

def test_sampling_params_defaults_and_normalisation():
    sp = SamplingParams()
    assert (sp.top_k, sp.top_p, sp.min_p, sp.seed, sp.stop, sp.stop_token_ids, sp.logprobs) == \
        (-1, 1.0, 0.0, None, (), (), None)
    assert not sp.uses_filters and SamplingParams(top_k=0) == sp and SamplingParams(top_k=0).top_k == -1
    sp = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2], seed=3, logprobs=MAX_LOGPROBS, top_p=0.5)
    assert sp.stop == ("a", "b") and sp.stop_token_ids == (1, 2) and sp.uses_filters
    assert SamplingParams(stop="x").stop == ("x",) and isinstance(SamplingParams(top_p=1).top_p, float)
    assert hash(sp) == hash(dataclasses.replace(sp)) and dataclasses.replace(sp, max_tokens=3).stop == ("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError): sp.seed = 4
    for kw in (dict(top_k=1), dict(top_p=0.99), dict(min_p=0.01)): assert SamplingParams(**kw).uses_filters
    assert not SamplingParams(seed=1, logprobs=2).uses_filters


@pytest.mark.parametrize("field,bad", [
    ("top_k", -2), ("top_k", 1.0), ("top_k", True), ("top_k", None),
    ("top_p", 0), ("top_p", -0.5), ("top_p", 1.0001), ("top_p", float("nan")), ("top_p", "0.9"), ("top_p", True),
    ("min_p", -0.1), ("min_p", 1.5), ("min_p", float("inf")), ("min_p", None),
    ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("seed", False), ("seed", "7"),
    ("stop", ""), ("stop", [""]), ("stop", ["a", None]), ("stop", 5), ("stop", {"a"}),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2.0]), ("stop_token_ids", [True]), ("stop_token_ids", 3),
    ("stop_token_ids", "12"), ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0), ("logprobs", True)])
def test_sampling_params_bad_values_name_the_field(field, bad):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} "):
        SamplingParams(**{field: bad})


# --- Sequence -------------------------------------------------------------------------------------------------

def test_sequence_generator_is_lazy_per_request_and_never_pickled():
    s = Sequence([1, 2, 3], SamplingParams(seed=9, top_p=0.5, logprobs=1))
    assert s.sampling_params.seed == 9 and s.generator is None
    g = s.generator_on("cpu")
    assert s.generator_on("cpu") is g and g.initial_seed() == 9
    assert Sequence([1]).generator_on("cpu") is None
    w = pickle.loads(pickle.dumps(s))   # what a TP worker receives
    assert not hasattr(w, "generator") and not hasattr(w, "sampling_params")
    assert len(pickle.dumps(s)) == len(pickle.dumps(Sequence([1, 2, 3])))


# --- the masks ------------------------------------------------------------------------------------------------

def test_kept_sets_equal_hf_on_random_rows():
    "Random rows and per-row filters in one call: the kept tokens are HF's, row for row."
    g = torch.Generator().manual_seed(0)
    B, V = 300, 40
    logits = torch.randn(B, V, generator=g) * 2.5
    T = torch.rand(B, generator=g) * 1.5 + 0.3
    top_k = torch.randint(-1, V + 5, (B,), generator=g)
    top_p = torch.where(torch.rand(B, generator=g) < 0.3, 1.0, torch.rand(B, generator=g) * 0.95 + 0.05)
    min_p = torch.where(torch.rand(B, generator=g) < 0.3, 0.0, torch.rand(B, generator=g) * 0.5)
    ours = filter_probs(torch.softmax(logits / T[:, None], -1), top_k, top_p, min_p) > 0
    for i in range(B):
        ref = hf_probs(logits[i], float(T[i]), int(top_k[i]), float(top_p[i]), float(min_p[i]))[0] > 0
        assert torch.equal(ours[i], ref), i


def test_masks_edge_cases():
    probs = torch.softmax(LOGITS, -1)[None].expand(4, -1)
    assert (filter_probs(probs, torch.tensor([0, -1, 12, 99]), torch.ones(4), torch.zeros(4)) > 0).all()  # off
    ties = torch.softmax(torch.tensor([[2.0, 1.0, 1.0, 0.0]]), -1)
    assert (filter_probs(ties, torch.tensor([2]), torch.ones(1), torch.zeros(1)) > 0).tolist() == \
        [[True, True, True, False]]                                       # a tie with the k-th is kept (HF)
    tail = torch.softmax(torch.tensor([[0.0] * 100 + [-200.0]]), -1)      # last probability underflows to 0
    assert torch.equal(filter_probs(tail, torch.tensor([-1]), torch.ones(1), torch.zeros(1)), tail)
    # min_p = 1: only the top token (and exact ties with it); top_p tiny: only the top token
    assert (filter_probs(probs[:1], torch.tensor([-1]), torch.ones(1), torch.ones(1)) > 0).sum() == 1
    assert (filter_probs(probs[:1], torch.tensor([-1]), torch.tensor([1e-6]), torch.zeros(1)) > 0).sum() == 1
    logits = LOGITS.clone(); before = logits.clone()
    sample_filtered(logits[None], *params(1, 0.7, top_k=3, top_p=0.5))
    assert torch.equal(logits, before)                                    # the caller's logits are not modified


def test_filter_is_graph_friendly():
    graph = torch.fx.symbolic_trace(filter_probs).graph
    assert not [n for n in graph.nodes if n.target in ("item", "tolist", "cpu", "numpy")]


# --- exact distributions --------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [0.7, 1.3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "+".join(f"{k}={v}" for k, v in c.items()))
def test_distribution_equals_hf(cfg, T):
    torch.manual_seed(0)
    ref = hf_probs(LOGITS, T, **cfg)[0]
    tokens = sample_filtered(LOGITS.expand(N, -1), *params(N, T, **cfg))
    ok, outside, stat = judge(tokens, ref)
    assert outside == 0, f"{outside} draws outside HF's kept set"
    assert ok, stat
    assert ref[ref > 0].min() * N > 50     # the chi-square approximation holds


def _wrong(keep_fn):
    def sampler(logits, T, top_k, top_p, min_p):
        probs = torch.softmax(logits / T[:, None], -1)
        sp, order = probs.sort(-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep_fn(sp, top_k, top_p, min_p))
        return (probs * keep / race_noise(probs)).argmax(-1)
    return sampler


def _filter_then_temper(logits, T, top_k, top_p, min_p):
    "Filters on the untempered distribution, temperature afterwards."
    keep = filter_probs(torch.softmax(logits, -1), top_k, top_p, min_p) > 0
    probs = torch.softmax(logits / T[:, None], -1) * keep
    return (probs / race_noise(probs)).argmax(-1)


ALL = lambda sp: torch.ones_like(sp, dtype=torch.bool)
WRONG = {
    # top-p on the un-renormalised distribution (= top-p before top-k)
    "p_before_k": (_wrong(lambda sp, k, p, m: top_k_keep(sp, k) & top_p_keep(sp, ALL(sp), p)),
                   dict(top_k=6, top_p=0.8), 1.3),
    # min-p before top-p: top-p then renormalises over fewer tokens
    "min_p_before_top_p": (_wrong(lambda sp, k, p, m: top_p_keep(sp, min_p_keep(sp, ALL(sp), m), p)),
                           dict(top_p=0.7, min_p=0.2), 1.3),
    # inclusive cumulative sum: drops the token that crosses top_p
    "inclusive_top_p": (_wrong(lambda sp, k, p, m: (sp.cumsum(-1) < p[:, None]) | (sp.cumsum(-1) == sp)),
                        dict(top_p=0.8), 0.7),
    "filter_before_temperature": (_filter_then_temper, dict(top_p=0.8), 1.3),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_negative_controls_fail(name):
    fn, cfg, T = WRONG[name]
    ref = hf_probs(LOGITS, T, **cfg)[0]
    torch.manual_seed(0)
    ok, outside, stat = judge(fn(LOGITS.expand(N, -1), *params(N, T, **cfg)), ref)
    assert not ok and (outside > 500 or stat > 200), (name, outside, stat)
    torch.manual_seed(0)   # ... while the real sampler passes the same configuration
    assert judge(sample_filtered(LOGITS.expand(N, -1), *params(N, T, **cfg)), ref)[0]


def test_top_k_1_and_greedy_rows():
    torch.manual_seed(0)
    logits = torch.randn(128, 300) * 2
    for T in (0.5, 1.0, 3.0):
        for _ in range(5):
            assert torch.equal(sample_filtered(logits, *params(128, T, top_k=1)), logits.argmax(-1))
    # greedy rows (0, tiny, NaN, negative) ignore their filters; bf16 logits work
    for T in (0.0, 1e-7, float("nan"), -1.0):
        assert torch.equal(sample_filtered(logits, *params(128, T, top_k=50, top_p=0.3, min_p=0.2)), logits.argmax(-1))
    assert torch.equal(sample_filtered(logits.bfloat16(), *params(128, 1.0, top_k=1)), logits.bfloat16().float().argmax(-1))


def test_plain_batch_is_chapter_14s_path():
    logits, t = torch.randn(16, 100), torch.rand(16) * 2
    torch.manual_seed(5); a = sample_batch(logits, SamplingBatch(t))
    torch.manual_seed(5); b = sample(logits, t)
    assert torch.equal(a, b) and SamplingBatch(t).plain
    assert not SamplingBatch(t, *params(16, 1.0, top_k=3)[1:]).plain
    assert not SamplingBatch(t, generators=((0, torch.Generator()),)).plain


# --- seeds ----------------------------------------------------------------------------------------------------

def _seeded_run(rows, seeds, steps, T=1.0, **cfg):
    "Tokens of every seeded row over `steps` draws; fresh generators per run (seeds: {row: seed})."
    gens = tuple((i, torch.Generator().manual_seed(s)) for i, s in seeds.items())
    B = len(rows)
    filt = params(B, T, **cfg)[1:] if cfg else (None, None, None)
    out = [sample_filtered(rows, torch.full((B,), T), *filt, generators=gens) for _ in range(steps)]
    return {i: [int(o[i]) for o in out] for i in seeds}


@pytest.mark.parametrize("cfg", [{}, dict(top_p=0.9), dict(top_k=20, min_p=0.02)])
def test_seeded_request_same_alone_in_any_batch_and_run_after_run(cfg):
    torch.manual_seed(0)
    reqs = torch.randn(6, 80) * 1.5
    seeds = {i: 1000 + i for i in range(6)}
    alone = {i: _seeded_run(reqs[i:i + 1], {0: seeds[i]}, 25, **cfg)[0] for i in range(6)}
    assert all(len(set(v)) > 1 for v in alone.values())                         # they really sample
    assert _seeded_run(reqs, seeds, 25, **cfg) == alone                          # together
    rows = torch.randn(40, 80); where = torch.randperm(40)[:6]; rows[where] = reqs
    others = {int(j): 7 * int(j) for j in range(40) if j not in where and j % 3 == 0}   # seeded neighbours
    got = _seeded_run(rows, {**{int(where[i]): seeds[i] for i in range(6)}, **others}, 25, **cfg)
    assert {i: got[int(where[i])] for i in range(6)} == alone                    # among strangers, reordered
    assert {i: _seeded_run(reqs[i:i + 1], {0: seeds[i]}, 25, **cfg)[0] for i in range(6)} == alone   # again


def test_seeded_unfiltered_row_same_on_both_paths():
    "A seeded row without filters: same tokens whether its neighbours filter (filtered path) or not."
    torch.manual_seed(1)
    row, others = torch.randn(1, 64), torch.randn(3, 64)
    a = _seeded_run(row, {0: 42}, 20)[0]
    B = 4
    gens = ((0, torch.Generator().manual_seed(42)),)
    filt = (torch.tensor([-1, 5, 5, 5]), torch.tensor([1.0, 0.5, 0.5, 0.5]), torch.tensor([0.0, 0.1, 0.1, 0.1]))
    b = [int(sample_filtered(torch.cat([row, others]), torch.ones(B), *filt, generators=gens)[0]) for _ in range(20)]
    assert a == b


def test_seeded_rows_sample_the_right_distribution():
    cfg, T = dict(top_k=8, top_p=0.95, min_p=0.1), 1.3
    gens = [(i, torch.Generator().manual_seed(i)) for i in range(N)]
    tokens = sample_filtered(LOGITS.expand(N, -1), *params(N, T, **cfg), generators=gens)
    assert judge(tokens, hf_probs(LOGITS, T, **cfg)[0])[0]


# --- log-probabilities ----------------------------------------------------------------------------------------

def test_logprobs_equal_log_softmax_of_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 4
    tokens = sample_filtered(logits, *params(6, 1.7, top_k=30))
    asked = (5, None, 0, MAX_LOGPROBS, 1, None)
    out = logprobs_of(logits, tokens, asked)
    ref = torch.log_softmax(logits, -1)
    assert out[1] is None and out[5] is None
    for i, n in enumerate(asked):
        if n is None: continue
        s, top = int(tokens[i]), ref[i].topk(n).indices.tolist()
        assert list(out[i]) == [s] + [t for t in top if t != s]
        assert all(type(v) is float and v == ref[i, t].item() for t, v in out[i].items())
    assert logprobs_of(logits, tokens, (None,) * 6) == [None] * 6
    # the sampled token outside the top N: N + 1 entries
    low = logits[:1].clone(); low[0, 7] = -20
    assert list(logprobs_of(low, torch.tensor([7]), (2,))[0]) == [7] + low[0].topk(2).indices.tolist()


def test_logprobs_one_host_copy(monkeypatch):
    "All rows' values come back in one tensor-to-list conversion."
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or original(self))
    logits = torch.randn(8, 100)
    logprobs_of(logits, logits.argmax(-1), (3,) * 8)
    assert len(calls) == 1


def test_logprobs_equal_hf_transition_scores(tmp_path):
    "HF's own log-probabilities (compute_transition_scores, normalize_logits=True) from the same logits."
    ckpt = make_tiny_qwen3(tmp_path / "tiny")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    out = hf.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_scores = hf.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
    new = out.sequences[0, ids.shape[1]:]
    for step, logits in enumerate(out.logits):
        ours = logprobs_of(logits, new[step:step + 1], (0,))[0]
        assert list(ours) == [int(new[step])] and abs(ours[int(new[step])] - hf_scores[step].item()) < 1e-6


# --- runner and engine ----------------------------------------------------------------------------------------

def test_prepare_sample_builds_only_what_is_used():
    plain = [Sequence([1, 2], SamplingParams(temperature=t)) for t in (0.0, 0.8)]
    b = prepare_sample(plain)
    assert b.plain and b.top_k is None and b.generators == () and b.logprobs is None
    seeded = Sequence([3], SamplingParams(seed=1))
    b = prepare_sample(plain + [seeded])
    assert b.top_k is None and [i for i, _ in b.generators] == [2] and not b.plain
    filt = Sequence([4], SamplingParams(top_k=3, logprobs=2))
    b = prepare_sample([filt] + plain)
    assert b.top_k.tolist() == [3, -1, -1] and b.logprobs == (2, None, None) and b.generators == ()
    assert b.max_top_k == 3 and prepare_sample(plain).max_top_k is None   # chapter 14c's kernel needs no GPU sync
    b = prepare_sample([Sequence([5], SamplingParams(top_p=0.5))] + plain)
    assert b.max_top_k == -1 and b.top_k.tolist() == [-1, -1, -1]


def test_kth_logits_is_top_ks_threshold():
    from nanovllm_lit.layers.filters_triton import kth_logits
    torch.manual_seed(0)
    L = torch.randn(6, 30)
    L[2, :4] = 5.0                                                  # a tie at the top
    top_k = torch.tensor([1, 5, 3, -1, 0, 99])
    kth = kth_logits(L, top_k, max_top_k=99)
    srt = L.sort(-1, descending=True).values
    assert kth[0] == srt[0, 0] and kth[1] == srt[1, 4] and kth[2] == 5.0 and kth[5] == srt[5, -1]
    assert torch.isinf(kth[3]) and torch.isinf(kth[4]) and (kth[3] < 0)
    keep = L >= kth[:, None]                                          # what the kernel draws from
    ref = filter_probs(torch.softmax(L, -1), top_k, torch.ones(6), torch.zeros(6)) > 0
    assert torch.equal(keep, ref)
    assert torch.isinf(kth_logits(L, top_k, max_top_k=0)).all()     # no row filters by top-k: no topk at all


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


SMALL = dict(max_model_len=256, max_num_batched_tokens=512, max_num_seqs=8, device="cpu")
PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [60, 61, 62], [8, 9, 10, 11, 12, 200], [33] * 20]


def test_runner_returns_ids_and_logprobs(ckpt):
    runner = ModelRunner(Config(ckpt, **SMALL, kvcache_block_size=16))
    try:
        seqs = [Sequence(p, SamplingParams(temperature=0.0, logprobs=(2 if i % 2 == 0 else None)))
                for i, p in enumerate(PROMPTS)]
        for i, s in enumerate(seqs): s.block_table = [2 * i, 2 * i + 1][:s.num_blocks]
        tokens = runner.run(seqs, True)
        assert isinstance(tokens, list) and all(type(t) is int for t in tokens)
        lp = runner.last_logprobs
        assert lp[1] is None and lp[3] is None and list(lp[0])[0] == tokens[0] and len(lp[0]) == 2
        assert max(lp[0].values()) == lp[0][tokens[0]]        # greedy: the sampled token is the most likely
        for s, t in zip(seqs, tokens): s.append_token(t)
        for s in seqs: s.sampling_params = SamplingParams(temperature=0.0)
        runner.run(seqs, False)
        assert runner.last_logprobs is None                    # nobody asked this step
    finally:
        runner.exit()


def test_engine_seeded_requests_repeat_whatever_the_batch(ckpt):
    sp = SamplingParams(temperature=1.2, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    with LLMEngine(ckpt, **SMALL) as llm:
        alone = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]["token_ids"]
        again = llm.generate([PROMPTS[0]], sp, use_tqdm=False)[0]["token_ids"]
        others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
                  SamplingParams(temperature=0.8, top_k=5, seed=7, max_tokens=12, ignore_eos=True)]
        mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], sp, others[1]], use_tqdm=False)
        unseeded = [llm.generate([PROMPTS[0]], dataclasses.replace(sp, seed=None), use_tqdm=False)[0]["token_ids"]
                    for _ in range(3)]
    assert alone == again == mixed[1]["token_ids"] and len(alone) == 12
    assert any(u != alone for u in unseeded)                     # without the seed it varies


def test_engine_top_k_1_is_greedy(ckpt):
    with LLMEngine(ckpt, **SMALL) as llm:
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True),
                            use_tqdm=False)
    assert [o["token_ids"] for o in top1] == [o["token_ids"] for o in greedy]


def test_tp2_seeded_filtered_equals_tp1(ckpt):
    "Under TP the seeded sequence is pickled to the workers every step: no generator travels, tokens equal TP=1."
    sps = [SamplingParams(temperature=1.1, top_p=0.85, min_p=0.05, seed=s, max_tokens=10, ignore_eos=True, logprobs=1)
           for s in (1, 2, 3, 4)]
    with LLMEngine(ckpt, **SMALL) as one:
        ref = [o["token_ids"] for o in one.generate(PROMPTS, sps, use_tqdm=False)]
    with LLMEngine(ckpt, tensor_parallel_size=2, **SMALL) as two:
        got = [o["token_ids"] for o in two.generate(PROMPTS, sps, use_tqdm=False)]
    assert got == ref
