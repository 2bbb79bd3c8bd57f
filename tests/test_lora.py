# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LoRA invariants (zero init, only adapters train, merge), adapter save/load checks, and the merge script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import run_script, sgd_step
from safetensors.torch import save_file

from lit_qa.checkpoints.folder import load_model, load_state_dict, save_checkpoint
from lit_qa.checkpoints.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, load_lora_checkpoint, save_lora_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    lora_filter,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    reset_lora_parameters,
)
from lit_qa.models.model import GPT

REPO = Path(__file__).resolve().parents[1]
ALL_TARGETS = dict(query=True, key=True, value=True, projection=True, mlp=True, head=True)
NO_TARGETS = dict(query=False, key=False, value=False, projection=False, mlp=False, head=False)
# Target set -> LoRA layers per block, plus one for the head.
TARGET_CASES = {
    "query+value": (dict(query=True, value=True), 2, 0),
    "key": ({**NO_TARGETS, "key": True}, 1, 0),
    "projection": ({**NO_TARGETS, "projection": True}, 1, 0),
    "mlp": ({**NO_TARGETS, "mlp": True}, 3, 0),
    "head": ({**NO_TARGETS, "head": True}, 0, 1),
    "all": (ALL_TARGETS, 7, 1),
}


def make_model(name: str = "tiny-gqa", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name(name)).eval()


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give B (zero after init) and A visible values so that the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            # Small enough that the merged weight stays of the base's magnitude (float32 rounding), large
            # enough to change the logits by about their own size.
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.05)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits  # lit-qa GPT or transformers


def idx_for(model: GPT) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))


def save_base(model: GPT, folder: Path) -> Path:
    return save_checkpoint(folder, model.config, model.state_dict())


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_zero_initialized_lora_keeps_base_output(name):
    model = make_model(name)
    idx = idx_for(model)
    expected = logits(model, idx)
    apply_lora(model, LoRAConfig(**ALL_TARGETS))
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in lora_layers(model))
    assert all(torch.count_nonzero(layer.lora_A) > 0 for layer in lora_layers(model))
    torch.testing.assert_close(logits(model, idx), expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_only_lora_parameters_train(name):
    model = make_model(name)
    apply_lora(model, LoRAConfig(**ALL_TARGETS, dropout=0.1))
    randomize_lora(model)  # with B = 0 the gradient of A is zero, so A would not move in the first step
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora_filter(n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    sgd_step(model, idx_for(model))

    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != lora_filter(key), key
    assert torch.equal(model.transformer.wte.weight, before["transformer.wte.weight"])
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight


def test_merge_is_idempotent_and_adds_the_update():
    linear = nn.Linear(8, 6, bias=False)
    layer = LoRALinear(linear, r=2, alpha=4, dropout=0.0)
    assert layer.weight is linear.weight
    randomize_lora(layer)
    weight = layer.weight.detach().clone()
    x = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = layer(x)
        layer.train(), layer.eval()  # mode switches must not merge (lit-llama's drift)
        assert torch.equal(layer.weight, weight) and not layer.merged

        layer.merge()
        expected = weight + layer.lora_B @ layer.lora_A * (4 / 2)
        assert torch.equal(layer.weight, expected)
        layer.merge()
        assert torch.equal(layer.weight, expected)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_targets_build_count_and_merge(name, case):
    targets, per_block, head = TARGET_CASES[case]
    model = make_model(name)
    base_params = count_parameters(model)
    wte = model.transformer.wte.weight.detach().clone()
    apply_lora(model, LoRAConfig(r=4, **targets))
    assert len(lora_layers(model)) == per_block * model.config.n_layer + head
    state = lora_state_dict(model)
    assert len(state) == 2 * len(lora_layers(model)) and all(lora_filter(k) for k in state)
    assert count_parameters(model) == base_params + sum(t.numel() for t in state.values())
    # Base names are unchanged: a plain GPT state dict plus the LoRA tensors.
    assert {k for k in model.state_dict() if not lora_filter(k)} == set(make_model(name).state_dict())

    idx = idx_for(model)
    base_logits = logits(model, idx)
    randomize_lora(model)
    unmerged = logits(model, idx)
    assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter changes the output well beyond atol
    untied = merge_lora_weights(model)
    assert untied == (head == 1 and name == "tiny-tied")
    assert model.config.tie_embeddings == (name == "tiny-tied" and not untied)
    assert all(layer.merged for layer in lora_layers(model))
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.transformer.wte.weight, wte)
    assert merge_lora_weights(model) is False  # second call: nothing left to merge
    torch.testing.assert_close(logits(model, idx), unmerged, atol=1e-5, rtol=1e-5)


def test_query_value_on_two_layers_gives_eight_tensors():
    model = apply_lora(make_model(), LoRAConfig(query=True, value=True))
    assert sorted(lora_state_dict(model)) == sorted(
        f"transformer.h.{i}.attn.{proj}.lora_{ab}" for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"
    )
    mark_only_lora_as_trainable(model)
    r, n_embd, kv = 8, 32, 2 * 8  # tiny-gqa: 2 key/value heads of size 8
    assert count_parameters(model, trainable_only=True) == 2 * (r * n_embd + n_embd * r + r * n_embd + kv * r)


def test_apply_lora_on_meta_device():
    with torch.device("meta"):
        model = GPT(Config.from_name("tiny-gqa"))
        apply_lora(model, LoRAConfig(query=True, value=True))
    assert all(layer.lora_A.is_meta and layer.lora_B.is_meta for layer in lora_layers(model))
    model.to_empty(device="cpu")
    reset_lora_parameters(model)
    for layer in lora_layers(model):
        assert layer.lora_A.device.type == "cpu" and torch.count_nonzero(layer.lora_B) == 0
        assert torch.isfinite(layer.lora_A).all() and torch.count_nonzero(layer.lora_A) > 0


def test_apply_lora_twice_is_refused():
    model = apply_lora(make_model(), LoRAConfig())
    with pytest.raises(LitQAError, match=r"transformer.h.0.attn.q_proj already has LoRA"):
        apply_lora(model, LoRAConfig())


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(r=0), r"LoRA rank must be >= 1"),
        (dict(alpha=0), r"LoRA alpha must be > 0"),
        (dict(dropout=1.0), r"LoRA dropout must be in \[0, 1\)"),
        (NO_TARGETS, r"at least one target"),
    ],
)
def test_lora_config_validation(values, message):
    with pytest.raises(LitQAError, match=message):
        LoRAConfig(**values)


