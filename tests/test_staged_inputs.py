"""Chapter 08's "one copy per step" (issue 10, item 3) on a CPU: the decode inputs of a graph replay are packed in one
buffer and copied once. CUDA graphs exist only on a GPU, so a stand-in graph replays the eager model on the graphs'
own buffers; everything else — packing, padding rows, the two host twins, int32 ids and positions, overlap's
feed_pending writing into the buffers, inference mode — is the code the GPU runs. Tokens must equal the eager engine's."""
import pytest
import torch
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.engine.model_runner import graph_batch_sizes
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
        with torch.inference_mode(): v["outputs"][:b] = r.model(v["input_ids"][:b], v["positions"][:b])
        set_context(saved.is_prefill, slot_mapping=saved.slot_mapping, context_lens=saved.context_lens,
                    block_tables=saved.block_tables)
        self.replays += 1


def install_stand_in_graphs(llm):
    r = llm.model_runner
    r.graph_bs = graph_batch_sizes(llm.config.max_num_seqs)
    r.setup_decode_buffers(r.graph_bs[-1], -(-llm.config.max_model_len // r.block_size))
    r.graphs = {b: StandInGraph(r, b) for b in r.graph_bs}
    return r


def run(ckpt, staged: bool, **kw):
    with LLMEngine(ckpt, **{**KW, **kw}) as llm:
        r = install_stand_in_graphs(llm) if staged else None
        copies = []
        if staged:
            stage = r.stage_decode
            r.stage_decode = lambda seqs: (copies.append(len(seqs)), stage(seqs))[1]
        sp = [SamplingParams(temperature=0, max_tokens=10 + 7 * i, ignore_eos=True) for i in range(len(PROMPTS))]
        out = [o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        replays = sum(g.replays for g in r.graphs.values()) if staged else 0
        return out, copies, replays


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_kvcache_blocks", [None, 12])   # 12 blocks: the engine preempts
def test_staged_decode_equals_eager(ckpt, overlap, num_kvcache_blocks):
    kw = dict(overlap_scheduling=overlap, num_kvcache_blocks=num_kvcache_blocks)
    eager, _, _ = run(ckpt, False, **kw)
    staged, copies, replays = run(ckpt, True, **kw)
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
