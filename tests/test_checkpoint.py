# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Checkpoint folders: save/load round trip, atomic writes, and one-line errors for broken input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import WritesMarker
from safetensors.torch import save_file

import lit_qa.checkpoints.folder as checkpoint
from lit_qa.checkpoints.folder import (
    WEIGHTS_FILE,
    check_checkpoint_dir,
    expected_shapes,
    load_model,
    load_state_dict,
    load_torch_file,
    save_checkpoint,
)
from lit_qa.errors import LitQAError
from lit_qa.models.config import CONFIG_FILE, Config
from lit_qa.models.model import GPT


def make_model(name: str = "tiny-gqa") -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name(name)).eval()


@pytest.fixture
def lit_dir(tmp_path):
    model = make_model()
    return save_checkpoint(tmp_path / "ckpt", model.config, model.state_dict())


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_save_and_load(tmp_path, name):
    source = make_model(name)
    (tmp_path / "tokenizer.json").write_text("{}")
    out = save_checkpoint(
        tmp_path / "ckpt", source.config, source.state_dict(), {"tokenizer.json": tmp_path / "tokenizer.json"}
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json"])
    assert ("lm_head.weight" in load_state_dict(out)) == (name != "tiny-tied")

    model, config = load_model(out)
    assert config == source.config
    assert not model.training
    if config.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight
    # The RoPE cache is not in the file: it must have been rebuilt for real, not left on meta.
    assert model.cos.device.type == "cpu" and torch.equal(model.cos, source.cos)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), source(idx), atol=0, rtol=0)


def test_load_casts_dtype(lit_dir):
    model, _ = load_model(lit_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cos.dtype == torch.float32  # RoPE angles stay precise
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_tied_stays_tied_after_cast(tmp_path):
    source = make_model("tiny-tied")
    save_checkpoint(tmp_path / "ckpt", source.config, source.state_dict())
    model, _ = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_missing_folder(tmp_path):
    with pytest.raises(LitQAError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_weights(lit_dir):
    (lit_dir / WEIGHTS_FILE).unlink()
    (lit_dir / "notes.txt").write_text("")
    with pytest.raises(LitQAError, match=f"missing {WEIGHTS_FILE} .*it has: {CONFIG_FILE}, notes.txt") as e:
        check_checkpoint_dir(lit_dir)
    assert "\n" not in str(e.value)


def write_weights(lit_dir, state_dict):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, lit_dir / WEIGHTS_FILE)


def test_wrong_shape_names_the_tensor(lit_dir):
    state_dict = load_state_dict(lit_dir)
    state_dict["transformer.h.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    write_weights(lit_dir, state_dict)
    with pytest.raises(LitQAError) as e:
        load_model(lit_dir)
    message = str(e.value)
    assert WEIGHTS_FILE in message
    assert "transformer.h.1.mlp.up_proj.weight has shape (65, 32) but the config expects (64, 32)" in message


def test_missing_and_unexpected_keys(lit_dir):
    state_dict = load_state_dict(lit_dir)
    del state_dict["transformer.ln_f.weight"]
    state_dict["transformer.h.0.attn.q_proj.bias"] = torch.zeros(32)
    write_weights(lit_dir, state_dict)
    with pytest.raises(LitQAError, match="missing tensors transformer.ln_f.weight; unexpected tensors transformer.h.0"):
        load_model(lit_dir)


def test_truncated_weights(lit_dir):
    path = lit_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LitQAError, match=f"{WEIGHTS_FILE} is not a readable safetensors file"):
        load_model(lit_dir)


def test_config_that_does_not_match_weights(lit_dir):
    values = json.loads((lit_dir / CONFIG_FILE).read_text())
    (lit_dir / CONFIG_FILE).write_text(json.dumps({**values, "n_layer": 3, "intermediate_size": 48}))
    with pytest.raises(LitQAError) as e:
        load_model(lit_dir)
    message = str(e.value)
    assert "missing tensors transformer.h.2." in message
    assert "transformer.h.0.mlp.gate_proj.weight has shape (64, 32) but the config expects (48, 32)" in message


def test_expected_shapes_of_a_70b_model_cost_nothing():
    shapes = expected_shapes(Config.from_name("Llama-2-70b"))
    assert shapes["transformer.h.79.attn.k_proj.weight"] == (1024, 8192)  # 8 KV heads of 128
    assert shapes["lm_head.weight"] == (32000, 8192)
    assert "lm_head.weight" not in expected_shapes(Config.from_name("SmolLM2-135M"))  # tied


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "payload": WritesMarker(marker)}, path)
    with pytest.raises(LitQAError, match="refusing to load .*pytorch_model.bin"):
        load_torch_file(path)
    assert not marker.exists()


