"""Our models equal HF transformers' on the same tiny random checkpoints (fp32, CPU).

For each config (Qwen3 with GQA ratio 1, 2, 4, tied and untied embeddings, head_dim 16 and 32; Llama with plain
and llama3-scaled RoPE, tied and untied, with and without biases; Qwen2 with its q/k/v biases; Mistral):
- varlen prefill: several sequences of different lengths packed into one flat batch, every position's logits;
- prefill with a cached prefix, then decode steps, through a paged KV cache with shuffled block ids;
- greedy tokens equal to HF `generate(do_sample=False)`, from our own loop over the paged cache.
"""
import random

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm_lit.models import model_class_for
from nanovllm_lit.models.qwen3 import Qwen3Attention
from nanovllm_lit.utils.context import reset_context, set_context
from nanovllm_lit.utils.loader import load_model
from nanovllm_lit.utils.testing import TINY_EOS_TOKEN_IDS, make_tiny_checkpoint

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

CONFIGS = {
    "gqa1-hd16-untied": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa2-hd32-tied-2shards": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   tie_word_embeddings=True, num_shards=2, rope_theta=1e6, initializer_range=0.1),
    "gqa4-hd16-tied": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                           num_hidden_layers=3, initializer_range=0.2),
    "llama-gqa2-hd16-untied": dict(architecture="LlamaForCausalLM", rope_theta=5e5),
    "llama3rope-gqa4-hd32-tied-bias": dict(architecture="LlamaForCausalLM", num_attention_heads=8, num_key_value_heads=2,
                                           head_dim=32, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                           initializer_range=0.2,
                                           rope_theta=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32}),
    "llama-linear-rope-gqa1": dict(architecture="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=4,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0}, num_shards=2),
    "qwen2-gqa2-hd16-bias": dict(architecture="Qwen2ForCausalLM", initializer_range=0.1),
    "qwen2-gqa4-tied": dict(architecture="Qwen2ForCausalLM", num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                            tie_word_embeddings=True, initializer_range=0.2),
    "mistral-gqa4-hd8": dict(architecture="MistralForCausalLM", num_attention_heads=8, num_key_value_heads=2, head_dim=8),
}
BLOCK_SIZE = 16
VOCAB = 256


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def models(request, tmp_path_factory):
    torch.set_num_threads(1)
    kw = dict(CONFIGS[request.param])
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), kw.pop("architecture", "Qwen3ForCausalLM"), **kw)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    hf_config = AutoConfig.from_pretrained(path)
    ours = model_class_for(hf_config)(hf_config)
    load_model(ours, path)
    ours.eval()
    try:
        from nanovllm_lit.layers.attention import set_attention_backend
        set_attention_backend(ours, "torch")
    except ImportError:
        pass
    yield hf, ours
    reset_context()


def assert_close_rel(actual, expected, rel=1e-4):
    "Every element within `rel` of the largest reference magnitude (relative error of the logit vector)."
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@torch.no_grad()
def hf_logits(hf, tokens):
    return hf(torch.tensor([tokens])).logits[0]                          # (len, V)


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


