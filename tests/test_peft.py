# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""PEFT LoRA folders both ways (`lit_qa.checkpoints.peft`): peft loads our export onto the transformers model of our
base and gives our logits; a PEFT folder converts back into the same lit-qa LoRA folder."""

import json

import peft
import pytest
import torch
import transformers
from helpers import load_script, make_tiny_checkpoint
from safetensors.torch import load_file

from lit_qa.checkpoints.adapter import save_adapter_checkpoint
from lit_qa.checkpoints.convert_hf import convert_lit_to_hf
from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import LORA_WEIGHTS_FILE, load_lora_checkpoint, save_lora_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.models.adapter import AdapterConfig, apply_adapter
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_layers

convert = load_script("scripts/convert_checkpoint.py")


def trained_lora(tmp_path, config: LoRAConfig):
    """A LoRA folder on the tiny base with random (non-zero) B, as if trained."""
    base = make_tiny_checkpoint(tmp_path)
    model, _ = load_model(base)
    apply_lora(model, config)
    torch.manual_seed(1)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return base, save_lora_checkpoint(tmp_path / "lora", model, config, base)


@pytest.mark.parametrize("config", [LoRAConfig(r=4, alpha=8), LoRAConfig(r=2, alpha=5, key=True, projection=True,
                                                                         mlp=True, head=True)])  # fmt: skip
def test_peft_loads_our_export_with_the_same_logits_and_converts_back(tmp_path, config):
    base, lora_dir = trained_lora(tmp_path, config)
    convert.main(source=lora_dir, out_dir=tmp_path / "peft", to="peft")
    hf_base = transformers.LlamaForCausalLM.from_pretrained(convert_lit_to_hf(base, tmp_path / "hf"))
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "peft").eval()
    ours, _, _ = load_lora_checkpoint(lora_dir)
    idx = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        expected = ours(idx)
        logits = peft_model(idx).logits
    torch.testing.assert_close(logits, expected[..., : logits.size(-1)], atol=1e-4, rtol=1e-4)
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(idx).logits
    assert (plain - logits).abs().max() > 1e-2  # the adapter really changed the logits

    convert.main(source=tmp_path / "peft", out_dir=tmp_path / "back", base_checkpoint_dir=base)
    assert load_file(tmp_path / "back" / LORA_WEIGHTS_FILE).keys() == load_file(lora_dir / LORA_WEIGHTS_FILE).keys()
    for key, value in load_file(lora_dir / LORA_WEIGHTS_FILE).items():
        assert torch.equal(load_file(tmp_path / "back" / LORA_WEIGHTS_FILE)[key], value)
    back, _, back_config = load_lora_checkpoint(tmp_path / "back")
    assert back_config == config
    with torch.no_grad():
        torch.testing.assert_close(back(idx), expected)


def test_peft_conversion_refuses_what_it_cannot_express(tmp_path):
    base, lora_dir = trained_lora(tmp_path, LoRAConfig(r=4, alpha=8))
    model, _ = load_model(base)
    apply_adapter(model, AdapterConfig(start_layer=0))
    adapter_dir = save_adapter_checkpoint(tmp_path / "adapter", model, AdapterConfig(start_layer=0), base)
    with pytest.raises(LitQAError, match="only LoRA folders convert to PEFT"):
        convert.main(source=adapter_dir, out_dir=tmp_path / "x", to="peft")
    peft_dir = convert.main(source=lora_dir, out_dir=tmp_path / "peft", to="peft")
    with pytest.raises(LitQAError, match="pass --base_checkpoint_dir"):
        convert.main(source=peft_dir, out_dir=tmp_path / "y")
    config_path = peft_dir / "adapter_config.json"
    for change, message in [({"use_dora": True}, "use_dora=True"), ({"peft_type": "IA3"}, "peft_type='IA3'"),
                            ({"target_modules": ["q_proj", "up_proj"]}, "only some of gate_proj"),
                            ({"target_modules": ["q_proj", "wq"]}, "unknown modules")]:  # fmt: skip
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(LitQAError, match=message):
            convert.main(source=peft_dir, out_dir=tmp_path / "z", base_checkpoint_dir=base)
        config_path.write_text(json.dumps(config))
    with pytest.raises(LitQAError, match="applies only to converting a PEFT adapter"):
        convert.main(source=lora_dir, out_dir=tmp_path / "w", to="peft", base_checkpoint_dir=base)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_broken_weights_file_is_one_line_both_ways(tmp_path, damage):
    base, lora_dir = trained_lora(tmp_path, LoRAConfig(r=4, alpha=8))
    convert.main(source=lora_dir, out_dir=tmp_path / "peft", to="peft")
    for weights in (lora_dir / LORA_WEIGHTS_FILE, tmp_path / "peft" / "adapter_model.safetensors"):
        weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:60])
    with pytest.raises(LitQAError, match=f"{LORA_WEIGHTS_FILE} is not a readable safetensors file"):
        convert.main(source=lora_dir, out_dir=tmp_path / "peft-again", to="peft")
    with pytest.raises(LitQAError, match="adapter_model.safetensors is not a readable safetensors file"):
        convert.main(source=tmp_path / "peft", out_dir=tmp_path / "back", base_checkpoint_dir=base)
    assert not (tmp_path / "peft-again").exists() and not (tmp_path / "back").exists()
