"""Bad input gets a clear error, checked before anything is spawned or loaded (issue 9, part C).

Config: `tensor_parallel_size` against the model's head counts, vocab and MLP width (the rules of the layers);
the checkpoint's architecture (against the model registry); `max_position_embeddings`; a malformed
`generation_config.json`.
Loader: a malformed `model.safetensors.index.json`, an index pointing outside the model directory, and NaN/inf
weights (a warning naming the parameter)."""
import itertools
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, GPT2Config, Qwen3Config

import nanovllm_lit.engine.llm_engine as llm_engine
from nanovllm_lit.config import Config, check_architecture, read_eos_token_ids
from nanovllm_lit.layers.linear import fake_tp
from nanovllm_lit.models.qwen3 import Qwen3ForCausalLM
from nanovllm_lit.utils.loader import checkpoint_files, load_model, warn_non_finite
from nanovllm_lit.utils.testing import TINY_QWEN3_DEFAULTS, make_tiny_qwen3

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def config_dir(path, **overrides) -> str:
    "A directory with only a config.json: the tiny Qwen3's, with `overrides` (no `architectures`, as a bare Qwen3Config writes)."
    Qwen3Config(**{**TINY_QWEN3_DEFAULTS, **overrides}).save_pretrained(path)
    return str(path)


def edit_json(path, **changes):
    with open(path) as f: d = json.load(f)
    d.update(changes)
    with open(path, "w") as f: json.dump(d, f)


@pytest.fixture
def no_spawn(monkeypatch):
    "Make starting TP workers a test failure: the checks must come first."
    def spawn(*a, **k): raise AssertionError("workers were spawned before the config was checked")
    monkeypatch.setattr(llm_engine, "spawn_workers", spawn)


# ---------------------------------------------------------------- tensor_parallel_size vs the model
def test_tp_error_names_heads_and_valid_sizes():
    with pytest.raises(ValueError) as e:
        Config(str(ASSETS / "qwen3-0.6b"), device="cpu", tensor_parallel_size=3)
    assert str(e.value) == ("Config.tensor_parallel_size=3 does not divide the model's 16 attention heads; "
                            "use one of 1, 2, 4, 8")
    assert Config(str(ASSETS / "qwen3-0.6b"), device="cpu", tensor_parallel_size=8).tensor_parallel_size == 8


@pytest.mark.parametrize("overrides, tp, fragment", [
    ({}, 3, "4 attention heads; use one of 1, 2, 4"),
    ({}, 8, "4 attention heads; use one of 1, 2, 4"),
    (dict(num_attention_heads=6, num_key_value_heads=3), 2, "3 key/value heads"),
    (dict(num_attention_heads=12, num_key_value_heads=3), 4, "3 key/value heads"),
    (dict(vocab_size=255), 2, "vocab_size 255"),
    (dict(intermediate_size=130), 4, "intermediate_size 130; use one of 1, 2"),
])
def test_engine_refuses_tp_before_spawning(tmp_path, no_spawn, overrides, tp, fragment):
    d = config_dir(tmp_path / "m", **overrides)
    with pytest.raises(ValueError, match=f"tensor_parallel_size={tp}") as e:
        llm_engine.LLMEngine(d, device="cpu", tensor_parallel_size=tp)
    assert fragment in str(e.value)


def test_kv_heads_must_divide_heads(tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) must be a multiple of num_key_value_heads \\(3\\)"):
        Config(config_dir(tmp_path / "m", num_key_value_heads=3), device="cpu")


def _layers_accept(hf_config, tp) -> bool:
    try:
        with fake_tp(0, tp): Qwen3ForCausalLM(hf_config)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2), (8, 8), (12, 4), (12, 6)])
