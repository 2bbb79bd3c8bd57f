# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Full fine-tuning through the command line: finetune/full.py on one process, and FSDP2 on two (gloo)."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import run_script
from safetensors.torch import load_file
from test_finetune_lora import prepared  # noqa: F401 (a module-scoped fixture: the tiny checkpoint and its data)

from lit_qa.checkpoints.folder import load_model


def finetune_full(out_dir, checkpoint, data_dir, *extra):
    return run_script(
        "finetune/full.py", "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint),
        "--out_dir", str(out_dir), "--precision", "32-true", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2", "--train.max_steps", "4", "--train.warmup_steps", "1",
        "--train.save_interval", "2", "--train.learning_rate", "0.001", "--eval.interval", "2",
        "--eval.max_batches", "2", "--eval.num_samples", "1", "--eval.max_new_tokens", "4", *extra,
    )  # fmt: skip


def test_full_finetune_writes_a_checkpoint_that_evaluation_loads(prepared, tmp_path):  # noqa: F811
    _, checkpoint, data_dir, train_file = prepared
    result = finetune_full(tmp_path / "run", checkpoint, data_dir)
    assert result.returncode == 0, result.stderr
    final = tmp_path / "run" / "final"
    base, tuned = load_file(checkpoint / "lit_model.safetensors"), load_file(final / "lit_model.safetensors")
    assert base.keys() == tuned.keys()
    assert all(not torch.equal(base[key], tuned[key]) for key in base)  # every weight trained
    assert (final / "prepare_config.json").is_file() and (final / "tokenizer.json").is_file()
    # The trainable-parameter count is the whole model and the no-answer head, saved beside it (not in its weights).
    model, _ = load_model(final)
    head = {k: v for k, v in load_file(final / "na_head.safetensors").items() if k.startswith("proj.")}  # not buffers
    trained = sum(p.numel() for p in model.parameters()) + sum(t.numel() for t in head.values())
    assert f"{trained:,} trainable of" in result.stdout

    result = run_script("evaluate/base.py", "--checkpoint_dir", str(final), "--eval_file", str(train_file),
                        "--out_dir", str(tmp_path / "eval"), "--max_new_tokens", "4", "--precision", "32-true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["total"] == 32


def test_two_process_fsdp_matches_one_process_and_resumes_from_shards(prepared, tmp_path):  # noqa: F811
    """FSDP2 shards weights, gradients and AdamW states over 2 processes: same weights as 1 process; a run
    resumed from its sharded step-2 checkpoint ends exactly where the uninterrupted one did; the
    consolidated checkpoint loads in one process."""
    _, checkpoint, data_dir, _ = prepared
    assert finetune_full(tmp_path / "one", checkpoint, data_dir).returncode == 0
    run = tmp_path / "fsdp"
    args = ("--devices", "2", "--strategy", "fsdp")
    result = finetune_full(run, checkpoint, data_dir, *args)
    assert result.returncode == 0, result.stderr
    one, sharded = load_file(tmp_path / "one" / "final" / "lit_model.safetensors"), load_file(run / "final" / "lit_model.safetensors")
    for key, tensor in one.items():
        torch.testing.assert_close(sharded[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert len(list((run / "step-000002" / "sharded_state").glob("*.distcp"))) == 2  # one file per rank

    for folder in (run / "step-000004", run / "final"):
        shutil.rmtree(folder)
    result = finetune_full(run, checkpoint, data_dir, *args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    resumed = load_file(run / "final" / "lit_model.safetensors")
    for key, tensor in sharded.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)
    load_model(run / "final")  # consolidated: a plain single-process checkpoint


def test_torchrun_and_fabric_run_launch_the_same_training(prepared, tmp_path):  # noqa: F811
    """Processes started by torchrun or by `fabric run` (instead of by the script) train the same weights."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    _, checkpoint, data_dir, _ = prepared
    bin_dir = os.path.dirname(sys.executable)
    script_args = ["finetune/full.py", "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint),
                   "--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "2",
                   "--train.warmup_steps", "1", "--train.learning_rate", "0.001", "--eval.num_samples", "0",
                   "--strategy", "fsdp"]  # fmt: skip
    launchers = {
        "torchrun": [f"{bin_dir}/torchrun", "--standalone", "--nproc_per_node", "2", *script_args,
                     "--devices", "2", "--precision", "32-true"],
        # `fabric run` takes --devices/--precision/--strategy itself, wherever they are written.
        "fabric": [f"{bin_dir}/fabric", "run", "--accelerator", "cpu", "--devices", "2", "--precision", "32-true",
                   *script_args],
    }  # fmt: skip
    weights = {}
    for name, command in launchers.items():
        result = subprocess.run([*command, "--out_dir", str(tmp_path / name)], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name] = load_file(tmp_path / name / "final" / "lit_model.safetensors")
    result = finetune_full(tmp_path / "one", checkpoint, data_dir, "--train.max_steps", "2", "--eval.num_samples", "0")
    assert result.returncode == 0, result.stderr
    one = load_file(tmp_path / "one" / "final" / "lit_model.safetensors")
    for key, tensor in one.items():
        for name in launchers:
            torch.testing.assert_close(weights[name][key], tensor, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
