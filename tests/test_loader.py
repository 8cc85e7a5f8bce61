"""`load_model`: shards, tied embeddings, fused names, tensor-parallel shards, and errors naming the tensor."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig
from transformers import Qwen3ForCausalLM as HFQwen3

from nanovllm_lit.layers.linear import fake_tp
from nanovllm_lit.models.qwen3 import Qwen3ForCausalLM
from nanovllm_lit.utils.loader import checkpoint_files, load_model, map_name
from nanovllm_lit.utils.testing import make_tiny_qwen3, save_safetensors_shards

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


def build(path):
    return Qwen3ForCausalLM(AutoConfig.from_pretrained(path))


def expected_weights(hf_sd, num_layers):
    "HF's state dict in our naming: fused q/k/v and gate/up concatenated."
    out = dict(hf_sd)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([out.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([out.pop(p + "mlp.gate_proj.weight"),
                                                        out.pop(p + "mlp.up_proj.weight")])
    return out


def assert_loaded_like_hf(model, path):
    hf = HFQwen3.from_pretrained(path)
    exp = expected_weights(hf.state_dict(), hf.config.num_hidden_layers)
    got = model.state_dict()
    assert set(got) == set(exp)
    for k in exp: torch.testing.assert_close(got[k], exp[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("num_shards", [1, 3, 7])
@pytest.mark.parametrize("tied", [False, True])
def test_shards_and_tying(tmp_path, num_shards, tied):
    path = make_tiny_qwen3(tmp_path, num_shards=num_shards, tie_word_embeddings=tied)
    assert len(checkpoint_files(path)) == num_shards
    model = build(path)
    load_model(model, path)
    assert_loaded_like_hf(model, path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_tied_checkpoint_with_explicit_lm_head(tmp_path):
    "Some tied checkpoints store lm_head.weight as well; it is accepted (same tensor)."
    path = make_tiny_qwen3(tmp_path, tie_word_embeddings=True)
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f); sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone(); save_file(sd, f)
    model = build(path)
    load_model(model, path)
    assert_loaded_like_hf(model, path)


def test_fused_names_roundtrip(tmp_path):
    "A checkpoint written from our own (fused) state dict loads back: fused layers split it themselves."
    src = make_tiny_qwen3(tmp_path / "src")
    model = build(src); load_model(model, src)
    dst = tmp_path / "fused"; dst.mkdir()
    save_safetensors_shards(model.state_dict(), dst, num_shards=2)
    (dst / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    again = build(dst); load_model(again, dst)
    for k, v in model.state_dict().items(): torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0)


def test_index_lists_files(tmp_path):
    "With an index json, only the files it names are read (a stray extra file would be unexpected)."
    path = make_tiny_qwen3(tmp_path, num_shards=2)
    save_file({"junk": torch.zeros(1)}, os.path.join(path, "consolidated.safetensors"))
    assert [os.path.basename(f) for f in checkpoint_files(path)] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    load_model(build(path), path)
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FileNotFoundError, match="model-00009-of-00009"):
        checkpoint_files(path)


def test_no_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint_files(tmp_path)


def test_map_name_whole_components():
    pm = Qwen3ForCausalLM.packed_modules_mapping
    assert map_name("model.layers.0.mlp.gate_up_proj.weight", pm) == ("model.layers.0.mlp.gate_up_proj.weight", None)
    assert map_name("model.layers.10.self_attn.v_proj.bias", pm) == ("model.layers.10.self_attn.qkv_proj.bias", "v")


def doctor(tmp_path, edit, **kw):
    path = make_tiny_qwen3(tmp_path, **kw)
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f); edit(sd); save_file(sd, f)
    return path


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                  "model.layers.0.self_attn.q_norm.weight", "model.embed_tokens.weight",
                                  "lm_head.weight"])
def test_missing_named(tmp_path, name):
    path = doctor(tmp_path, lambda sd: sd.pop(name))
    with pytest.raises(ValueError, match="missing") as e:
        load_model(build(path), path)
    assert name in str(e.value)
    assert str(e.value).count("model.layers") <= 1                      # only the culprit is listed


def test_missing_lm_head_when_config_untied(tmp_path):
    tied = make_tiny_qwen3(tmp_path / "tied", tie_word_embeddings=True)
    untied = make_tiny_qwen3(tmp_path / "untied")
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        load_model(build(untied), tied)


def test_unexpected_named(tmp_path):
    path = doctor(tmp_path, lambda sd: sd.update({"model.layers.5.self_attn.q_proj.weight": torch.zeros(64, 64),
                                                  "model.extra_head.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected") as e:
        load_model(build(path), path)
    assert "model.layers.5.self_attn.q_proj.weight" in str(e.value) and "model.extra_head.weight" in str(e.value)


def test_unexpected_and_missing_reported_together(tmp_path):
    def rename(sd): sd["model.norm.weight_typo"] = sd.pop("model.norm.weight")
    path = doctor(tmp_path, rename)
    with pytest.raises(ValueError) as e:
        load_model(build(path), path)
    assert "unexpected" in str(e.value) and "model.norm.weight_typo" in str(e.value)
    assert "missing" in str(e.value) and "model.norm.weight" in str(e.value)


def test_rotary_inv_freq_ignored(tmp_path):
    path = doctor(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(build(path), path)


@pytest.mark.parametrize("name,shape", [
    ("model.norm.weight", (63,)),
    ("model.layers.0.self_attn.q_norm.weight", (32,)),
    ("model.layers.1.self_attn.v_proj.weight", (32, 60)),
    ("model.layers.0.self_attn.q_proj.weight", (60, 64)),
    ("model.layers.1.mlp.gate_proj.weight", (128, 32)),
    ("model.layers.0.mlp.down_proj.weight", (64, 127)),
    ("model.embed_tokens.weight", (255, 64)),
    ("lm_head.weight", (256, 65)),
])
def test_misshaped_named(tmp_path, name, shape):
    path = doctor(tmp_path, lambda sd: sd.update({name: torch.ones(shape)}))
    with pytest.raises(ValueError) as e:
        load_model(build(path), path)
    assert repr(name) in str(e.value) and str(shape) in str(e.value)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards(tmp_path, tp):
    "Under fake_tp each rank loads its own slice; concatenated over ranks they give the full weights."
    path = make_tiny_qwen3(tmp_path, num_attention_heads=4, num_key_value_heads=2, num_shards=2)
    hf = HFQwen3.from_pretrained(path).state_dict()
    ranks = []
    for r in range(tp):
        with fake_tp(r, tp):
            m = build(path)
        load_model(m, path)
        ranks.append(m.state_dict())
    p = "model.layers.0."
    torch.testing.assert_close(torch.cat([s[p + "self_attn.o_proj.weight"] for s in ranks], 1),
                               hf[p + "self_attn.o_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s[p + "mlp.down_proj.weight"] for s in ranks], 1),
                               hf[p + "mlp.down_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([s["model.embed_tokens.weight"] for s in ranks]),
                               hf["model.embed_tokens.weight"], rtol=0, atol=0)
    q_local = 4 // tp * 16
    torch.testing.assert_close(torch.cat([s[p + "self_attn.qkv_proj.weight"][:q_local] for s in ranks]),
                               hf[p + "self_attn.q_proj.weight"], rtol=0, atol=0)
    for s in ranks:   # replicated norms
        torch.testing.assert_close(s[p + "self_attn.k_norm.weight"], hf[p + "self_attn.k_norm.weight"], rtol=0, atol=0)
