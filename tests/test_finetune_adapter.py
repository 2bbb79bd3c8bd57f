# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""End to end through the command lines: prepare -> finetune/adapter.py (or adapter_v2.py) -> evaluate/adapter.py,
and FSDP2 on two processes against one."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_script
from safetensors.torch import load_file
from test_finetune_lora import prepared  # noqa: F401 (a module-scoped fixture: the tiny checkpoint and its data)

from lit_qa.models.adapter import adapter_filter


def finetune(script, out_dir, checkpoint, data_dir, *extra):
    # The tiny model has 2 layers: adapt the second only, so plain and adapted attention both run.
    return run_script(
        script, "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint), "--out_dir", str(out_dir),
        "--precision", "32-true", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_steps", "4", "--train.warmup_steps", "1", "--train.save_interval", "2",
        "--train.learning_rate", "0.01", "--eval.interval", "2", "--eval.max_batches", "2", "--eval.num_samples", "1",
        "--eval.max_new_tokens", "4", "--adapter.start_layer", "1", "--adapter.prompt_length", "4", *extra,
    )  # fmt: skip


@pytest.mark.parametrize("script, version", [("finetune/adapter.py", 1), ("finetune/adapter_v2.py", 2)])
def test_prepare_finetune_evaluate_from_the_command_line(prepared, tmp_path, script, version):  # noqa: F811
    _, checkpoint, data_dir, train_file = prepared
    run = tmp_path / "run"
    result = finetune(script, run, checkpoint, data_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000004"]
    for folder in (run / "step-000002", run / "step-000004", run / "final"):
        adapter = load_file(folder / "lit_adapter.safetensors")
        assert adapter and all(adapter_filter(key, version) for key in adapter)
        assert json.loads((folder / "adapter_config.json").read_text())["version"] == version
        assert (folder / "base_checkpoint.json").is_file() and (folder / "prepare_config.json").is_file()
    final = load_file(run / "final" / "lit_adapter.safetensors")
    assert sorted(k for k in final if "attn.adapter" in k) == ["transformer.h.1.attn.adapter_gate",
                                                               "transformer.h.1.attn.adapter_wte"]  # fmt: skip
    assert bool(final["transformer.h.1.attn.adapter_gate"].any())  # the gate opened
    if version == 2:
        assert "lm_head.adapter_scale" in final and "transformer.ln_f.weight" in final
    assert (run / "step-000004" / "training_state.pt").is_file()
    assert result.stdout.count("val loss") == 2  # steps 2 and 4
    # The no-answer head trains with it (--na_head true); its standardisation buffers are saved, not trained.
    head = {k: v for k, v in load_file(run / "final" / "na_head.safetensors").items() if k.startswith("proj.")}
    assert f"{sum(t.numel() for t in [*final.values(), *head.values()]):,} trainable" in result.stdout

    eval_out = tmp_path / "eval"
    result = run_script("evaluate/adapter.py", "--adapter_dir", str(run / "final"), "--eval_file", str(train_file),
                        "--out_dir", str(eval_out), "--max_new_tokens", "4", "--precision", "32-true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"LLaMA-Adapter v{version} (layers 1..1)" in result.stderr
    predictions = json.loads((eval_out / "predictions.json").read_text())
    assert len(predictions) == 32 and all(isinstance(v, str) for v in predictions.values())
    assert json.loads((eval_out / "metrics.json").read_text())["total"] == 32


def test_scripts_help_and_bad_arguments(prepared, tmp_path):  # noqa: F811
    _, checkpoint, data_dir, _ = prepared
    result = run_script("finetune/adapter_v2.py", "--help")  # it imports finetune/adapter.py: still standalone
    assert result.returncode == 0 and "--adapter.version" in result.stdout, result.stderr
    result = run_script("finetune/adapter_v2.py", "--print_config", "--train.max_steps", "3")
    assert "version: 2" in result.stdout and "out_dir: out/finetune/adapter_v2" in result.stdout
    for extra, message in [
        (("--adapter.start_layer", "2"), "adapter start_layer=2 leaves no layer to adapt"),
        (("--adapter.prompt_length", "0"), "prompt_length must be >= 1"),
    ]:
        result = finetune("finetune/adapter.py", tmp_path / "run", checkpoint, data_dir, *extra)
        assert result.returncode != 0
        assert message in result.stderr.strip().splitlines()[-1], result.stderr
    result = run_script("evaluate/adapter.py", "--adapter_dir", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: LLaMA-Adapter folder {tmp_path / 'missing'} does not exist"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_two_fsdp_processes_match_one_process(prepared, tmp_path, version):  # noqa: F811
    """Same global batch on 1 process and on 2 FSDP2 processes (gloo): the base is sharded, the adapter trains on
    shards (with activation checkpointing, which only recomputes) and is saved gathered, and the weights match."""
    _, checkpoint, data_dir, _ = prepared
    results = {}
    for devices, strategy, recompute in (("1", "auto", "false"), ("2", "fsdp", "true")):
        out = tmp_path / f"devices-{devices}"
        result = finetune("finetune/adapter.py", out, checkpoint, data_dir, "--devices", devices, "--strategy", strategy,
                          "--adapter.version", version, "--train.max_steps", "3", "--train.save_interval", "3",
                          "--train.activation_checkpointing", recompute)  # fmt: skip
        assert result.returncode == 0, result.stderr
        results[devices] = load_file(out / "final" / "lit_adapter.safetensors")
    assert results["2"].keys() == results["1"].keys()
    for key, tensor in results["1"].items():
        torch.testing.assert_close(results["2"][key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert bool(results["1"]["transformer.h.1.attn.adapter_gate"].any())
