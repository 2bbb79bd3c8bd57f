# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The files an evaluation writes, and resuming an interrupted one.

``predictions.json`` (id -> answer, ``""`` = no answer), ``metrics.json``, ``question_scores.json`` (each
question's official EM and F1, and always no-answer's F1: `question_scores_record`, for paired comparisons), and
with a threshold ``na_probs.json`` and ``best_spans.json``. While answering, each batch is appended to
``predictions.partial.jsonl``: a header line with the settings (`partial_settings`), then one line per question;
`read_partial` resumes from it only when the settings are the same, so the answers of two different runs are
never mixed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lit_qa.data.squad import Question, question_ids_sha256
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answers import NA_METHODS, Answers
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.squad_metric import question_scores

PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
NA_PROBS_FILE = "na_probs.json"
BEST_SPANS_FILE = "best_spans.json"  # with a threshold: every question's best span, abstained or not
QUESTION_SCORES_FILE = "question_scores.json"  # id -> exact, f1, no_answer_f1 (`question_scores_record`)
PARTIAL_FILE = "predictions.partial.jsonl"  # header line, then one line per answered question


def check_evaluation_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse to write over a finished evaluation, before any model is loaded.

    A folder holding only ``predictions.partial.jsonl`` is an interrupted run, which `run_evaluation` resumes.

    Raises:
        LitQAError: If ``out_dir`` holds ``metrics.json`` or ``predictions.json`` and ``overwrite`` is False.
    """
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise LitQAError(f"--out_dir {out_dir} is a file, not a folder")
    finished = [name for name in (METRICS_FILE, PREDICTIONS_FILE) if (Path(out_dir) / name).exists()]
    if finished and not overwrite:
        raise LitQAError(f"{out_dir} already holds a finished evaluation ({finished[0]}); pass --overwrite true "
                         "to replace it or choose another --out_dir")  # fmt: skip


def question_scores_record(questions: list[Question], predictions: dict[str, str]) -> dict[str, dict[str, float]]:
    """What ``question_scores.json`` holds: for each question (in order) the official exact match (0 or 1) and F1
    (0 to 1) of ``predictions``, and the F1 of answering "no answer" (``no_answer_f1``), so that a run can be
    compared with the always-no-answer floor question by question (scripts/compare_results.py) without the
    evaluation file. Their means are ``metrics.json``'s ``exact``, ``f1`` and ``no_answer_baseline.f1`` / 100."""
    exact, f1 = question_scores(questions, predictions)
    # Scored, not assumed (1 if unanswerable): a gold answer that normalizes to nothing ("the") counts as "".
    _, no_answer_f1 = question_scores(questions, {q.id: "" for q in questions})
    return {q.id: {"exact": exact[q.id], "f1": f1[q.id], "no_answer_f1": no_answer_f1[q.id]} for q in questions}


def partial_settings(
    model: torch.nn.Module, questions: list[Question], decoding: DecodingSettings, info: dict[str, Any] | None
) -> dict[str, Any]:
    """What a partial answers file must have been written with to be resumed: the same questions, weights,
    prompt and decoding settings, and run settings (``info``). The batch size is left out: it does not change
    the answers, and a smaller one is the usual fix for an out-of-memory crash."""
    settings = {"question_ids_sha256": question_ids_sha256(questions), "weights": weights_sample_sha256(model),
                "prompt_style": decoding.prompt_style, "no_answer": decoding.no_answer,
                "max_new_tokens": decoding.max_new_tokens, "na_threshold": decoding.na_threshold,
                **(info or {})}  # fmt: skip
    if decoding.na_threshold is not None:  # answers abstained by another rule never mix in
        settings["na_method"] = NA_METHODS[decoding.na_source]
    if decoding.extractive:  # only then: free-decoding partial files written before the flag existed still resume
        settings["extractive"] = True
    if settings.get("subset") == "questions":  # the default: partial files from before --subset still resume
        del settings["subset"]
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file


def weights_sample_sha256(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights: every tensor's name and shape and its first and last 8 values (a
    retrained model differs in those; hashing every weight of a 7B model would take longer than a batch)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        values = torch.cat([flat[:8], flat[-8:]]).to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + values.numpy().tobytes())
    return digest.hexdigest()


def read_partial(path: Path, settings: dict[str, Any]) -> Answers:
    """The answers in a partial file written with ``settings``; none (with a warning) if it was written with
    other settings. A last line cut short by a kill is dropped."""
    answers = Answers(final={})
    if not path.is_file():
        return answers
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    try:
        saved = json.loads(lines[0])["settings"]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        saved = None
    saved = saved if isinstance(saved, dict) else {}
    if saved != settings:
        differs = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        print(f"warning: ignoring {path}: written with other settings (differs in: {', '.join(differs)})",
              file=sys.stderr)  # fmt: skip
        return answers
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            qid, answer = entry["id"], entry["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        answers.final[qid] = answer
        if "na_prob" in entry:
            answers.best_span[qid], answers.na_prob[qid] = entry["best_span"], entry["na_prob"]
            answers.na_logits[qid] = entry.get("na_logits", {})
    return answers


def partial_line(answers: Answers, qid: str) -> str:
    """One question's answer (and with a threshold its best span and p_na) as a JSON line."""
    entry = {"id": qid, "answer": answers.final[qid]}
    if qid in answers.na_prob:
        entry.update(best_span=answers.best_span[qid], na_prob=answers.na_prob[qid], na_logits=answers.na_logits[qid])
    return json.dumps(entry, ensure_ascii=False) + "\n"


def format_summary(metrics: dict[str, Any], out_dir: Path) -> str:
    """A few lines for the terminal: scores, the no-answer floor, speed and where the files are."""
    baseline = metrics["no_answer_baseline"]
    lines = [
        f"{metrics['num_questions']} questions in {metrics['seconds']:.1f} s "
        f"({metrics['questions_per_second']:.2f} questions/s)",
        f"EM {metrics['exact']:.2f}  F1 {metrics['f1']:.2f}  "
        f"(always no-answer: EM {baseline['exact']:.2f}  F1 {baseline['f1']:.2f})",
    ]
    groups = [f"{g} EM {metrics[f'{g}_exact']:.2f} F1 {metrics[f'{g}_f1']:.2f} ({metrics[f'{g}_total']} questions)"
              for g in ("HasAns", "NoAns") if f"{g}_total" in metrics]  # fmt: skip
    lines.append("  ".join(groups))
    if metrics.get("na_threshold") is not None:
        lines.append(f"no-answer threshold {metrics['na_threshold']:.4f} ({metrics['na_threshold_source']}); oracle "
                     f"(best threshold on these very questions): F1 {metrics['best_f1']:.2f} at "
                     f"{metrics['best_f1_thresh']:.4f}")  # fmt: skip
        diagnostics = []
        if metrics.get("span_HasAns_f1") is not None:
            diagnostics.append(f"HasAns F1 if never abstaining (best spans) {metrics['span_HasAns_f1']:.2f}")
        if metrics.get("na_prob_auc") is not None:
            diagnostics.append(f"p_na ROC AUC {metrics['na_prob_auc']:.3f} (0.5 = chance)")
        if diagnostics:
            lines.append("; ".join(diagnostics))
    else:
        lines.append(f"no-answer decision: {metrics.get('na_threshold_source', 'off')}")
    lines.append(f"wrote {out_dir / PREDICTIONS_FILE} and {out_dir / METRICS_FILE}")
    return "\n".join(lines)
