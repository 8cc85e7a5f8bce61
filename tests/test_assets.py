"""Checks on the files in `assets/`: the embedded tiny model (loads offline with HF transformers, its greedy
output is made of real words of its corpus, its chat template, its size) and the Qwen3-0.6B architecture config
used by the benchmark. Loading with this package's own loader is tested by the loader's owner."""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at test time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TINY = ASSETS / "tiny-qwen3"
Q06 = ASSETS / "qwen3-0.6b"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def normalize_word(w: str):
    """Same notion of a word as assets/build_tiny_model.py: letters only, lower-cased, punctuation stripped."""
    w = w.strip("`'\".,;:!?()[]{}<>*_-=/\\|#~")
    return w.lower() if w.isalpha() and w.isascii() else None


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def words():
    return set((ASSETS / "tiny_model_words.txt").read_text().split())


def greedy(model, tok, text: str, n: int) -> tuple[list[int], str]:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ tiny model
def test_tiny_files_and_size():
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"]:
        assert (TINY / f).is_file(), f
    size = sum(f.stat().st_size for f in TINY.rglob("*") if f.is_file())
    assert size <= 10_000_000, f"tiny model dir is {size/1e6:.2f} MB (> 10 MB)"
    assert (ASSETS / "build_tiny_model.py").is_file() and (ASSETS / "tiny_model_card.md").is_file()


def test_tiny_config_is_qwen3(tok):
    cfg = AutoConfig.from_pretrained(TINY, local_files_only=True)
    assert cfg.model_type == "qwen3" and cfg.architectures == ["Qwen3ForCausalLM"]
    assert cfg.tie_word_embeddings
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.vocab_size == len(tok)
    # rope_theta is read the 4.57 way or the 5.x way
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert theta == 10000.0
    # EOS: generation_config.json lists both the document end and the chat-turn end
    gen = GenerationConfig.from_pretrained(TINY, local_files_only=True)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert sorted(eos) == sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
    raw = json.loads((TINY / "generation_config.json").read_text())
    assert isinstance(raw["eos_token_id"], list) and len(raw["eos_token_id"]) == 2


def test_tokenizer_specials_and_roundtrip(tok):
    ids = tok.convert_tokens_to_ids(SPECIALS)
    assert len(set(ids)) == 3 and all(i is not None and i != tok.unk_token_id for i in ids)
    for s, i in zip(SPECIALS, ids):
        assert tok(s, add_special_tokens=False).input_ids == [i], s  # each special is one token
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    text = "Return the number of bytes in the buffer.\n\n    Raises ValueError if `n` < 0 — ünïcödé ok."
    enc = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(enc) == text  # byte-level BPE is lossless
    assert len(enc) < len(text) / 2  # and actually merges (common docstring words are single tokens)
    assert len(tok("Return the value", add_special_tokens=False).input_ids) == 3


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What does json.dumps do?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n<|im_start|>assistant\n"
    msgs2 = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "Serialize."}]
    text2 = tok.apply_chat_template(msgs2, tokenize=False)
    assert text2 == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat does json.dumps do?<|im_end|>\n"
                     "<|im_start|>assistant\nSerialize.<|im_end|>\n")
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


PROMPTS = ["Return the", "This module provides", "Raise ValueError if", "Create a new", "If the"]


def test_greedy_output_is_real_words(model, tok, words):
    """Greedy continuations of docstring-like prompts are made of words of the training corpus.
    The model often ends a docstring after one sentence (EOS), so words are pooled over several prompts."""
    outs = {p: greedy(model, tok, p, 32)[1] for p in PROMPTS}
    found = []
    for p, text in outs.items():
        ws = [w for raw in text.split() if (w := normalize_word(raw))]
        assert len(ws) >= 2, f"{p!r} -> {text!r}: too few words"
        found += ws
    assert len(found) >= 15, outs
    known = [w for w in found if w in words]
    assert len(known) / len(found) >= 0.8, f"unknown words {set(found) - words} in {outs}"
    assert len(set(found)) >= 10, f"degenerate output {outs}"


def test_chat_answer_is_words_and_ends(model, tok, words):
    text = tok.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                   tokenize=False, add_generation_prompt=True)
    new, answer = greedy(model, tok, text, 64)
    found = [w for raw in answer.split() if (w := normalize_word(raw))]
    assert len(found) >= 3 and sum(w in words for w in found) / len(found) >= 0.8, answer
    assert set(new) & set(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])), \
        f"no end-of-turn within 64 tokens: {answer!r}"


def test_model_beats_unigram_on_stdlib_docstrings(model, tok):
    """The trained model predicts docstring text far better than chance (ln 4096 = 8.3 nats/token)."""
    docs = [json.dumps.__doc__, os.path.join.__doc__, math.gcd.__doc__, Path.__doc__]
    text = "\n\n".join(d.strip() for d in docs if d)
    ids = tok(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.5, loss


# --------------------------------------------------------------------------------- Qwen3-0.6B config
def test_qwen3_06b_config():
    assert not list(Q06.glob("*.safetensors")) and not list(Q06.glob("*.bin")), "architecture only, no weights"
    cfg = AutoConfig.from_pretrained(Q06, local_files_only=True)
    facts = dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)
    for k, v in facts.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    assert cfg.architectures == ["Qwen3ForCausalLM"]
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    assert theta == 1_000_000
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    assert dtype in (torch.bfloat16, "bfloat16")
    gen = GenerationConfig.from_pretrained(Q06, local_files_only=True)
    assert set(gen.eos_token_id) == {151645, 151643}
    # Parameter count without allocating: 0.6B with tied embeddings.
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == 596_049_920, n


def test_loads_with_this_package_equal_to_hf():
    "The embedded model loads with nanovllm_lit's own loader (bf16 on disk -> fp32) and gives HF's logits."
    from nanovllm_lit.models.qwen3 import Qwen3ForCausalLM
    from nanovllm_lit.utils.context import reset_context, set_context
    from nanovllm_lit.utils.loader import load_model

    tok = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    ids = torch.tensor(tok("Return the number of items in the given sequence.").input_ids)
    ours = Qwen3ForCausalLM(AutoConfig.from_pretrained(TINY, local_files_only=True))
    load_model(ours, str(TINY))
    hf = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, local_files_only=True).eval()
    n = len(ids)
    cu = torch.tensor([0, n], dtype=torch.int32)
    set_context(True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
    try:
        with torch.no_grad():
            logits = ours(ids, torch.arange(n)) @ ours.lm_head.weight.T
            ref = hf(ids[None]).logits[0]
    finally:
        reset_context()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_engine_generates_like_hf_on_embedded_model():
    "LLM.generate on the embedded model (strings in, text out) gives HF's greedy tokens, stopping at an EOS id."
    from nanovllm_lit import LLM, SamplingParams

    prompts = ["Return the number of", "Create a new"]
    llm = LLM(str(TINY), enforce_eager=True)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    finally:
        llm.exit()
    tok = AutoTokenizer.from_pretrained(TINY, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32, local_files_only=True).eval()
    eos = set(GenerationConfig.from_pretrained(TINY, local_files_only=True).eos_token_id)
    for p, o in zip(prompts, outs):
        ids = tok(p, return_tensors="pt").input_ids
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        stop = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))  # the engine stops after an EOS id
        assert o["token_ids"] == ref[:stop], (p, o["token_ids"], ref)
        assert o["text"] == tok.decode(o["token_ids"], skip_special_tokens=True) or o["text"] == tok.decode(o["token_ids"])