class PagedKV:
    "Hand-built KV cache: caches on every Attention module, block tables with shuffled block ids."

    def __init__(self, model, num_blocks=32, seed=0):
        for m in model.modules():
            if isinstance(m, Qwen3Attention):
                shape = (num_blocks, BLOCK_SIZE, m.num_kv_heads, m.head_dim)
                m.attn.k_cache, m.attn.v_cache = torch.zeros(shape), torch.zeros(shape)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)                           # pages are not contiguous
        self.tables: list[list[int]] = []
        self.lens: list[int] = []                                       # tokens stored per sequence

    def add_seq(self):
        self.tables.append([]); self.lens.append(0)
        return len(self.tables) - 1

    def slots(self, i, n):
        "Reserve slots for the next n tokens of sequence i."
        out = []
        for pos in range(self.lens[i], self.lens[i] + n):
            if pos // BLOCK_SIZE == len(self.tables[i]): self.tables[i].append(self.free.pop())
            out.append(self.tables[i][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        self.lens[i] += n
        return out

    def block_tables(self, seq_ids):
        width = max(len(self.tables[i]) for i in seq_ids)
        return i32([self.tables[i] + [-1] * (width - len(self.tables[i])) for i in seq_ids])


@torch.no_grad()
def prefill(model, kv, seq_ids, chunks):
    "Prefill `chunks[j]` (new tokens) for sequence `seq_ids[j]`, after whatever it already has in the cache."
    cached = [kv.lens[i] for i in seq_ids]
    slot_mapping = sum((kv.slots(i, len(c)) for i, c in zip(seq_ids, chunks)), [])
    q_lens = [len(c) for c in chunks]
    k_lens = [c + q for c, q in zip(cached, q_lens)]
    cu_q = [0]; cu_k = [0]
    for q, k in zip(q_lens, k_lens): cu_q.append(cu_q[-1] + q); cu_k.append(cu_k[-1] + k)
    prefix = any(c > 0 for c in cached)
    set_context(True, cu_seqlens_q=i32(cu_q), cu_seqlens_k=i32(cu_k), max_seqlen_q=max(q_lens),
                max_seqlen_k=max(k_lens), slot_mapping=i32(slot_mapping),
                block_tables=kv.block_tables(seq_ids) if prefix else None)
    input_ids = torch.tensor(sum(chunks, []))
    positions = torch.tensor(sum((list(range(c, c + q)) for c, q in zip(cached, q_lens)), []))
    hidden = model(input_ids, positions)
    last = model.compute_logits(hidden)                                 # (num_seqs, V)
    reset_context()
    return hidden, last, cu_q


@torch.no_grad()
def decode(model, kv, seq_ids, tokens):
    "One decode step: token `tokens[j]` appended to sequence `seq_ids[j]`."
    positions = [kv.lens[i] for i in seq_ids]
    slot_mapping = sum((kv.slots(i, 1) for i in seq_ids), [])
    set_context(False, slot_mapping=i32(slot_mapping), context_lens=i32([kv.lens[i] for i in seq_ids]),
                block_tables=kv.block_tables(seq_ids))
    logits = model.compute_logits(model(torch.tensor(tokens), torch.tensor(positions)))
    reset_context()
    return logits                                                       # (num_seqs, V)


def random_tokens(gen, n):
    return torch.randint(3, VOCAB, (n,), generator=gen).tolist()        # avoid bos/eos ids 0, 1, 2


def test_varlen_prefill_all_positions(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(1)
    seqs = [random_tokens(gen, n) for n in (7, 1, 12, 4, 23)]
    cu = [0]
    for s in seqs: cu.append(cu[-1] + len(s))
    set_context(True, cu_seqlens_q=i32(cu), cu_seqlens_k=i32(cu), max_seqlen_q=23, max_seqlen_k=23,
                slot_mapping=i32(list(range(cu[-1]))))                  # no cache allocated: nothing stored
    with torch.no_grad():
        hidden = ours(torch.tensor(sum(seqs, [])), torch.tensor(sum((list(range(len(s))) for s in seqs), [])))
        last = ours.compute_logits(hidden)
    reset_context()
    all_logits = hidden @ ours.lm_head.weight.T                         # (N, V): every position
    ref = torch.cat([hf_logits(hf, s) for s in seqs])
    assert all_logits.shape == ref.shape == (cu[-1], VOCAB)
    assert_close_rel(all_logits, ref)
    assert last.shape == (len(seqs), VOCAB)
    assert_close_rel(last, ref[[c - 1 for c in cu[1:]]])


def test_cached_prefix_then_decode(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(2)
    prompts = [random_tokens(gen, n) for n in (40, 21, 9)]
    cached_prefix = [32, 16, 0]                                         # block-aligned, as prefix caching gives
    kv = PagedKV(ours)
    ids = [kv.add_seq() for _ in prompts]
    # step 1: the prefixes, as if computed by earlier requests (no cached prefix yet: no block tables)
    first = [i for i in ids if cached_prefix[i]]
    hidden, _, cu = prefill(ours, kv, first, [prompts[i][:cached_prefix[i]] for i in first])
    for j, i in enumerate(first):
        assert_close_rel(hidden[cu[j]:cu[j + 1]] @ ours.lm_head.weight.T, hf_logits(hf, prompts[i][:cached_prefix[i]]))
    # step 2: the rest of every prompt, attending to the cached prefix through block tables
    hidden, last, cu = prefill(ours, kv, ids, [p[c:] for p, c in zip(prompts, cached_prefix)])
    for i in ids:
        ref = hf_logits(hf, prompts[i])
        assert_close_rel(hidden[cu[i]:cu[i + 1]] @ ours.lm_head.weight.T, ref[cached_prefix[i]:])
        assert_close_rel(last[i], ref[-1])
    # steps 3..: decode random tokens (crossing block boundaries), comparing each step with a full HF forward
    seqs = [list(p) for p in prompts]
    for _ in range(10):
        new = random_tokens(gen, len(ids))
        for s, t in zip(seqs, new): s.append(t)
        logits = decode(ours, kv, ids, new)
        ref = torch.stack([hf_logits(hf, s)[-1] for s in seqs])
        assert_close_rel(logits, ref)
    # a subset of sequences can decode alone (their own block tables only)
    seqs[2].append(5)
    assert_close_rel(decode(ours, kv, [2], [5])[0], hf_logits(hf, seqs[2])[-1])


def greedy_paged(model, prompts, max_new_tokens, eos_ids):
    "Batched greedy generation over the paged cache: one prefill, then decode steps, stop at EOS."
    kv = PagedKV(model, seed=3)
    ids = [kv.add_seq() for _ in prompts]
    _, logits, _ = prefill(model, kv, ids, [list(p) for p in prompts])
    outs = [[] for _ in prompts]
    running = list(ids)
    while running:
        tokens = logits.argmax(-1).tolist()
        for i, t in zip(running, tokens): outs[i].append(t)
        running = [i for i in running if outs[i][-1] not in eos_ids and len(outs[i]) < max_new_tokens]
        if running: logits = decode(model, kv, running, [outs[i][-1] for i in running])
    return outs


def hf_greedy(hf, prompt, max_new_tokens, eos_ids=None):
    kw = {} if eos_ids is None else dict(eos_token_id=sorted(eos_ids))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_new_tokens, **kw)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(4)
    prompts = [random_tokens(gen, n) for n in (5, 17, 30)]
    max_new = 12
    ours_out = greedy_paged(ours, prompts, max_new, set(TINY_EOS_TOKEN_IDS))
    assert len({t for o in ours_out for t in o}) > 6                   # not one token repeated: a real test
    for p, o in zip(prompts, ours_out):
        assert o == hf_greedy(hf, p, max_new), p
    # EOS: declare tokens the free run produced mid-way as EOS; both must stop there, so the batch goes ragged
    eos = {ours_out[0][3], ours_out[1][6]}
    ours_eos = greedy_paged(ours, prompts, max_new, eos)
    assert any(len(o) < max_new for o in ours_eos)
    for p, o in zip(prompts, ours_eos):
        assert o == hf_greedy(hf, p, max_new, eos), p
