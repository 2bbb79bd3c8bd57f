# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Model selection on held-out data: with ``--eval.f1_questions`` each validation answers a fixed subset of the
validation split by generation (at a no-answer threshold tuned on them), and ``out_dir/best/`` keeps the step with
the best validation F1, with that threshold in ``na_threshold.json``.

The selection logic is tested in-process with scripted F1 values (answers and scorer stubbed), the whole path
once through the real ``finetune/lora.py`` on the tiny model of ``test_finetune_lora.py``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from test_finetune_lora import finetune, prepared  # noqa: F401 (prepared: a module-scoped fixture)
from test_training import TOKENIZER, crash_after_saving, make_samples

import lit_qa.training.validation as validation
from lit_qa.checkpoints.lora import load_lora_checkpoint
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answers import Answers
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.launch import load_val_questions
from lit_qa.training.loop import fit
from lit_qa.training.selection import BEST_DIR, BEST_FILE
from lit_qa.training.validation import ValQuestions

QUESTIONS = [
    Question(id=f"v{i}", title="t", context="The Seine flows through Paris.", question="Which river?",
             answers=["The Seine"] if i % 2 else [], answer_starts=[0] if i % 2 else [], is_impossible=not i % 2)
    for i in range(4)
]  # fmt: skip
VAL_QUESTIONS = ValQuestions(QUESTIONS, prompt_style="plain", no_answer="unanswerable")


def script_f1(monkeypatch, f1_values: Iterator[float]) -> list[int]:
    """Stub the answers and make the scorer return ``f1_values`` in turn; returns the list of answered counts."""
    answered: list[int] = []

    def score_questions(model, tokenizer, questions, decoding, progress):
        answered.append(len(questions))
        assert decoding.extractive and decoding.na_threshold is not None  # the calibrated, span-constrained pass
        return Answers(final={q.id: "" for q in questions}, best_span={q.id: "" for q in questions},
                       na_prob={q.id: 0.5 for q in questions},
                       na_logits={q.id: {"span": 0.0} for q in questions})  # fmt: skip

    def scorer(questions, predictions):
        if len(questions) < len(QUESTIONS):  # the fresh start's 2-question check: not a validation
            return {"f1": 0.0, "exact": 0.0}
        f1 = next(f1_values)
        return {"f1": f1, "exact": f1 / 2, "HasAns_f1": f1, "NoAns_exact": 100.0}

    monkeypatch.setattr(validation, "score_questions", score_questions)
    monkeypatch.setattr(validation, "evaluate_predictions", scorer)
    return answered


def fit_tiny(out_dir, eval_args: EvalArgs, resume=False, max_steps: int = 6) -> dict:
    """A tiny LoRA run validating after every step and saving a checkpoint (``lora.pt``) after every step."""
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-gqa"))
    apply_lora(model, LoRAConfig(r=2, alpha=4, dropout=0.0, query=True, value=True))
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model.eval())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))

    def save_fn(folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(lora_state_dict(model.module), folder / "lora.pt")

    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=max_steps, learning_rate=1e-2, warmup_steps=0,
                     save_interval=1)  # fmt: skip
    samples = make_samples(8)
    return fit(fabric, model, optimizer, samples, samples[:2], args, eval_args, out_dir, save_fn, TOKENIZER,
               resume=resume, val_questions=VAL_QUESTIONS)  # fmt: skip


def saved_lora(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "lora.pt", weights_only=True)


def assert_best_is_step(out_dir, step: int, f1: float) -> None:
    best = json.loads((out_dir / BEST_DIR / BEST_FILE).read_text())
    assert best["step"] == step and best["metric"] == "f1" and best["value"] == f1
    assert best["criterion"] == "val f1 at the tuned no-answer threshold on 4 questions"
    assert best["val"]["f1"] == f1 and best["val"]["em"] == f1 / 2 and best["val"]["loss"] > 0
    # Every answer is "" here, every p_na 0.5: the tuned threshold abstains on all, and is saved with the weights.
    assert best["val"]["na_threshold"] == 0.0
    saved = json.loads((out_dir / BEST_DIR / "na_threshold.json").read_text())
    assert saved["threshold"] == 0.0 and saved["step"] == step and saved["val_f1"] == f1
    assert saved["tuned_on"] == "4 validation questions of the validation split" and saved["extractive"] is True
    assert best["val"]["has_ans_f1"] == f1 and best["val"]["no_ans_acc"] == 100.0
    in_best, in_step = saved_lora(out_dir / BEST_DIR), saved_lora(out_dir / f"step-{step:06d}")
    assert all(torch.equal(in_best[key], tensor) for key, tensor in in_step.items())
    assert not (out_dir / f"{BEST_DIR}.tmp").exists() and not (out_dir / f"{BEST_DIR}.old").exists()


EVAL = EvalArgs(interval=1, max_batches=1, num_samples=0, f1_questions=len(QUESTIONS))


