# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Conversion from Hugging Face, Meta and back, checked against transformers' LlamaForCausalLM logits."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_qa.checkpoints.convert_hf import (
    config_from_hf,
    config_to_hf,
    convert_hf_checkpoint,
    convert_lit_to_hf,
    hf_to_lit_key,
    lit_to_hf_key,
)
from lit_qa.checkpoints.convert_meta import convert_meta_checkpoint, intermediate_size
from lit_qa.checkpoints.folder import load_model, load_state_dict
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config, configs

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
HF_CASES = {
    "multi-head": {},
    "grouped-query": {"num_key_value_heads": 2},
    "tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    # head_size 8 gives RoPE wavelengths 6.3, 63, 628, 6283: with original length 128 they fall in the
    # high (kept), medium (interpolated) and low (scaled) frequency bands of Llama-3.1's scaling.
    "llama3-rope": {
        "num_key_value_heads": 2,
        "rope_scaling": dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=128,
        ),
        "max_position_embeddings": 512,
    },  # fmt: skip
}


def make_hf_model(**overrides) -> transformers.LlamaForCausalLM:
    """A tiny random LlamaForCausalLM; norm weights are randomised too so that a swapped norm shows."""
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=256, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**values, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits  # lit-qa GPT or transformers


def assert_same_logits(expected_model, actual_model, seq_len: int = 40) -> None:
    idx = torch.randint(0, 100, (2, seq_len))
    torch.testing.assert_close(logits(actual_model, idx), logits(expected_model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_lit_matches_transformers(case, tmp_path):
    hf_model = make_hf_model(**HF_CASES[case])
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    model, config = load_model(tmp_path / "lit")
    assert config.name == "hf"
    assert config.tie_embeddings == (case == "tied")
    assert (case == "llama3-rope") == (config.rope_scaling is not None)
    assert (tmp_path / "lit" / "generation_config.json").is_file()  # metadata files travel along
    assert_same_logits(hf_model, model, seq_len=300 if case == "llama3-rope" else 40)


def test_sharded_safetensors(tmp_path):
    hf_model = make_hf_model(num_key_value_heads=2)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    assert_same_logits(hf_model, load_model(tmp_path / "lit")[0])


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin(tmp_path, sharded):
    # transformers 5 only writes safetensors; write the older .bin layout the way transformers 4 did.
    hf_model = make_hf_model(num_key_value_heads=2)
    hf_dir = tmp_path / "hf"
    hf_model.config.save_pretrained(hf_dir)
    state_dict = dict(hf_model.state_dict())
    state_dict["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as saved before transformers 4.31
    if sharded:
        keys = sorted(state_dict)
        halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for file, shard_keys in halves.items():
            torch.save({k: state_dict[k] for k in shard_keys}, hf_dir / file)
        weight_map = {k: file for file, shard_keys in halves.items() for k in shard_keys}
        (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state_dict, hf_dir / "pytorch_model.bin")
    convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert_same_logits(hf_model, load_model(tmp_path / "lit")[0])


@pytest.mark.parametrize("case", ["grouped-query", "tied", "llama3-rope"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_lit_hf_lit_round_trip(case, dtype, tmp_path):
    hf_model = make_hf_model(**HF_CASES[case])
    hf_model.save_pretrained(tmp_path / "hf")
    lit_dir = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit", dtype=dtype)
    convert_lit_to_hf(lit_dir, tmp_path / "hf2")
    hf_config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert hf_config["torch_dtype"] == ("bfloat16" if dtype else "float32")
    assert hf_config["tie_word_embeddings"] == (case == "tied")

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    if dtype is None:
        assert_same_logits(hf_model, reloaded)
    assert_same_logits(reloaded, load_model(lit_dir, dtype=torch.float32)[0])

    convert_hf_checkpoint(tmp_path / "hf2", tmp_path / "lit2", name="hf")
    before, after = load_state_dict(lit_dir), load_state_dict(tmp_path / "lit2")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    assert Config.from_checkpoint(lit_dir) == Config.from_checkpoint(tmp_path / "lit2")


def test_hf_export_takes_special_token_ids_from_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    make_hf_model().save_pretrained(tmp_path / "hf")
    lit_dir = convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    plain = json.loads((convert_lit_to_hf(lit_dir, tmp_path / "plain") / "config.json").read_text())
    assert plain["eos_token_id"] is None  # no tokenizer: say so rather than let transformers assume ids 1 and 2

    vocab = {"a": 0, "<s>": 1, "</s>": 2, "<eot>": 3}
    HFTokenizer(models.WordLevel(vocab, unk_token="a")).save(str(lit_dir / "tokenizer.json"))
    (lit_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<eot>"}))
    hf_dir = convert_lit_to_hf(lit_dir, tmp_path / "hf2")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 3)
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "generation_config.json").is_file()


def test_detect_source_kind(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(20))
    assert script.detect_source_kind(tmp_path / "model.gguf") == "gguf"
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text("{}")
    (tmp_path / "meta" / "consolidated.00.pth").write_bytes(b"")
    assert script.detect_source_kind(tmp_path / "meta") == "meta"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert script.detect_source_kind(tmp_path / "hf") == "hf"
    (tmp_path / "fake.gguf").write_text("not gguf")
    with pytest.raises(LitQAError, match="not a GGUF file"):
        script.detect_source_kind(tmp_path / "fake.gguf")


def test_key_tables_are_inverse():
    model = make_hf_model()
    for key in model.state_dict():
        assert lit_to_hf_key(hf_to_lit_key(key)) == key
    assert hf_to_lit_key("model.layers.11.mlp.up_proj.weight") == "transformer.h.11.mlp.up_proj.weight"
    with pytest.raises(LitQAError, match="model.layers.0.self_attn.q_proj.bias"):
        hf_to_lit_key("model.layers.0.self_attn.q_proj.bias")
    with pytest.raises(LitQAError, match="transformer.h.0.attn.qkv.weight"):
        lit_to_hf_key("transformer.h.0.attn.qkv.weight")


@pytest.mark.parametrize("name", sorted(configs))
def test_hf_config_round_trip(name):
    config = Config.from_name(name)
    assert config_from_hf(config_to_hf(config, torch.bfloat16), name) == config


def test_hf_config_errors(tmp_path):
    config = config_to_hf(Config.from_name("tiny-mha"), torch.float32)
    with pytest.raises(LitQAError, match="model_type is 'mistral'"):
        config_from_hf({**config, "model_type": "mistral"}, "x")
    with pytest.raises(LitQAError, match="rope type 'yarn'"):
        config_from_hf({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x")
    with pytest.raises(LitQAError, match="attention_bias"):
        config_from_hf({**config, "attention_bias": True}, "x")
    del config["intermediate_size"]
    with pytest.raises(LitQAError, match="missing field 'intermediate_size'"):
        config_from_hf(config, "x")


def meta_permute_inverse(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta's interleaved rows (the inverse of `lit_qa.checkpoints.convert_meta.permute`)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def write_meta_checkpoint(hf_model, meta_dir: Path, params: dict, n_shards: int = 2) -> None:
    """Write ``hf_model`` the way Meta releases models: interleaved RoPE rows, split over model-parallel shards."""
    c = hf_model.config
    sd = hf_model.state_dict()
    # Each tensor with the dimension Meta's model-parallel layers split it on (None: replicated).
    tensors = {
        "tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
        "norm.weight": (sd["model.norm.weight"], None),
        "output.weight": (sd["lm_head.weight"], 0),
    }
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        wq = meta_permute_inverse(sd[hf + "self_attn.q_proj.weight"], c.num_attention_heads)
        wk = meta_permute_inverse(sd[hf + "self_attn.k_proj.weight"], c.num_key_value_heads)
        tensors |= {
            f"layers.{i}.attention.wq.weight": (wq, 0),
            f"layers.{i}.attention.wk.weight": (wk, 0),
            f"layers.{i}.attention.wv.weight": (sd[hf + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[hf + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[hf + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w3.weight": (sd[hf + "mlp.up_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[hf + "mlp.down_proj.weight"], 1),
            f"layers.{i}.attention_norm.weight": (sd[hf + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[hf + "post_attention_layernorm.weight"], None),
        }
    meta_dir.mkdir()
    for shard in range(n_shards):
        pieces = {
            key: (t if dim is None else t.chunk(n_shards, dim=dim)[shard]).clone() for key, (t, dim) in tensors.items()
        }
        pieces["rope.freqs"] = torch.ones(4)  # LLaMA 1 stored this; it must be ignored
        torch.save(pieces, meta_dir / f"consolidated.{shard:02d}.pth")
    (meta_dir / "params.json").write_text(json.dumps(params))


META_PARAMS = dict(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=16, ffn_dim_multiplier=1.5, norm_eps=1e-5,
)  # fmt: skip


def test_meta_matches_hf_route(tmp_path):
    ffn = intermediate_size(32, multiple_of=16, ffn_dim_multiplier=1.5)
    assert ffn == 128  # 4 * 32 -> 85 (2/3) -> 127 (x1.5) -> 128 (multiple of 16)
    hf_model = make_hf_model(num_key_value_heads=2, intermediate_size=ffn)
    hf_model.save_pretrained(tmp_path / "hf")
    write_meta_checkpoint(hf_model, tmp_path / "meta", META_PARAMS)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(b"not read by the converter")

    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "from_hf")
    convert_meta_checkpoint(tmp_path / "meta", tmp_path / "from_meta")
    from_hf, from_meta = load_state_dict(tmp_path / "from_hf"), load_state_dict(tmp_path / "from_meta")
    assert from_hf.keys() == from_meta.keys()
    for key in from_hf:
        assert torch.equal(from_hf[key], from_meta[key]), key
    hf_config, meta_config = (
        Config.from_checkpoint(tmp_path / "from_hf"),
        Config.from_checkpoint(tmp_path / "from_meta"),
    )
    for field in ("vocab_size", "n_layer", "n_head", "n_embd", "n_query_groups", "intermediate_size", "norm_eps"):
        assert getattr(hf_config, field) == getattr(meta_config, field), field
    assert (tmp_path / "from_meta" / "tokenizer.model").is_file()
    assert_same_logits(hf_model, load_model(tmp_path / "from_meta")[0])


def test_meta_params_disagree_with_weights(tmp_path):
    hf_model = make_hf_model(num_key_value_heads=2, intermediate_size=128)
    write_meta_checkpoint(hf_model, tmp_path / "meta", {**META_PARAMS, "ffn_dim_multiplier": None}, n_shards=1)
    # Without the multiplier Meta's formula gives 96 rows, the weights have 128.
    with pytest.raises(LitQAError, match=r"gate_proj.weight has shape \(128, 32\) but the config expects \(96, 32\)"):
        convert_meta_checkpoint(tmp_path / "meta", tmp_path / "lit")
    assert not (tmp_path / "lit").exists()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_hf_and_back(tmp_path):
    hf_model = make_hf_model()
    hf_model.save_pretrained(tmp_path / "hf")
    result = run_script("--source", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "lit"), "--name", "tiny")
    assert result.returncode == 0, result.stderr
    assert "lit_model.safetensors" in result.stdout
    model, config = load_model(tmp_path / "lit")
    assert config.name == "tiny"
    assert_same_logits(hf_model, model)

    result = run_script("--to", "hf", "--source", str(tmp_path / "lit"), "--out_dir", str(tmp_path / "hf2"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf2" / "model.safetensors").is_file()


def test_cli_errors(tmp_path):
    result = run_script("--source", str(tmp_path / "nowhere"), "--out_dir", str(tmp_path / "lit"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: source {tmp_path / 'nowhere'} does not exist"]

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    result = run_script("--source", str(tmp_path / "junk"), "--out_dir", str(tmp_path / "lit"))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot tell what") and "readme.txt" in line
