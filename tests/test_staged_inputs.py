"""Chapter 08's "one copy per step" (issue 10, item 3) on a CPU: the decode inputs of a graph replay are packed in one
buffer and copied once. CUDA graphs exist only on a GPU, so a stand-in graph replays the eager model on the graphs'
own buffers; everything else — packing, padding rows, the two host twins, int32 ids and positions, overlap's
feed_pending writing into the buffers, inference mode — is the code the GPU runs. Tokens must equal the eager engine's."""
import pytest
import torch
from nanovllm_lit.engine.llm_engine import LLMEngine
import numpy as np
from nanovllm_lit.engine.model_runner import decode_buffers, graph_batch_sizes, pack_decode
from nanovllm_lit.sampling_params import SamplingParams
from nanovllm_lit.utils.context import get_context, set_context
from nanovllm_lit.utils.testing import make_tiny_qwen3

torch.set_num_threads(1)
KW = dict(device="cpu", max_model_len=96, max_num_batched_tokens=192, kvcache_block_size=16, max_num_seqs=6)
_S = [(5 * i + 3) % 250 + 3 for i in range(64)]
PROMPTS = [_S[:40], _S[:32] + [7], [9, 10, 11], [(7 * j) % 250 + 3 for j in range(31)], _S[:48], [4], _S[:15]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "ckpt")


class StandInGraph:
    "Replays like a captured graph: the eager model over rows [:bs] of the graphs' buffers, padding rows included."
    def __init__(self, runner, bs): self.runner, self.bs, self.replays = runner, bs, 0

    def replay(self):
        r, v, b = self.runner, self.runner.graph_vars, self.bs
        saved = get_context()
        set_context(False, slot_mapping=v["slot_mapping"][:b], context_lens=v["context_lens"][:b],
                    block_tables=v["block_tables"][:b])
        r.record_decode(b)          # what a captured graph replays: the forward, and with graph_samples LM head + sampler
        set_context(saved.is_prefill, slot_mapping=saved.slot_mapping, context_lens=saved.context_lens,
                    block_tables=saved.block_tables)
        self.replays += 1