def test_best_keeps_the_step_with_the_highest_validation_f1(tmp_path, monkeypatch, capsys):
    answered = script_f1(monkeypatch, iter([10.0, 30.0, 20.0, 30.0, 50.0, 40.0]))
    progress = fit_tiny(tmp_path, EVAL)
    assert_best_is_step(tmp_path, 5, 50.0)
    assert not torch.equal(saved_lora(tmp_path / BEST_DIR)["transformer.h.0.attn.q_proj.lora_B"],
                           saved_lora(tmp_path / "step-000006")["transformer.h.0.attn.q_proj.lora_B"])  # fmt: skip
    assert progress.best["step"] == 5 and progress.val["f1"] == 40.0
    assert answered == [2] + [4] * 6  # the start's check, then every validation
    out = capsys.readouterr().out
    # A tie (step 4's 30 = step 2's) keeps the earlier step.
    assert [int(s) for s in re.findall(r"step (\d+) is the best so far", out)] == [1, 2, 5]
    assert "step 5: val loss" in out and "F1 50.00, EM 25.00, has-answer F1 50.00, no-answer accuracy 100.00" in out


def test_resume_keeps_the_best_so_far(tmp_path, monkeypatch):
    f1_values = iter([10.0, 50.0, 20.0, 30.0, 40.0, 45.0])  # one sequence over both processes
    script_f1(monkeypatch, f1_values)
    with crash_after_saving(monkeypatch, "step-000003"):
        fit_tiny(tmp_path, EVAL)
    assert_best_is_step(tmp_path, 2, 50.0)
    progress = fit_tiny(tmp_path, EVAL, resume=True)
    # Forgetting step 2's 50 would make step 4's 30 (and then 40, 45) the best.
    assert progress.best["step"] == 2
    assert_best_is_step(tmp_path, 2, 50.0)


def test_off_means_no_best_and_no_generation(tmp_path, monkeypatch):
    answered = script_f1(monkeypatch, iter([]))
    stale = tmp_path / BEST_DIR
    stale.mkdir(parents=True)  # left by another run: a fresh start removes it
    progress = fit_tiny(tmp_path, EvalArgs(interval=1, max_batches=1, num_samples=0), max_steps=2)
    assert answered == [] and not stale.exists() and progress.best is None
    assert set(progress.val) == {"loss"}


def test_best_by_validation_loss(tmp_path, monkeypatch, capsys):
    script_f1(monkeypatch, iter([]))
    progress = fit_tiny(tmp_path, EvalArgs(interval=1, max_batches=1, num_samples=0, best_metric="loss"))
    printed = re.findall(r"step (\d+): val loss ([\d.]+)", capsys.readouterr().out)
    losses = {int(step): float(loss) for step, loss in printed}
    best = json.loads((tmp_path / BEST_DIR / BEST_FILE).read_text())
    assert best["metric"] == "loss" and best["step"] == min(losses, key=losses.get) == progress.best["step"]


def test_missing_validation_file_is_one_clear_error(tmp_path):
    with pytest.raises(LitQAError, match=r"val-v2.0.json does not exist \(--eval.f1_questions needs it\)"):
        load_val_questions(tmp_path, EvalArgs(f1_questions=3), {})


def test_real_run_writes_best_with_the_highest_validation_f1(prepared, tmp_path):  # noqa: F811
    """Through the command line: generation F1 on 4 of the 8 validation questions after steps 3 and 6."""
    _, checkpoint, data_dir, _ = prepared
    result = finetune(tmp_path, checkpoint, data_dir, "--eval.f1_questions", "4")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    with open(next((run / "logs" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/f1")]
    assert [int(row["step"]) for row in rows] == [3, 6]
    assert all(row["val/em"] and row["val/has_ans_f1"] and row["val/no_ans_acc"] and row["val/loss"] for row in rows)
    f1 = {int(row["step"]): float(row["val/f1"]) for row in rows}
    best = json.loads((run / BEST_DIR / BEST_FILE).read_text())
    assert best["step"] == max(f1, key=f1.get) and best["val"]["f1"] == pytest.approx(f1[best["step"]])
    # The no-answer head trains by default: its validation loss and accuracy, and the rule tuning picked.
    assert set(best["val"]) == {"loss", "f1", "em", "has_ans_f1", "no_ans_acc", "na_threshold", "na_source", "na_loss",
                                "na_acc"}  # fmt: skip
    assert all(row["val/na_threshold"] for row in rows)
    weights = load_file(run / BEST_DIR / "lit_lora.safetensors")
    reference = load_file(run / f"step-{best['step']:06d}" / "lit_lora.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
    load_lora_checkpoint(run / BEST_DIR)  # a complete adapter folder, loadable like final/
    assert f"): {run / BEST_DIR}" in result.stdout.strip().splitlines()[-1]