def make_adapter(tmp_path: Path, name: str = "tiny-gqa", **targets) -> tuple[GPT, LoRAConfig, Path, Path]:
    """A random base saved to tmp_path/base and a random LoRA on it saved to tmp_path/lora."""
    model = make_model(name)
    base = save_base(model, tmp_path / "base")
    lora_config = LoRAConfig(r=4, alpha=8, **targets)
    apply_lora(model, lora_config)
    randomize_lora(model)
    lora_dir = save_lora_checkpoint(
        tmp_path / "lora", model, lora_config, base, extra={"hyperparameters.json": {"lr": 3e-4}}
    )
    return model.eval(), lora_config, base, lora_dir


@pytest.mark.parametrize("name, targets", [("tiny-gqa", {}), ("tiny-tied", ALL_TARGETS)])
def test_save_and_load_round_trip(tmp_path, name, targets):
    model, lora_config, base, lora_dir = make_adapter(tmp_path, name, **targets)
    assert sorted(p.name for p in lora_dir.iterdir()) == sorted(
        [LORA_WEIGHTS_FILE, LORA_CONFIG_FILE, "base_checkpoint.json", "hyperparameters.json"]
    )
    assert set(load_state_dict(lora_dir / LORA_WEIGHTS_FILE)) == set(lora_state_dict(model))
    record = json.loads((lora_dir / "base_checkpoint.json").read_text())
    assert record["path"] == str(base) and record["lit_config"]["name"] == name
    assert record["fingerprint"].startswith("sha256:")

    loaded, config, loaded_lora_config = load_lora_checkpoint(lora_dir)  # base from the record
    assert loaded_lora_config == lora_config and config == model.config and not loaded.training
    idx = idx_for(model)
    torch.testing.assert_close(logits(loaded, idx), logits(model, idx), atol=0, rtol=0)
    if config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_different_base_is_refused(tmp_path):
    _, _, _, lora_dir = make_adapter(tmp_path)
    other = save_base(make_model(seed=1), tmp_path / "other")  # same config, other weights
    with pytest.raises(LitQAError, match=rf"LoRA in {lora_dir} was trained on a different base checkpoint \("):
        load_lora_checkpoint(lora_dir, other)
    load_lora_checkpoint(lora_dir, other, allow_different_base=True)

    mha = save_base(make_model("tiny-mha"), tmp_path / "mha")
    with pytest.raises(LitQAError, match=r"another architecture .*n_query_groups 2 vs 4"):
        load_lora_checkpoint(lora_dir, mha, allow_different_base=True)


