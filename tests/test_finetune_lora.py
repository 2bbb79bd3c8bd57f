# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""End to end through the command lines, as a user runs them: prepare -> finetune/lora.py -> evaluate/lora.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import load_script, make_tiny_checkpoint, run_script
from safetensors.torch import load_file

from lit_qa.errors import LitQAError

CONTEXTS = [
    ("The Normans were in Normandy in the 10th and 11th centuries.", "When were the Normans in Normandy?",
     "the 10th and 11th centuries"),
    ("The Seine is the river that flows through Paris.", "Which river flows through Paris?", "The Seine"),
    ("Rollo ruled the duchy of Normandy after 911.", "Who ruled the duchy of Normandy?", "Rollo"),
    ("The Normans were in Normandy in the 10th and 11th centuries.", "Which river flows through Paris?", None),
]  # fmt: skip


def squad_file(path, articles: int):
    """An official-format file with ``articles`` articles of the four questions above, in three paragraphs (the
    first one asked twice, so training packs its two questions into one sequence)."""
    data = []
    for a in range(articles):
        paragraphs: dict[str, list] = {}
        for i, (context, question, answer) in enumerate(CONTEXTS):
            answers = [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
            paragraphs.setdefault(context, []).append({"id": f"a{a}q{i}", "question": question, "answers": answers,
                                                       "is_impossible": answer is None})  # fmt: skip
        data.append({"title": f"Article {a}", "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    checkpoint = make_tiny_checkpoint(root)
    train_file = squad_file(root / "train.json", articles=8)
    data_dir = root / "data"
    result = run_script("scripts/prepare_squad.py", "--train_file", str(train_file), "--out_dir", str(data_dir),
                        "--checkpoint_dir", str(checkpoint), "--max_seq_length", "128", "--val_fraction", "0.25")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root, checkpoint, data_dir, train_file


def finetune(root, checkpoint, data_dir, *extra):
    return run_script(
        "finetune/lora.py", "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint),
        "--out_dir", str(root / "run"), "--precision", "32-true", "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2", "--train.max_steps", "6", "--train.warmup_steps", "1",
        "--train.save_interval", "3", "--train.learning_rate", "0.01", "--eval.interval", "3",
        "--eval.max_batches", "2", "--eval.num_samples", "1", "--eval.max_new_tokens", "4",
        "--lora.r", "4", "--lora.mlp", "true", *extra,
    )  # fmt: skip


def test_prepare_finetune_evaluate_from_the_command_line(prepared):
    root, checkpoint, data_dir, train_file = prepared
    result = finetune(root, checkpoint, data_dir)
    assert result.returncode == 0, result.stderr
    run = root / "run"
    # Checkpoints at the save interval and the end, each holding only what was trained plus the resume state.
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000003", "step-000006"]
    for folder in (run / "step-000003", run / "step-000006", run / "final"):
        lora = load_file(folder / "lit_lora.safetensors")
        assert lora and all("lora_" in key for key in lora)
        assert (folder / "lora_config.json").is_file() and (folder / "base_checkpoint.json").is_file()
    assert (run / "step-000006" / "training_state.pt").is_file()
    assert torch.equal(load_file(run / "final" / "lit_lora.safetensors")["transformer.h.0.mlp.up_proj.lora_B"],
                       load_file(run / "step-000006" / "lit_lora.safetensors")["transformer.h.0.mlp.up_proj.lora_B"])  # fmt: skip
    assert result.stdout.count("val loss") == 2  # steps 3 and 6
    # 2 layers x (q, v, gate, up, down) x (A, B), rank 4: the count printed matches the adapter's size.
    trained = sum(t.numel() for name in ("lit_lora.safetensors", "na_head.safetensors")
                  for key, t in load_file(run / "final" / name).items() if key not in ("mean", "std"))  # fmt: skip
    assert f"{trained:,} trainable" in result.stdout
    assert list((run / "logs" / "csv").glob("*/metrics.csv")) and list((run / "logs" / "tensorboard").glob("*/events*"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn from those logs

    # A second run into the same folder is refused rather than mixing checkpoints.
    again = finetune(root, checkpoint, data_dir)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error:")
    assert "--resume" in again.stderr
    # Resuming a finished run changes nothing.
    assert finetune(root, checkpoint, data_dir, "--resume", "auto").returncode == 0

    eval_out = root / "eval"
    result = run_script("evaluate/lora.py", "--lora_dir", str(run / "final"), "--eval_file", str(train_file),
                        "--out_dir", str(eval_out), "--max_new_tokens", "4", "--precision", "32-true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    predictions = json.loads((eval_out / "predictions.json").read_text())
    assert len(predictions) == 32 and all(isinstance(v, str) for v in predictions.values())
    assert json.loads((eval_out / "metrics.json").read_text())["total"] == 32


def test_bad_arguments_give_one_line_errors(prepared, tmp_path):
    root, checkpoint, data_dir, _ = prepared
    for extra, message in [
        (("--train.learning_rate", "-1"), "learning_rate"),
        (("--train.micro_batch_size", "8"), "multiple of micro_batch_size"),
        (("--lora.r", "0"), "rank"),
    ]:
        result = finetune(tmp_path, checkpoint, data_dir, *extra)
        assert result.returncode != 0
        assert message in result.stderr.strip().splitlines()[-1], result.stderr
    result = finetune(tmp_path, checkpoint, tmp_path / "not-prepared")
    assert result.returncode == 2 and "not-prepared" in result.stderr.strip().splitlines()[-1]


def test_data_prepared_with_another_tokenizer_is_refused(prepared, tmp_path, monkeypatch):
    root, checkpoint, data_dir, _ = prepared
    config = json.loads((data_dir / "prepare_config.json").read_text())
    config["tokenizer"]["vocab_size"] += 1
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.pt", "val.pt", "stats.json"):
        (other / name).write_bytes((data_dir / name).read_bytes())
    (other / "prepare_config.json").write_text(json.dumps(config))
    script = load_script("finetune/lora.py")
    monkeypatch.setattr(script.L.Fabric, "launch", lambda fabric, fn, *args: fn(fabric, *args))
    with pytest.raises(LitQAError, match="prepared with another tokenizer"):
        script.setup(data_dir=other, checkpoint_dir=checkpoint, out_dir=tmp_path / "run", precision="32-true")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(prepared, tmp_path, strategy):
    """Same global batch on 1 and on 2 CPU processes (gloo): the same samples per step, the same weights.

    Under FSDP (with activation checkpointing) the base is sharded, LoRA trains on shards, and the saved
    adapter is gathered whole. Both ranks take part in the generation F1 of each validation (FSDP gathers
    weights collectively in every forward pass), which picks the same best step as one process."""
    root, checkpoint, data_dir, _ = prepared
    results, best = {}, {}
    for devices, run_strategy in (("1", "auto"), ("2", strategy)):
        out = tmp_path / f"devices-{devices}"
        # Activation checkpointing only recomputes: the FSDP run uses it and must still match.
        recompute = "true" if run_strategy == "fsdp" else "false"
        result = finetune(out, checkpoint, data_dir, "--devices", devices, "--strategy", run_strategy,
                          "--lora.dropout", "0.0", "--train.max_steps", "3", "--eval.f1_questions", "2",
                          "--train.activation_checkpointing", recompute)  # fmt: skip
        assert result.returncode == 0, result.stderr
        results[devices] = load_file(out / "run" / "final" / "lit_lora.safetensors")
        best[devices] = json.loads((out / "run" / "best" / "best.json").read_text())
    assert results["2"].keys() == results["1"].keys()
    for key, tensor in results["1"].items():
        torch.testing.assert_close(results["2"][key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    assert any(t.abs().sum() > 0 for k, t in results["1"].items() if "lora_B" in k)
    assert best["2"]["step"] == best["1"]["step"] == 3 and best["2"]["val"]["f1"] == best["1"]["val"]["f1"]


def test_fsdp_resume_from_sharded_checkpoint_is_exact(prepared, tmp_path):
    """Two FSDP processes: resuming from the sharded step-3 checkpoint ends with the uninterrupted run's weights."""
    root, checkpoint, data_dir, _ = prepared
    args = ("--devices", "2", "--strategy", "fsdp", "--lora.dropout", "0.0")
    result = finetune(tmp_path, checkpoint, data_dir, *args)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert (run / "step-000003" / "sharded_state" / "metadata.pt").is_file()
    assert not (run / "step-000003" / "training_state.pt").exists()
    uninterrupted = load_file(run / "final" / "lit_lora.safetensors")
    for folder in (run / "step-000006", run / "final"):
        shutil.rmtree(folder)
    result = finetune(tmp_path, checkpoint, data_dir, *args, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert "Resumed from" in result.stdout + result.stderr
    resumed = load_file(run / "final" / "lit_lora.safetensors")
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)
    # torch.distributed.checkpoint reshards: one FSDP process continues the 2-process run.
    for folder in (run / "step-000006", run / "final"):
        shutil.rmtree(folder)
    result = finetune(tmp_path, checkpoint, data_dir, "--devices", "1", "--strategy", "fsdp", "--lora.dropout", "0.0",
                      "--resume", "auto")  # fmt: skip
    assert result.returncode == 0, result.stderr
    resharded = load_file(run / "final" / "lit_lora.safetensors")
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resharded[key], tensor, rtol=1e-4, atol=1e-6, msg=key)
    # A sharded checkpoint cannot be resumed on one process without FSDP: a clear error, not a crash.
    result = finetune(tmp_path, checkpoint, data_dir, "--lora.dropout", "0.0", "--resume", str(run / "step-000003"))
    assert result.returncode == 2 and "resume with --strategy fsdp" in result.stderr
