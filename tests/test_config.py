"""Config and SamplingParams: validation errors name the field, defaults resolve, checkpoint metadata is read both
the transformers 4.x and 5.x way, and Config survives pickling (it is sent to TP workers)."""
import json, math, os, pickle
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import Qwen3Config

from nanovllm_lit.config import Config, checkpoint_dtype, read_eos_token_ids
from nanovllm_lit.sampling_params import SamplingParams


def make_model_dir(path, gen_eos=(2, 7), **overrides):
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=512, eos_token_id=2)
    kw.update(overrides)
    Qwen3Config(**kw).save_pretrained(path)
    if gen_eos is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": list(gen_eos) if len(gen_eos) != 1 else gen_eos[0]}, f)
    return str(path)


@pytest.fixture
def model_dir(tmp_path):
    return make_model_dir(tmp_path / "m")


# ---------------------------------------------------------------- SamplingParams
def test_sampling_defaults_and_greedy():
    sp = SamplingParams()
    assert (sp.temperature, sp.max_tokens, sp.ignore_eos) == (1.0, 64, False)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.0).temperature == 0.0


@pytest.mark.parametrize("t", [-1e-9, -1, float("nan"), float("inf"), "1", None, True])
def test_sampling_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=t)


@pytest.mark.parametrize("m", [0, -1, 1.0, 2.5, "3", None, True])
def test_sampling_bad_max_tokens(m):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=m)


def test_sampling_bad_ignore_eos():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=1)


@settings(max_examples=200, deadline=None)
@given(t=st.floats(allow_nan=True, allow_infinity=True), m=st.integers(-5, 10**6))
def test_sampling_accepts_exactly_the_valid_values(t, m):
    valid = math.isfinite(t) and t >= 0 and m >= 1
    if valid:
        sp = SamplingParams(temperature=t, max_tokens=m)
        assert sp.temperature == t and sp.max_tokens == m and sp.greedy == (t == 0)
    else:
        with pytest.raises(ValueError):
            SamplingParams(temperature=t, max_tokens=m)


# ---------------------------------------------------------------- checkpoint metadata
def test_checkpoint_dtype_both_transformers_spellings():
    assert checkpoint_dtype(SimpleNamespace(dtype=torch.bfloat16)) == "bfloat16"          # 5.x
    assert checkpoint_dtype(SimpleNamespace(torch_dtype=torch.float16)) == "float16"      # 4.x
    assert checkpoint_dtype(SimpleNamespace(torch_dtype="float32")) == "float32"
    assert checkpoint_dtype(SimpleNamespace(dtype=None)) is None


def test_checkpoint_dtype_from_a_4x_style_config_json(tmp_path):
    # a config.json written by transformers 4.x says "torch_dtype"; whatever transformers is installed reads it
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "torch_dtype": "float16",
                                               "max_position_embeddings": 64, "eos_token_id": 5}))
    cfg = Config(str(d), device="cpu")
    assert checkpoint_dtype(cfg.hf_config) == "float16"
    assert cfg.dtype == "float32"                    # CPU default regardless of the checkpoint
    assert cfg.eos_token_ids == {5} and cfg.max_model_len == 64


def test_eos_sources(tmp_path):
    d = make_model_dir(tmp_path / "a", gen_eos=(2, 7))
    assert Config(d, device="cpu").eos_token_ids == {2, 7}
    d = make_model_dir(tmp_path / "b", gen_eos=(9,))                 # an int in generation_config.json
    assert Config(d, device="cpu").eos_token_ids == {9}
    d = make_model_dir(tmp_path / "c", gen_eos=None)                 # no generation_config.json
    assert Config(d, device="cpu").eos_token_ids == {2}
    d = make_model_dir(tmp_path / "e", gen_eos=None, eos_token_id=[3, 4])
    assert read_eos_token_ids(d, Config(d, device="cpu").hf_config) == {3, 4}
    d = make_model_dir(tmp_path / "f", gen_eos=None, eos_token_id=None)
    assert Config(d, device="cpu").eos_token_ids == frozenset()
    assert Config(d, device="cpu", eos_token_ids=[1, 1, 5]).eos_token_ids == {1, 5}