def install_stand_in_graphs(llm, samples: bool = True):
    if samples and torch.cuda.is_available():     # the sampler kernel then compiles for the GPU: no CPU tensors
        pytest.skip("stand-in graphs with the sampler need Triton's interpreter (a machine without CUDA)")
    r = llm.model_runner
    r.graph_samples = samples
    r.graph_bs = graph_batch_sizes(llm.config.max_num_seqs)
    r.setup_decode_buffers(r.graph_bs[-1], -(-llm.config.max_model_len // r.block_size))
    r.graphs = {b: StandInGraph(r, b) for b in r.graph_bs}
    return r


def run(ckpt, staged: bool, samples: bool = True, sp=None, full: bool = False, prompts=PROMPTS, **kw):
    with LLMEngine(ckpt, **{**KW, **kw}) as llm:
        r = install_stand_in_graphs(llm, samples) if staged else None
        copies = []
        if staged:
            stage = r.stage_decode
            def checked_stage(seqs):
                out = stage(seqs)                         # the kept rows (DecodeRows) == a fresh pack, every step
                _, fresh = decode_buffers(r.graph_bs[-1], r.graph_vars["block_tables"].size(1), "cpu")
                pack_decode(seqs, r.block_size, fresh, seed=int(r._rows.v["seed"][0]))
                bad = [k for k in fresh if not np.array_equal(r._rows.v[k], fresh[k].numpy())]
                assert not bad, f"rows kept between steps differ from a fresh pack in {bad}"
                copies.append(len(seqs))
                return out
            r.stage_decode = checked_stage
        sp = sp or [SamplingParams(temperature=0, max_tokens=10 + 7 * i, ignore_eos=True) for i in range(len(prompts))]
        out = llm.generate(prompts, sp, use_tqdm=False)
        out = out if full else [o["token_ids"] for o in out]
        replays = sum(g.replays for g in r.graphs.values()) if staged else 0
        return out, copies, replays


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_kvcache_blocks", [None, 12])   # 12 blocks: the engine preempts
@pytest.mark.parametrize("samples", [True, False])           # LM head + sampler in the graph, or the forward alone
def test_staged_decode_equals_eager(ckpt, overlap, num_kvcache_blocks, samples):
    kw = dict(overlap_scheduling=overlap, num_kvcache_blocks=num_kvcache_blocks)
    eager, _, _ = run(ckpt, False, **kw)
    staged, copies, replays = run(ckpt, True, samples, **kw)
    assert staged == eager
    assert copies and replays == len(copies) and max(copies) <= KW["max_num_seqs"]   # every decode step was staged


def test_padding_rows_store_nothing(ckpt):
    "A batch smaller than its graph: the padding rows must not write into the KV cache (slot -1)."
    with LLMEngine(ckpt, **KW, overlap_scheduling=False) as llm:
        r = install_stand_in_graphs(llm)
        llm.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        llm.step()                                                # the prefill
        before = r.kv_cache.clone()
        seq = next(iter(llm.scheduler.requests.values()))
        llm.step()                                                # one decode of 1 sequence (graph of batch 1)
        pos = len(seq) - 2                                        # the token this decode wrote
        slot = seq.block_table[pos // r.block_size] * r.block_size + pos % r.block_size
        diff = (r.kv_cache != before).any(-1).any(-1).any(0).any(0)    # (num_blocks, block_size): slots written
        changed = diff.flatten().nonzero().flatten().tolist()
        assert changed == [slot], changed
        v = r.graph_vars
        assert v["input_ids"].dtype == torch.int32 and v["slot_mapping"][1:].eq(-1).all()



def count_host_samplers(monkeypatch):
    "Count the steps sampled outside the graph (chapter 14a's `sample_batch`, as the runner calls it)."
    from nanovllm_lit.engine import model_runner
    calls, real = [], model_runner.sample_batch
    monkeypatch.setattr(model_runner, "sample_batch", lambda logits, batch: (calls.append(len(logits)), real(logits, batch))[1])
    return calls


@pytest.mark.parametrize("overlap", [False, True])
def test_graph_sampler_serves_plain_decode_steps(ckpt, monkeypatch, overlap):
    "Greedy batches: every staged decode step takes the ids the graph sampled; only the prefills sample on the host."
    calls = count_host_samplers(monkeypatch)
    forward_only, copies, _ = run(ckpt, True, samples=False, overlap_scheduling=overlap)
    host_steps = len(calls)                               # every step: the prefills and the decode steps
    calls.clear()
    with_sampler, copies2, _ = run(ckpt, True, samples=True, overlap_scheduling=overlap)
    assert with_sampler == forward_only and copies2 == copies and copies
    assert len(calls) == host_steps - len(copies), (len(calls), host_steps, len(copies))


def test_graph_sampler_keeps_logits_for_logprobs_and_filters(ckpt, monkeypatch):
    "Log-probabilities read the logits the graph kept; a filtered batch samples from them on the host (top_k=1: greedy)."
    sp = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=3),
          SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True)] + \
         [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)] * (len(PROMPTS) - 2)
    eager, _, _ = run(ckpt, False, sp=sp, full=True, overlap_scheduling=False)
    calls = count_host_samplers(monkeypatch)
    staged, copies, _ = run(ckpt, True, sp=sp, full=True, overlap_scheduling=False)
    assert [o["token_ids"] for o in staged] == [o["token_ids"] for o in eager]
    assert len(calls) > len(copies)                       # the top-k row's decode steps sampled on the host too
    assert len(staged[0]["logprobs"]) == 9
    for a, b in zip(staged[0]["logprobs"], eager[0]["logprobs"]):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a), (a, b)