def test_config_accepts_exactly_the_tp_sizes_the_layers_build(tmp_path, heads, kv_heads):
    "Config's rule equals the layers' own checks (QKV split / kv replication, vocab, MLP), for every size 1..8."
    for vocab, inter in itertools.product((240, 252), (96, 100)):
        d = config_dir(tmp_path / f"h{heads}k{kv_heads}v{vocab}i{inter}", num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, intermediate_size=inter, hidden_size=32,
                       head_dim=8, num_hidden_layers=1)
        hf = AutoConfig.from_pretrained(d)
        for tp in range(1, 9):
            try: ok = Config(d, device="cpu", tensor_parallel_size=tp) is not None
            except ValueError: ok = False
            assert ok == _layers_accept(hf, tp), (heads, kv_heads, vocab, inter, tp)


# ---------------------------------------------------------------- the checkpoint's architecture
def test_gpt2_checkpoint_is_refused_clearly(tmp_path):
    GPT2Config().save_pretrained(tmp_path / "gpt2")                     # model_type gpt2, no architectures
    with pytest.raises(ValueError, match="model_type 'gpt2' and no architectures; nanovllm_lit can build only") as e:
        Config(str(tmp_path / "gpt2"), device="cpu")
    assert "Qwen3ForCausalLM" in str(e.value) and "config.json" in str(e.value)
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2-arch")
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        Config(str(tmp_path / "gpt2-arch"), device="cpu")
    assert "Qwen3ForCausalLM" in str(e.value)


def test_engine_refuses_gpt2_before_building_anything(tmp_path, no_spawn, monkeypatch):
    def runner(*a, **k): raise AssertionError("the model runner was started")
    monkeypatch.setattr(llm_engine, "ModelRunner", runner)
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        llm_engine.LLMEngine(str(tmp_path / "gpt2"), device="cpu")


@pytest.mark.parametrize("fields, fragment", [
    ({"model_type": "foo_bar"}, "model_type 'foo_bar'"),               # transformers does not know it either
    ({}, "model_type None"),                                            # neither field
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "['BertForMaskedLM']"),
    ({"architectures": ["GPT2LMHeadModel", "Qwen3ForCausalLM"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
])
def test_unsupported_architectures(tmp_path, fields, fragment):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match="nanovllm_lit can build only Qwen3ForCausalLM, ") as e:
        Config(str(tmp_path), device="cpu")
    assert fragment in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("archs", ["Qwen3ForCausalLM", [["Qwen3ForCausalLM"]], [3], {"a": 1}])
def test_malformed_architectures_field(tmp_path, archs):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": archs, "model_type": "qwen3"}))
    with pytest.raises(ValueError, match="architectures must be a list of class names"):
        Config(str(tmp_path), device="cpu")


def test_config_agrees_with_the_model_registry(tmp_path):
    "Config accepts what the model runner can build (the registry, chapter 15a), registered classes included."
    from nanovllm_lit.models import MODEL_REGISTRY, model_class_for, register_model
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        d = config_dir(tmp_path / name)
        edit_json(os.path.join(d, "config.json"), architectures=[name])
        assert model_class_for(Config(d, device="cpu").hf_config).__name__ == name
    d = config_dir(tmp_path / "mine")
    edit_json(os.path.join(d, "config.json"), architectures=["MyQwen3ForCausalLM"])
    with pytest.raises(ValueError, match="MyQwen3ForCausalLM"):
        Config(d, device="cpu")
    register_model("MyQwen3ForCausalLM", type("MyQwen3ForCausalLM", (Qwen3ForCausalLM,), {}))
    try: assert Config(d, device="cpu").hf_config.architectures == ["MyQwen3ForCausalLM"]
    finally: del MODEL_REGISTRY["MyQwen3ForCausalLM"]


def test_supported_architectures_load(tmp_path):
    d = config_dir(tmp_path / "bare")                                   # no architectures, model_type qwen3
    assert "architectures" not in json.loads(Path(d, "config.json").read_text())
    assert Config(d, device="cpu").hf_config.model_type == "qwen3"
    for asset in ("tiny-qwen3", "qwen3-0.6b"):
        assert Config(str(ASSETS / asset), device="cpu").hf_config.architectures == ["Qwen3ForCausalLM"]
    assert Config(make_tiny_qwen3(tmp_path / "tiny"), device="cpu").hf_config.architectures == ["Qwen3ForCausalLM"]
    assert check_architecture({"architectures": None, "model_type": "qwen3"}) == "Qwen3ForCausalLM"
    assert check_architecture({"architectures": [], "model_type": "qwen3"}) == "Qwen3ForCausalLM"


@pytest.mark.parametrize("text", ['{"model_type": "qwen3",', "[1, 2]", "\xff\xfe"])
def test_config_json_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="config.json"):
        Config(str(tmp_path), device="cpu")