def test_pickle_with_code_is_refused_by_the_hf_converter(tmp_path):
    from lit_qa.checkpoints.convert_hf import convert_hf_checkpoint

    marker = tmp_path / "pwned"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=128,
    )))  # fmt: skip
    torch.save({"model.norm.weight": WritesMarker(marker)}, hf_dir / "pytorch_model.bin")
    with pytest.raises(LitQAError, match="refusing to load"):
        convert_hf_checkpoint(hf_dir, tmp_path / "lit")
    assert not marker.exists()
    assert not (tmp_path / "lit").exists()


def test_corrupt_torch_file(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(LitQAError, match="consolidated.00.pth is not a readable PyTorch file"):
        load_torch_file(path)


def test_save_refuses_non_empty_folder(tmp_path, lit_dir):
    model = make_model("tiny-mha")
    with pytest.raises(LitQAError, match="not empty; pass --overwrite"):
        save_checkpoint(lit_dir, model.config, model.state_dict())
    assert Config.from_checkpoint(lit_dir).name == "tiny-gqa"
    save_checkpoint(lit_dir, model.config, model.state_dict(), overwrite=True)
    assert load_model(lit_dir)[1].name == "tiny-mha"
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", model.config, model.state_dict())  # an empty folder is fine


def test_tied_head_must_equal_embedding(tmp_path):
    model = make_model("tiny-tied")
    state_dict = {**model.state_dict(), "lm_head.weight": torch.zeros_like(model.lm_head.weight)}
    with pytest.raises(LitQAError, match="tie_embeddings"):
        save_checkpoint(tmp_path / "ckpt", model.config, state_dict)


@pytest.mark.parametrize("fail_in", ["save_file", "copyfile"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, lit_dir, monkeypatch, fail_in):
    before = load_state_dict(lit_dir)
    (tmp_path / "tokenizer.json").write_text("{}")

    def write_half_then_fail(*args, **kwargs):
        # Leave a partial file behind, as a crash mid-write would.
        with open(args[1], "wb") as f:  # save_file(tensors, path) and copyfile(source, path)
            f.write(b"partial")
        raise OSError("disk full")

    target = "save_file" if fail_in == "save_file" else "shutil.copyfile"
    monkeypatch.setattr(f"lit_qa.checkpoints.folder.{target}", write_half_then_fail)
    model = make_model("tiny-mha")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            lit_dir, model.config, model.state_dict(), {"tokenizer.json": tmp_path / "tokenizer.json"}, overwrite=True
        )
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tokenizer.json"]  # no temp folder left
    assert Config.from_checkpoint(lit_dir).name == "tiny-gqa"
    after = load_state_dict(lit_dir)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_temp_folder_is_a_sibling(tmp_path, monkeypatch):
    seen = []
    real_save_file = checkpoint.save_file

    def spy(tensors, path, **kwargs):
        seen.append(path.parent)
        real_save_file(tensors, path, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", spy)
    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model.config, model.state_dict())
    assert seen == [tmp_path / f"ckpt.tmp-{os.getpid()}"]
    assert not seen[0].exists()
