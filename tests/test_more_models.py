"""Llama, Qwen2 and Mistral through the whole engine (chapter 15a): the registry picks the class, greedy tokens
equal HF transformers' `generate`, and tensor parallelism over gloo on the CPU (2 and 4 ranks) gives the tokens
of one rank. The layer-level comparisons with HF live in test_hf_equality.py."""
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from nanovllm_lit import SamplingParams
from nanovllm_lit.engine.llm_engine import LLMEngine
from nanovllm_lit.models import MODEL_REGISTRY, LlamaForCausalLM, model_class_for, register_model
from nanovllm_lit.utils.testing import make_tiny_checkpoint

transformers.utils.logging.disable_progress_bar()
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    "llama-llama3rope-tied": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3, rope_theta=5e5, tie_word_embeddings=True,
                                                       initializer_range=0.2)),
    "qwen2-bias": ("Qwen2ForCausalLM", dict(initializer_range=0.2)),
    "mistral-gqa4": ("MistralForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                               initializer_range=0.2)),
}
SMALL = dict(device="cpu", max_model_len=128, max_num_batched_tokens=256, max_num_seqs=4, num_kvcache_blocks=32)
PROMPTS = [[5, 17, 42, 9, 100, 3, 77, 31, 8, 250, 11, 64, 5, 90, 91, 92, 93, 7], [60, 61, 62]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def ckpt(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    return arch, make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, **kw)


def hf_greedy(path, prompt, n):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def generate(path, **kw):
    with LLMEngine(path, **SMALL, **kw) as llm:
        assert type(llm.model_runner.model) is model_class_for(llm.config.hf_config)   # the registry's choice
        return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_engine_greedy_equals_hf_generate(ckpt):
    arch, path = ckpt
    ours = generate(path)
    assert ours == [hf_greedy(path, p, 10) for p in PROMPTS]
    assert len({t for o in ours for t in o}) > 4                          # not a degenerate repeat


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_one_rank(ckpt, tp):
    arch, path = ckpt
    torch.set_num_threads(1)
    assert generate(path, tensor_parallel_size=tp) == generate(path)


def test_registry_picks_a_registered_class(tmp_path):
    class TracedLlama(LlamaForCausalLM):
        built = 0
        def __init__(self, hf_config):
            super().__init__(hf_config)
            TracedLlama.built += 1
    path = make_tiny_checkpoint(tmp_path / "custom", "LlamaForCausalLM", initializer_range=0.2)
    register_model("LlamaForCausalLM", TracedLlama)
    try:
        assert generate(path) == [hf_greedy(path, p, 10) for p in PROMPTS] and TracedLlama.built == 1
    finally:
        register_model("LlamaForCausalLM", LlamaForCausalLM)
    assert model_class_for(transformers.LlamaConfig(architectures=["LlamaForCausalLM"])) is LlamaForCausalLM
    assert set(MODEL_REGISTRY) >= {"Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


def test_config_refuses_what_the_model_cannot_compute(tmp_path):
    "Checked by Config, before any worker is spawned or any weight loaded."
    import json
    from nanovllm_lit.config import Config
    mistral = make_tiny_checkpoint(tmp_path / "mistral", "MistralForCausalLM")
    cfg = json.loads((tmp_path / "mistral" / "config.json").read_text())
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({**cfg, "sliding_window": 32}))
    with pytest.raises(ValueError, match="sliding_window=32"): Config(mistral, device="cpu")
    gelu = make_tiny_checkpoint(tmp_path / "gelu", "LlamaForCausalLM", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"): Config(gelu, device="cpu")
    dyn = make_tiny_checkpoint(tmp_path / "dyn", "LlamaForCausalLM", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic' is not supported"): Config(dyn, device="cpu")