# ---------------------------------------------------------------- max_position_embeddings
@pytest.mark.parametrize("value", [0, -3, "abc", None, 1.5, True])
def test_max_position_embeddings_must_be_a_positive_int(tmp_path, value):
    d = config_dir(tmp_path / "m")
    edit_json(os.path.join(d, "config.json"), max_position_embeddings=value)
    with pytest.raises(ValueError, match="max_position_embeddings") as e:
        Config(d, device="cpu")
    assert "config.json" in str(e.value)


def test_max_position_embeddings_reaches_our_check(tmp_path):
    "Whatever transformers lets through (its type checks vary by version), our own check names the field."
    from nanovllm_lit.config import _model_int
    from types import SimpleNamespace
    for v in (0, -1, "abc", None, 2.0, False):
        with pytest.raises(ValueError, match="max_position_embeddings must be an int >= 1"):
            _model_int(SimpleNamespace(max_position_embeddings=v), "max_position_embeddings", str(tmp_path))
    assert _model_int(SimpleNamespace(max_position_embeddings=7), "max_position_embeddings", "") == 7


# ---------------------------------------------------------------- generation_config.json
@pytest.mark.parametrize("text, fragment", [
    ("{oops", "not valid JSON"),
    ('["eos"]', "JSON object"),
    ('{"eos_token_id": "abc"}', "'abc'"),
    ('{"eos_token_id": [1, "x"]}', "[1, 'x']"),
    ('{"eos_token_id": [1, 2.5]}', "2.5"),
    ('{"eos_token_id": true}', "True"),
    ('{"eos_token_id": -2}', "-2"),
    ('{"eos_token_id": {"a": 1}}', "{'a': 1}"),
])
def test_malformed_generation_config(tmp_path, text, fragment):
    d = config_dir(tmp_path / "m")
    Path(d, "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match="generation_config.json") as e:
        Config(d, device="cpu")
    assert fragment in str(e.value)


def test_good_generation_configs_still_read(tmp_path):
    d = config_dir(tmp_path / "m")
    for text, ids in [('{"eos_token_id": 5}', {5}), ('{"eos_token_id": [5, 6]}', {5, 6}), ("{}", {1}),
                      ('{"eos_token_id": null}', {1}), ('{"eos_token_id": []}', set())]:
        Path(d, "generation_config.json").write_text(text)
        assert Config(d, device="cpu").eos_token_ids == ids, text
    assert read_eos_token_ids(d) == set()                              # no hf_config to fall back on


# ---------------------------------------------------------------- the index json
def index_dir(tmp_path, weight_map=None, text=None, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "a.safetensors").write_bytes(b"")
    (d / "model.safetensors.index.json").write_text(text if text is not None else json.dumps({"weight_map": weight_map}))
    return d


@pytest.mark.parametrize("text, fragment", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "weight_map"),
    ('{"metadata": {"total_size": 1}}', "weight_map"),
    ('{"weight_map": ["a.safetensors"]}', "weight_map"),
    ('{"weight_map": {"x.weight": 3}}', "weight_map"),
    ('{"weight_map": {}}', "weight_map"),
])
def test_malformed_index(tmp_path, text, fragment):
    d = index_dir(tmp_path, text=text)
    with pytest.raises(ValueError, match="model.safetensors.index.json") as e:
        checkpoint_files(d)
    assert fragment in str(e.value)


