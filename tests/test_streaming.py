"""Stop strings, stop tokens, finish reasons, logprobs and generate_stream through the engine (chapter 07b)."""
import random
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanovllm_lit import LLM, SamplingParams
from nanovllm_lit.engine.streaming import OutputText
from nanovllm_lit.demo import default_model_dir

transformers.utils.logging.disable_progress_bar()
PROMPTS = ["Return the number of", "The default value of the timeout", "Create a new"]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(str(default_model_dir()), device="cpu", dtype="float32", kvcache_block_size=16)
    yield engine
    engine.exit()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def test_output_text_pieces_add_up_and_never_split_a_character(tok):
    rng = random.Random(0)
    alphabet = "aé😀 日本\n.xyzÀß"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = tok.encode(text)
        out, pieces = OutputText(tok), []
        for i in ids:
            out.add([i]); pieces.append(out.take())
        pieces.append(out.flush())
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
    # arbitrary token ids (invalid UTF-8 included): pieces still add up to the full decode
    for _ in range(100):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        out, pieces = OutputText(tok), []
        for i in ids:
            out.add([i]); pieces.append(out.take())
        pieces.append(out.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stream_equals_generate(llm):
    params = [SamplingParams(temperature=0, max_tokens=30), SamplingParams(temperature=0, max_tokens=7),
              SamplingParams(temperature=0, max_tokens=40, stop=["the file"])]
    whole = llm.generate(PROMPTS, params, use_tqdm=False)
    ids, texts, reasons = {i: [] for i in range(3)}, {i: "" for i in range(3)}, {}
    for piece in llm.generate_stream(PROMPTS, params):
        assert piece["index"] not in reasons                       # nothing after a finish
        ids[piece["index"]] += piece["token_ids"]; texts[piece["index"]] += piece["text"]
        if piece["finish_reason"]: reasons[piece["index"]] = piece["finish_reason"]
    for i, r in enumerate(whole):
        assert (ids[i], texts[i], reasons[i]) == (r["token_ids"], r["text"], r["finish_reason"])
    assert whole[1]["finish_reason"] == "length" and len(whole[1]["token_ids"]) == 7


def test_stop_string_spanning_tokens(llm, tok):
    free = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    ids = free["token_ids"]
    pieces = [tok.decode([t]) for t in ids]
    k = next(k for k in range(2, len(ids)) if pieces[k].strip() and pieces[k + 1].strip())
    stop = pieces[k][-2:] + pieces[k + 1][:2]                  # ends inside one token, starts inside another
    prefix_text = free["text"]
    assert stop in prefix_text
    r = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)[0]
    assert r["finish_reason"] == "stop" and r["text"] == prefix_text[:prefix_text.index(stop)]
    assert r["token_ids"] == ids[:len(r["token_ids"])] and len(r["token_ids"]) < len(ids)


def test_stop_token_ids_and_blocks_freed(llm):
    free = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]["token_ids"]
    r = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[free[4]],
                                                 ignore_eos=True), use_tqdm=False)[0]
    assert r["finish_reason"] == "stop" and r["token_ids"] == free[:free.index(free[4]) + 1]
    bm = llm.scheduler.block_manager
    assert bm.num_free_blocks == len(bm.blocks)


def test_breaking_out_of_a_stream_aborts_the_rest(llm):
    bm = llm.scheduler.block_manager
    for n_taken in (1, 3):
        stream = llm.generate_stream(PROMPTS, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        for _, piece in zip(range(n_taken), stream): pass
        assert bm.num_free_blocks < len(bm.blocks)
        stream.close()
        assert bm.num_free_blocks == len(bm.blocks) and llm.is_finished()
    # the engine serves normally afterwards
    assert llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]["token_ids"]


def test_logprobs_equal_hf_log_softmax(llm):
    n = 6
    r = llm.generate(PROMPTS[:1], SamplingParams(temperature=0.8, seed=3, max_tokens=n, logprobs=3), use_tqdm=False)[0]
    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + r["token_ids"]])).logits[0].double(), -1)
    for step, (token, lp) in enumerate(zip(r["token_ids"], r["logprobs"])):
        row = logp[len(prompt) - 1 + step]
        top = row.topk(3).indices.tolist()
        assert set(lp) == set(top) | {token}
        for t, v in lp.items(): assert abs(v - row[t].item()) < 1e-4, (step, t, v, row[t].item())