@pytest.mark.parametrize("edit", ["wrong shape", "missing", "unexpected"])
def test_bad_lora_tensors_are_refused(tmp_path, edit):
    _, _, _, lora_dir = make_adapter(tmp_path)
    tensors = load_state_dict(lora_dir / LORA_WEIGHTS_FILE)
    key = "transformer.h.1.attn.v_proj.lora_A"
    if edit == "wrong shape":
        tensors[key] = torch.zeros(5, 32)
        message = rf"{key} has shape \(5, 32\) but lora_config.json and the base need \(4, 32\)"
    elif edit == "missing":
        del tensors[key]
        message = rf"missing LoRA tensors {key}$"
    else:
        tensors["transformer.h.1.attn.k_proj.lora_A"] = torch.zeros(4, 32)
        message = r"unexpected tensors transformer.h.1.attn.k_proj.lora_A$"
    save_file(tensors, lora_dir / LORA_WEIGHTS_FILE)
    with pytest.raises(LitQAError, match=message):
        load_lora_checkpoint(lora_dir)


def test_incomplete_lora_folder_is_refused(tmp_path):
    _, _, base, lora_dir = make_adapter(tmp_path)
    base.rename(tmp_path / "moved")
    with pytest.raises(LitQAError, match=rf"base checkpoint {base} recorded in .*base_checkpoint.json does not exist"):
        load_lora_checkpoint(lora_dir)
    load_lora_checkpoint(lora_dir, tmp_path / "moved")  # the same weights elsewhere are fine

    (lora_dir / LORA_CONFIG_FILE).write_text(json.dumps({"r": 0}))
    with pytest.raises(LitQAError, match=r"lora_config.json: LoRA rank must be >= 1"):
        load_lora_checkpoint(lora_dir, tmp_path / "moved")
    (lora_dir / LORA_CONFIG_FILE).unlink()
    with pytest.raises(LitQAError, match=r"is not a LoRA checkpoint: missing lora_config.json \(it has: "):
        load_lora_checkpoint(lora_dir)


@pytest.mark.parametrize("name, targets", [("tiny-gqa", {}), ("tiny-tied", ALL_TARGETS)])
def test_merge_script_and_hf_export(tmp_path, name, targets):
    transformers = pytest.importorskip("transformers")
    from lit_qa.checkpoints.convert_hf import convert_lit_to_hf

    model, _, _, lora_dir = make_adapter(tmp_path, name, **targets)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "merge_lora.py"), "--lora_dir", str(lora_dir),
         "--out_dir", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "lit_model.safetensors" in result.stdout

    merged, config = load_model(tmp_path / "merged")
    assert config.tie_embeddings == (name == "tiny-tied" and not targets.get("head"))
    assert not any(lora_filter(k) for k in load_state_dict(tmp_path / "merged"))
    idx = idx_for(model)
    expected = logits(model, idx)
    torch.testing.assert_close(logits(merged, idx), expected, atol=1e-5, rtol=1e-5)

    convert_lit_to_hf(tmp_path / "merged", tmp_path / "hf")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(hf_model, idx), expected, atol=1e-5, rtol=1e-5)


def test_merge_script_keeps_the_prompt_settings_and_the_tuned_threshold(tmp_path):
    from lit_qa.data.dataset import FORMAT_VERSION, PREPARED_BY
    from lit_qa.evaluation.answers import NA_METHOD
    from lit_qa.evaluation.calibration import read_na_threshold
    from lit_qa.evaluation.run import prompt_settings

    _, _, _, lora_dir = make_adapter(tmp_path)
    prepared = dict(prepared_by=PREPARED_BY, format_version=FORMAT_VERSION, prompt_style="chat", no_answer="none")
    (lora_dir / "prepare_config.json").write_text(json.dumps(prepared))
    (lora_dir / "na_threshold.json").write_text(json.dumps({"threshold": 0.37, "method": NA_METHOD}))
    result = run_script("scripts/merge_lora.py", "--lora_dir", str(lora_dir), "--out_dir", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    # evaluate/base.py reads both from the checkpoint folder it is given
    assert prompt_settings(tmp_path / "merged", None, None) == ("chat", "none")
    assert read_na_threshold(tmp_path / "merged")["threshold"] == 0.37


def test_merge_script_refuses_a_non_empty_out_dir(tmp_path):
    _, _, _, lora_dir = make_adapter(tmp_path)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "merge_lora.py"), "--lora_dir", str(lora_dir),
         "--out_dir", str(lora_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {lora_dir} already exists and is not empty; pass --overwrite to replace it"
    ]