# ---------------------------------------------------------------- Config
def test_config_cpu_defaults(model_dir):
    cfg = Config(model_dir, device="cpu")
    assert (cfg.device, cfg.dtype, cfg.attention_backend, cfg.kvcache_block_size) == ("cpu", "float32", "torch", 16)
    assert cfg.max_model_len == 512 and cfg.num_kvcache_blocks is None and cfg.tensor_parallel_size == 1
    assert cfg.hf_config.model_type == "qwen3"


def test_config_default_device_follows_torch(model_dir):
    cfg = Config(model_dir)
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_config_clips_max_model_len(model_dir):
    assert Config(model_dir, device="cpu", max_model_len=100_000, max_num_batched_tokens=512).max_model_len == 512
    assert Config(model_dir, device="cpu", max_model_len=100, max_num_batched_tokens=100).max_model_len == 100


def test_config_pickles(model_dir):
    cfg = Config(model_dir, device="cpu", num_kvcache_blocks=7)
    cfg2 = pickle.loads(pickle.dumps(cfg))
    for k, v in vars(cfg).items():
        if k != "hf_config": assert getattr(cfg2, k) == v, k
    assert cfg2.hf_config.to_dict() == cfg.hf_config.to_dict()


def test_config_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Config(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Config(str(tmp_path / "empty"))


@pytest.mark.parametrize("kw, field", [
    (dict(max_model_len=256, max_num_batched_tokens=255), "max_num_batched_tokens"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=9), "tensor_parallel_size"),
    (dict(tensor_parallel_size=2.0), "tensor_parallel_size"),
    (dict(kvcache_block_size=0), "kvcache_block_size"),
    (dict(kvcache_block_size=15), "kvcache_block_size"),
    (dict(kvcache_block_size=40), "kvcache_block_size"),
    (dict(kvcache_block_size=-16), "kvcache_block_size"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.01), "gpu_memory_utilization"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
    (dict(cpu_kvcache_bytes=0), "cpu_kvcache_bytes"),
    (dict(attention_backend="sdpa"), "attention_backend"),
    (dict(attention_backend="flash-attn"), "cuda"),
    (dict(device="mps"), "device"),
    (dict(dtype="float64"), "dtype"),
])
def test_config_errors_name_the_field(model_dir, kw, field):
    kw = {"device": "cpu", **kw}
    with pytest.raises(ValueError, match=field):
        Config(model_dir, **kw)


@pytest.mark.parametrize("bs", [16, 32, 48, 256, 1024])
def test_config_block_size_any_multiple_of_16(model_dir, bs):
    assert Config(model_dir, device="cpu", kvcache_block_size=bs).kvcache_block_size == bs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_config_cuda_requested_without_gpu(model_dir):
    with pytest.raises(ValueError, match="cuda"):
        Config(model_dir, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_config_cuda_defaults(model_dir):
    cfg = Config(model_dir)
    assert cfg.device == "cuda" and cfg.kvcache_block_size == 256 and cfg.attention_backend in ("triton", "flash-attn")
    n = torch.cuda.device_count()
    if n < 8:
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            Config(model_dir, tensor_parallel_size=n + 1)


def test_config_triton_on_cpu_needs_the_interpreter(model_dir, monkeypatch):
    "On a machine with a GPU, Triton cannot take CPU tensors unless its interpreter is on: a clear error, not a crash."
    if not torch.cuda.is_available():                                    # here the interpreter is on by itself
        assert Config(model_dir, device="cpu", attention_backend="triton").attention_backend == "triton"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # as on a GPU machine
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs Triton's interpreter"):
        Config(model_dir, device="cpu", attention_backend="triton")
    assert Config(model_dir, device="cpu").attention_backend == "torch"     # the default on the CPU still works
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Config(model_dir, device="cpu", attention_backend="triton").attention_backend == "triton"