def test_index_cannot_point_outside_the_model_dir(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.safetensors").write_bytes(b"")
    for i, name in enumerate(["../outside.safetensors", str(outside), "sub/../../outside.safetensors",
                              "link/a.safetensors"]):
        d = index_dir(tmp_path, {"x.weight": name}, name=f"m{i}")
        (d / "link").symlink_to(tmp_path / "elsewhere")                # a directory that leads out
        with pytest.raises(ValueError, match="safetensors files must lie inside the model directory"):
            checkpoint_files(d)


def test_hub_cache_layout_still_loads(tmp_path):
    "The Hugging Face cache keeps snapshots/<rev>/<file> as links to ../../blobs/<hash>: the file may be a link."
    src = make_tiny_qwen3(tmp_path / "src", num_shards=2)
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True); snap.mkdir(parents=True)
    for f in os.listdir(src):
        (blobs / f).write_bytes(Path(src, f).read_bytes())
        (snap / f).symlink_to(Path("..", "..", "blobs", f))
    assert [os.path.basename(f) for f in checkpoint_files(snap)] == sorted(
        f for f in os.listdir(src) if f.endswith(".safetensors"))
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(snap))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(model, snap)


def test_index_pointing_outside_is_refused_by_load_model(tmp_path):
    d = make_tiny_qwen3(tmp_path / "m", num_shards=2)
    other = make_tiny_qwen3(tmp_path / "other", num_shards=2, seed=1)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f: idx = json.load(f)
    idx["weight_map"] = {k: f"../other/{v}" for k, v in idx["weight_map"].items()}
    with open(index, "w") as f: json.dump(idx, f)
    with pytest.raises(ValueError, match="inside the model directory"):
        load_model(Qwen3ForCausalLM(AutoConfig.from_pretrained(d)), d)
    assert os.path.isdir(other)


# ---------------------------------------------------------------- NaN / inf weights
def poisoned(path, **edits):
    d = make_tiny_qwen3(path)
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    for name, (index, value) in edits.items(): sd[name][index] = value
    save_file(sd, f)
    return d


def test_nan_weights_warn_naming_the_parameter(tmp_path):
    d = poisoned(tmp_path / "nan", **{"model.layers.1.mlp.down_proj.weight": ((3, 5), float("nan")),
                                      "model.layers.0.self_attn.k_proj.weight": ((0, 0), float("-inf"))})
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(d))
    with pytest.warns(RuntimeWarning, match="NaN or inf") as rec:
        load_model(model, d)
    msg = str(rec[0].message)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.layers.0.self_attn.qkv_proj.weight" in msg
    assert "2 parameter(s)" in msg and d in msg
    assert torch.isnan(model.model.layers[1].mlp.down_proj.weight).any()     # loaded all the same


def test_nan_weights_warn_through_the_engine(tmp_path):
    d = poisoned(tmp_path / "nan", **{"model.norm.weight": ((0,), float("nan"))})
    with pytest.warns(RuntimeWarning, match="model.norm.weight"):
        engine = llm_engine.LLMEngine(d, device="cpu", max_model_len=64, max_num_batched_tokens=64,
                                      num_kvcache_blocks=8)
    engine.exit()


def test_overflow_of_the_dtype_cast_warns(tmp_path):
    "fp32 weights above float16's range load as inf into a float16 model: the check sees the parameters."
    d = poisoned(tmp_path / "big", **{"model.layers.0.mlp.up_proj.weight": ((1, 1), 1e6)})
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(d)).half()
    with pytest.warns(RuntimeWarning, match="gate_up_proj"):
        load_model(model, d)


def test_clean_weights_do_not_warn(tmp_path):
    d = make_tiny_qwen3(tmp_path / "ok", num_shards=3)
    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(d))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(model, d)
    with torch.no_grad(): model.lm_head.weight.fill_(3e38)             # finite, though a float32 sum overflows
    assert warn_non_finite(model) == []