def test_graph_sampler_honours_each_rows_temperature_and_seed(ckpt):
    "Rows at T = 1 and greedy rows in one batch: the greedy rows equal eager greedy; torch's seed repeats a run."
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    hot = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    sp = [hot if i % 2 else greedy for i in range(len(PROMPTS))]
    reference, _, _ = run(ckpt, False, sp=[greedy] * len(PROMPTS))
    def sampled(seed, prompts=PROMPTS, params=sp):
        torch.manual_seed(seed)
        return run(ckpt, True, sp=params, prompts=prompts, overlap_scheduling=True)[0]
    a, b, c = sampled(0), sampled(0), sampled(1)
    assert [x for i, x in enumerate(a) if i % 2 == 0] == [x for i, x in enumerate(reference) if i % 2 == 0]
    assert a == b and a != c                                # the seeds come from torch's CPU generator
    twins = sampled(2, [PROMPTS[0]] * 4, [hot] * 4)          # one prompt four times: each row draws its own noise
    assert len({tuple(t) for t in twins}) > 1, twins



@pytest.mark.parametrize("num_kvcache_blocks", [None, 12])
def test_speculative_verify_replays_graphs_with_the_sampler_inside(ckpt, num_kvcache_blocks):
    "n-gram speculation: verify rows replay the graphs through their unstaged inputs; the logits they keep == eager's."
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    kw = dict(overlap_scheduling=False, num_kvcache_blocks=num_kvcache_blocks, speculative_config=spec)
    eager, _, _ = run(ckpt, False, **kw)
    staged, copies, replays = run(ckpt, True, **kw)
    assert staged == eager and replays > 0 and not copies      # every decode step here is a verify pass


from hypothesis import given, settings, strategies as st  # noqa: E402
from nanovllm_lit.engine.model_runner import DecodeRows  # noqa: E402
from nanovllm_lit.engine.sequence import Sequence  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 30))
def test_kept_rows_equal_a_fresh_pack_under_random_changes(seed, steps):
    "Sequences advance, cross blocks, join, leave, reorder, come back with new blocks, lose their last block: rows == a fresh pack."
    import random
    rng, bs, width, max_bs = random.Random(seed), 4, 8, 6
    _, kept = decode_buffers(max_bs, width, "cpu")
    rows, next_block, pool = DecodeRows(kept, bs), [100], []
    def new_seq():
        s = Sequence([rng.randrange(50) for _ in range(rng.randint(1, 9))], SamplingParams(temperature=rng.choice([0.0, 0.7])),
                     block_size=bs)
        s.block_table = [next_block[0] + i for i in range(-(-len(s) // bs))]; next_block[0] += 10
        return s
    live = [new_seq() for _ in range(rng.randint(1, max_bs))]
    for _ in range(steps):
        batch = live[:max_bs]
        rows.update(batch, seed=7)
        _, fresh = decode_buffers(max_bs, width, "cpu")
        pack_decode(batch, bs, fresh, seed=7)
        assert all(np.array_equal(rows.v[k], fresh[k].numpy()) for k in fresh)
        for s in batch:                                            # the step's token, and a block where one starts
            if len(s) < bs * width: s.append_token(rng.randrange(50))
            if len(s.block_table) < -(-len(s) // bs): s.block_table.append(next_block[0]); next_block[0] += 1
        op = rng.randrange(6)
        if op == 0 and len(live) < max_bs: live.append(new_seq())                      # joins
        elif op == 1 and len(live) > 1: pool.append(live.pop(rng.randrange(len(live))))  # leaves (preempted)
        elif op == 2: rng.shuffle(live)                                                # reorders
        elif op == 3 and len(live) > 1:    # preempted and prefilled again at once: new blocks, the same last one
            s = live[0]
            s.block_table[:-1] = [next_block[0] + i for i in range(len(s.block_table) - 1)]; next_block[0] += 10
            rows.forget([s])
        elif op == 4 and pool and len(live) < max_bs: live.append(pool.pop())          # comes back later
        elif op == 5:                                              # a last block given back and another taken (08c)
            s = rng.choice(live); s.block_table[-1] = next_block[0]; next_block[0] += 1
