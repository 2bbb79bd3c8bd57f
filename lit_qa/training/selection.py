# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Model selection: which step is the best, kept in ``out_dir/best/``, and the no-answer threshold saved with it.

With ``--eval.f1_questions N`` each validation also answers N fixed questions of the validation split by
extractive greedy decoding, tunes the no-answer rule and threshold on them (`lit_qa.evaluation.calibration`) and
scores them with the official SQuAD metric at that threshold; the step with the best validation F1 (or loss,
``--eval.best_metric``) is kept in ``out_dir/best/``, with the threshold in ``na_threshold.json`` next to the
weights (the scripts write the last one into ``final/``), where ``evaluate/*.py --na_threshold auto`` reads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from lit_qa.evaluation.answers import NA_METHODS
from lit_qa.evaluation.calibration import NA_THRESHOLD_FILE
from lit_qa.files import write_json
from lit_qa.training.args import EvalArgs
from lit_qa.training.progress import Progress
from lit_qa.training.replace import finish_replacement, replacement_pending
from lit_qa.training.resume import write_folder
from lit_qa.training.validation import ValQuestions, format_val

BEST_DIR = "best"
BEST_FILE = "best.json"  # inside best/: the step and the validation metrics it was chosen by


def print_best(fabric: L.Fabric, progress: Progress, out_dir: Path) -> None:
    """Say where the best checkpoint is (the scripts call this at the end), if one was selected."""
    best = progress.best
    if best:
        fabric.print(f"Best checkpoint (step {best['step']}, by {best['criterion']}: {format_val(best['val'])}): "
                     f"{out_dir / BEST_DIR}")  # fmt: skip


def best_criterion(eval_args: EvalArgs, val_questions: ValQuestions | None) -> str | None:
    """What ``best/`` is chosen by, e.g. "val f1 on 200 questions"; None when no ``best/`` is kept.

    A resumed run whose criterion differs (another metric or question count) chooses the best step anew.
    """
    metric = eval_args.tracked_metric()
    if metric == "f1" and val_questions is not None:  # the threshold is tuned on the same questions
        return f"val f1 at the tuned no-answer threshold on {len(val_questions.questions)} questions"
    if metric == "loss":
        return f"val loss on {eval_args.max_batches} batches"
    return None


def update_best(progress: Progress, metric: str | None, criterion: str | None) -> bool:
    """Record the current step as the best if its validation ``metric`` ("f1": higher is better, "loss":
    lower) beats the best so far, strictly (a tie keeps the earlier step); return whether it did."""
    if metric is None or criterion is None:
        return False
    value, best = progress.val[metric], progress.best
    if best is not None and not (value > best["value"] if metric == "f1" else value < best["value"]):
        return False
    progress.best = {"step": progress.step, "criterion": criterion, "metric": metric, "value": value,
                     "val": progress.val}  # fmt: skip
    return True


def save_best(
    fabric: L.Fabric,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    best: dict[str, Any],
    val_questions: ValQuestions | None = None,
) -> None:
    """Write what ``save_fn`` writes, plus ``best.json`` (the step, the criterion and its validation metrics) and,
    when that validation tuned one, the no-answer threshold (`save_na_threshold`), into ``out_dir/best/``,
    atomically like a step checkpoint, replacing the previous best."""

    def write(folder: Path) -> None:
        save_fn(folder)
        if fabric.global_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / BEST_FILE).write_text(json.dumps(best, indent=2) + "\n")
        save_na_threshold(fabric, folder, best["step"], best.get("val"), val_questions)

    write_folder(fabric, out_dir / BEST_DIR, write)


def save_final(
    fabric: L.Fabric,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    progress: Progress,
    val_questions: ValQuestions | None,
    what: str,
) -> None:
    """After `fit`: write the trained weights to ``out_dir/final`` (with the last validation's no-answer
    threshold), and say where they and the best step's ``best/`` are. ``what`` names them, e.g. "LoRA adapter"."""
    save_fn(out_dir / "final")
    save_na_threshold(fabric, out_dir / "final", progress.step, progress.val, val_questions)
    if fabric.global_rank == 0 and (replaced := finish_replacement(out_dir, out_dir / "final")):
        fabric.print(f"--overwrite: final is complete, removed the earlier run's {', '.join(replaced)}")
    fabric.barrier()
    fabric.print(f"Saved the {what} to {out_dir / 'final'}")
    print_best(fabric, progress, out_dir)


def save_na_threshold(
    fabric: L.Fabric, folder: Path, step: int, val: dict[str, Any] | None, val_questions: ValQuestions | None
) -> None:
    """Write ``na_threshold.json`` into ``folder`` (rank 0), next to the weights, for ``evaluate/*.py --na_threshold
    auto``: the threshold tuned at the validation of ``step`` whose metrics are ``val`` (the last validation's or
    the best step's). Nothing is written when that validation tuned none (no ``--eval.f1_questions``).
    """
    val = val or {}
    if fabric.global_rank != 0 or val_questions is None or "na_threshold" not in val:
        return
    record = {"threshold": val["na_threshold"], "tuned_on": f"{len(val_questions.questions)} validation questions "
              f"of {val_questions.source}", "val_f1": val["f1"], "extractive": True, "method": NA_METHODS[val.get("na_source", "span")],
              "source": val.get("na_source", "span"),
              "step": step, "prompt_style": val_questions.prompt_style,
              "no_answer": val_questions.no_answer}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / NA_THRESHOLD_FILE, record)


def remove_stale_best(fabric: L.Fabric, out_dir: Path) -> None:
    """A fresh start's history begins now: a ``best/`` left in ``out_dir`` (e.g. by a run killed before its
    first step checkpoint) belongs to another run."""
    if fabric.global_rank == 0 and not replacement_pending(out_dir):  # else the replacement removes it
        if (out_dir / BEST_DIR).exists():
            fabric.print(f"Removing {out_dir / BEST_DIR}: it is not from this run")
        for stale in out_dir.glob(f"{BEST_DIR}*"):
            if stale.name == BEST_DIR or stale.name.startswith((f"{BEST_DIR}.tmp", f"{BEST_DIR}.old")):
                shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()


def keep_if_best(fabric: L.Fabric, out_dir: Path, save_fn: Callable[[Path], None], progress: Progress,
                 metric: str | None, criterion: str | None, val_questions: ValQuestions | None) -> None:  # fmt: skip
    """After a validation: if this step beats the best so far (`update_best`), write it to ``out_dir/best/``."""
    if update_best(progress, metric, criterion):
        save_best(fabric, out_dir, save_fn, progress.best, val_questions)
        fabric.print(f"step {progress.step} is the best so far by {criterion}: saved {out_dir / BEST_DIR}")


def forget_other_best(fabric: L.Fabric, progress: Progress, criterion: str | None, out_dir: Path) -> None:
    """On resume: a best step chosen by another criterion than this run's (another metric or question count) is
    forgotten, so the best step is chosen anew."""
    if progress.best is not None and progress.best.get("criterion") != criterion:
        fabric.print(f"{out_dir / BEST_DIR} was chosen by {progress.best.get('criterion')}, now by "
                     f"{criterion}: the best step is chosen anew")  # fmt: skip
        progress.best = None
