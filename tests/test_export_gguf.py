# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GGUF export (`lit_qa.checkpoints.export_gguf`): our reader loads the file back to the same weights (Q8_0 within its
quantization error) and tokenizer, and the ``gguf`` package's reader sees llama.cpp's tensors and metadata."""

import json
from dataclasses import asdict

import gguf
import pytest
import torch
from helpers import load_script, make_tiny_checkpoint

from lit_qa.checkpoints.folder import load_model
from lit_qa.errors import LitQAError
from lit_qa.models.tokenizer import Tokenizer

convert = load_script("scripts/convert_checkpoint.py")
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
# Largest error each type may add to a weight, relative to the largest weight of its tensor.
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("gguf"))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.mark.parametrize("gguf_type", ["F32", "F16", "BF16", "Q8_0"])
def test_gguf_export_reads_back_to_the_same_weights_and_tokenizer(checkpoint, tmp_path, gguf_type):
    path = convert.main(source=checkpoint, out_dir=tmp_path / "gguf", to="gguf", gguf_type=gguf_type)
    assert path.name == f"tiny-eval-{gguf_type}.gguf" and not list(path.parent.glob("*.partial"))
    back = convert.main(source=path, out_dir=tmp_path / "back")
    original, config = load_model(checkpoint)
    reloaded, back_config = load_model(back)
    assert {**asdict(back_config), "name": None} == {**asdict(config), "name": None}
    for (key, expected), (_, value) in zip(original.state_dict().items(), reloaded.state_dict().items(), strict=True):
        error = (value - expected).abs().max() / expected.abs().max()
        assert error <= TOLERANCE[gguf_type] if expected.ndim > 1 else error == 0, key
    text = "Who ruled the duchy of Normandy? 1066"
    assert Tokenizer(back).encode(text).tolist() == Tokenizer(checkpoint).encode(text).tolist()
    idx = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        if gguf_type == "F32":
            assert torch.equal(reloaded(idx), original(idx))


def test_gguf_reader_lists_llama_cpp_tensors_and_metadata(checkpoint, tmp_path):
    path = convert.main(source=checkpoint, out_dir=tmp_path, to="gguf", gguf_type="Q8_0")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.embedding_length"] == 32
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 512 and tokens[fields["tokenizer.ggml.eos_token_id"]] == "</s>"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output.weight"] == "Q8_0"
    assert len(types) == 3 + 9 * 2


def test_gguf_export_refuses_clearly(checkpoint, tmp_path):
    with pytest.raises(LitQAError, match="applies only to --to gguf"):
        convert.main(source=checkpoint, out_dir=tmp_path / "a", to="hf", gguf_type="Q8_0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(LitQAError, match="not empty"):
        convert.main(source=checkpoint, out_dir=tmp_path / "full", to="gguf")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(LitQAError, match="lit_config.json"):
        convert.main(source=tmp_path / "full", out_dir=tmp_path / "b", to="gguf")
