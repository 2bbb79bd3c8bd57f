# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""QLoRA: LoRA on a base quantized by bitsandbytes, in Python and through finetune/lora.py + evaluate/lora.py.

The base checkpoint is `test_quantize_bnb.make_wide_checkpoint` (64 wide: bitsandbytes' CPU 4-bit kernels need
rows of whole 64-weight blocks); the prepared data comes from test_finetune_lora's fixture (same tokenizer).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from helpers import run_script
from safetensors.torch import load_file
from test_finetune_lora import finetune, prepared  # noqa: F401 (a fixture)
from test_quantize_bnb import make_wide_checkpoint

from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import save_lora_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.models.lora import (
    LoRAConfig,
    apply_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora_weights,
)
from lit_qa.quantize import quantize_model, quantize_record
from lit_qa.quantize.bnb import is_bnb_layer

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    return make_wide_checkpoint(tmp_path_factory.mktemp("wide"))


def qlora_model(checkpoint, mode: str = "bnb.nf4"):
    """The base quantized for training, then LoRA applied and marked trainable (finetune/lora.py's order)."""
    model = load_model(checkpoint)[0]
    quantize_model(model, mode, for_training=True)
    apply_lora(model, LORA)
    mark_only_lora_as_trainable(model)
    return model


def next_token_loss(model, idx):
    return torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_qlora_trains_only_the_lora_parameters(wide_checkpoint, mode):
    model = qlora_model(wide_checkpoint, mode).train()
    assert is_bnb_layer(model.transformer.h[0].attn.q_proj.base_layer)
    assert "transformer.h.0.attn.q_proj.lora_A" in lora_state_dict(model)  # the adapter's keys are LoRA's usual ones
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 512, (4, 24))
    losses = []
    for step in range(6):
        if step == 2:  # a validation pass (eval mode, no gradients) in between, as fit() does
            with torch.no_grad():
                next_token_loss(model.eval(), idx)
            model.train()
        optimizer.zero_grad()
        loss = next_token_loss(model, idx)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # Every LoRA tensor got a gradient, layer 0's too (it flows back through the quantized layers above);
    # nothing else did, and the quantized base is bit for bit what it was.
    for name, param in model.named_parameters():
        assert (param.grad is not None and param.grad.abs().sum() > 0) == ("lora_" in name), name
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), name


def test_an_eval_pass_does_not_change_qlora_gradients(wide_checkpoint):
    """On AVX512-bf16 CPUs, bitsandbytes repacks a 4-bit weight at its first eval-mode no-grad forward into an
    inference layout that passes no gradient back; `quantize_model(for_training=True)` keeps it out."""
    model = qlora_model(wide_checkpoint)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    validated = copy.deepcopy(model)
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        validated.eval()(idx)
    for candidate in (model, validated):
        next_token_loss(candidate.train(), idx).backward()
    for (name, param), (_, other) in zip(model.named_parameters(), validated.named_parameters()):
        if param.requires_grad:
            torch.testing.assert_close(other.grad, param.grad, rtol=0, atol=0, msg=name)


def test_qlora_adapter_saves_and_loads(wide_checkpoint, tmp_path):
    model = qlora_model(wide_checkpoint).eval()
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    with pytest.raises(LitQAError, match="quantized base"):
        merge_lora_weights(model)  # W is stored as 4-bit codes: W + BA cannot be formed exactly
    folder = save_lora_checkpoint(tmp_path / "adapter", model, LORA, wide_checkpoint, extra=quantize_record("bnb.nf4"))
    assert json.loads((folder / "quantize.json").read_text()) == {"mode": "bnb.nf4"}
    assert load_file(folder / "lit_lora.safetensors").keys() == lora_state_dict(model).keys()

    reloaded = qlora_model(wide_checkpoint).eval()
    missing, unexpected = reloaded.load_state_dict(load_file(folder / "lit_lora.safetensors"), strict=False)
    assert not unexpected and all("lora_" not in key for key in missing)
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), model(idx), rtol=0, atol=0)


def test_qlora_from_the_command_line(prepared, wide_checkpoint, tmp_path):  # noqa: F811
    _, _, data_dir, train_file = prepared
    args = ("--quantize", "bnb.nf4", "--lora.dropout", "0.05")  # resuming is exact with dropout too
    result = finetune(tmp_path, wide_checkpoint, data_dir, *args)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit" not in result.stderr and "MatMul8bitLt" not in result.stderr  # bitsandbytes kept quiet
    assert result.stdout.count("val loss") == 2
    run = tmp_path / "run"
    final = run / "final"
    lora = load_file(final / "lit_lora.safetensors")
    layers = ("attn.q_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert set(lora) == {f"transformer.h.{i}.{layer}.lora_{ab}" for i in range(2) for layer in layers for ab in "AB"}
    assert any(t.abs().sum() > 0 for key, t in lora.items() if key.endswith("lora_B"))
    assert json.loads((final / "quantize.json").read_text()) == {"mode": "bnb.nf4"}
    assert "quantize: bnb.nf4" in (run / "hyperparameters.yaml").read_text()

    # Resuming from the step-3 checkpoint ends with the weights of the run that never stopped.
    for folder in (run / "step-000006", final):
        shutil.rmtree(folder)
    resumed = finetune(tmp_path, wide_checkpoint, data_dir, *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    for key, tensor in load_file(final / "lit_lora.safetensors").items():
        torch.testing.assert_close(tensor, lora[key], rtol=0, atol=0, msg=key)

    # A fixed threshold: this run saved none (no --eval.f1_questions), and "auto" would warn about that.
    common = ["--lora_dir", str(final), "--eval_file", str(train_file), "--limit", "8", "--max_new_tokens", "4",
              "--precision", "32-true", "--na_threshold", "0.5"]  # fmt: skip
    result = run_script("evaluate/lora.py", *common, "--out_dir", str(tmp_path / "eval"), "--quantize", "bnb.nf4")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["quantize"] == "bnb.nf4" and metrics["total"] == 8
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())) == 8
    # In full precision it still runs, with a warning that the adapter was trained on a quantized base.
    result = run_script("evaluate/lora.py", *common, "--out_dir", str(tmp_path / "eval-full"))
    assert result.returncode == 0, result.stderr
    assert "trained on a bnb.nf4 base" in result.stderr
    result = run_script("evaluate/lora.py", *common, "--out_dir", str(tmp_path / "gptq"), "--quantize", "gptq.int4")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "scripts/merge_lora.py" in result.stderr


def test_qlora_under_ddp_matches_one_process(prepared, wide_checkpoint, tmp_path):  # noqa: F811
    """Two CPU processes (gloo) with the same global batch train the same adapter as one process."""
    _, _, data_dir, _ = prepared
    results = {}
    for devices, strategy in (("1", "auto"), ("2", "ddp")):
        out = tmp_path / f"devices-{devices}"
        result = finetune(out, wide_checkpoint, data_dir, "--quantize", "bnb.nf4", "--devices", devices,
                          "--strategy", strategy, "--lora.dropout", "0.0", "--train.max_steps", "3")  # fmt: skip
        assert result.returncode == 0, result.stderr
        results[devices] = load_file(out / "run" / "final" / "lit_lora.safetensors")
    for key, tensor in results["1"].items():
        torch.testing.assert_close(results["2"][key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_qlora_refuses_fsdp_and_gptq(prepared, wide_checkpoint, tmp_path):  # noqa: F811
    _, _, data_dir, _ = prepared
    for extra, message in [
        (("--devices", "2", "--strategy", "fsdp", "--quantize", "bnb.nf4"), "--strategy fsdp"),
        (("--quantize", "gptq.int4"), "QLoRA needs"),
    ]:
        result = finetune(tmp_path, wide_checkpoint, data_dir, *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
