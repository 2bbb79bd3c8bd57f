# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""One evaluation end to end, as every ``evaluate/*.py`` script runs it once its model is loaded::

    questions = select_subset(load_squad(eval_file), limit=500)      # lit_qa.data.squad: stratified, seeded
    metrics = run_evaluation(model, tokenizer, questions, out_dir)   # answer, score, write the files

`run_evaluation` decides the no-answer threshold (`lit_qa.evaluation.calibration`), answers the questions in
batches (`lit_qa.evaluation.answering`), appending each batch to a partial file it resumes from after a crash
(`lit_qa.evaluation.results`), and scores them with the official metric (`lit_qa.evaluation.squad_metric`).
`prompt_settings` picks the prompt the model was trained with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lit_qa.data.dataset import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.data.dataset import read_prepare_config
from lit_qa.data.prompts import NO_ANSWER, chat_template_sha256, check_prompt_style
from lit_qa.data.squad import Question, question_ids_sha256
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.answers import NA_METHODS, Answers, default_na_source
from lit_qa.evaluation.calibration import (
    answerability_diagnostics,
    best_na_rule,
    oracle_thresholds,
    resolve_na_threshold,
    rule_comparison,
    tune_na_rules,
)
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.results import (
    BEST_SPANS_FILE,
    METRICS_FILE,
    NA_PROBS_FILE,
    PARTIAL_FILE,
    PREDICTIONS_FILE,
    QUESTION_SCORES_FILE,
    partial_line,
    partial_settings,
    question_scores_record,
    read_partial,
)
from lit_qa.evaluation.squad_metric import evaluate_predictions, no_answer_baseline
from lit_qa.files import write_atomic, write_json
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer


def run_evaluation(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    out_dir: Path,
    decoding: DecodingSettings = DecodingSettings(),
    info: dict[str, Any] | None = None,
    calibration_questions: list[Question] | None = None,
    threshold_dir: Path | None = None,
) -> dict[str, Any]:
    """Answer, score and write ``predictions.json``, ``metrics.json``, ``question_scores.json`` and (with a
    threshold) ``na_probs.json``.

    Each batch's answers are appended to ``predictions.partial.jsonl`` as they come (the file is removed at
    the end). Run again with the same questions, model and settings after a crash or a kill, and only the
    questions not in that file are answered; a file from other settings is ignored with a warning, so the
    answers of two different runs are never mixed.

    Args:
        model, tokenizer, questions: See `lit_qa.evaluation.answering.score_questions`.
        out_dir: Folder for the files (created if needed).
        decoding: The decoding settings. Its ``na_threshold`` may also be a request (`resolve_na_threshold`):
            "auto" (the threshold saved in ``threshold_dir``, else tuned for F1 on ``calibration_questions``,
            else 0.5) or "off" (plain greedy decoding, as None).
        info: Run settings to record in ``metrics.json`` (paths, precision, limit, seed, subset, ...).
        calibration_questions: Held-out questions (never the evaluation set) to tune the threshold on, for "auto".
        threshold_dir: The fine-tuned weights' folder, where training saves ``na_threshold.json``.

    Returns:
        The metrics written: the official ones, ``no_answer_baseline``, the threshold used and where it came from,
        the oracle best-threshold scores (``best_f1``, ``best_exact``; see ``ORACLE_NOTE``), the span and abstain
        diagnostics (`answerability_diagnostics`), timing and ``info``. With a threshold, ``best_spans.json`` holds
        every question's best span, so other thresholds can be scored without decoding again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoding, na_record, tuned = decide_na_rule(model, tokenizer, decoding, calibration_questions, threshold_dir)
    settings = partial_settings(model, questions, decoding, info)
    start = time.perf_counter()
    scored, resumed = answer_resumably(model, tokenizer, questions, out_dir / PARTIAL_FILE, settings, decoding)
    seconds = time.perf_counter() - start
    metrics = {
        **evaluate_predictions(questions, scored.final),
        "no_answer_baseline": no_answer_baseline(questions),
        "num_questions": len(questions),
        "question_ids_sha256": question_ids_sha256(questions),
        "seconds": round(seconds, 3),
        "questions_per_second": round((len(questions) - resumed) / max(seconds, 1e-9), 3),
        **({"resumed_answers": resumed} if resumed else {}),
        "prompt_style": decoding.prompt_style,
        "no_answer": decoding.no_answer,
        "batch_size": decoding.batch_size,
        "max_new_tokens": decoding.max_new_tokens,
        "na_threshold": decoding.na_threshold,
        **na_record,
        "extractive": decoding.extractive,
        **(info or {}),
    }
    write_results(out_dir, questions, scored, metrics, decoding.na_threshold is not None, tuned)
    return metrics


def decide_na_rule(
    model: GPT,
    tokenizer: Tokenizer,
    decoding: DecodingSettings,
    calibration_questions: list[Question] | None,
    threshold_dir: Path | None,
) -> tuple[DecodingSettings, dict[str, Any], dict[str, tuple[float, float]]]:
    """Resolve ``decoding.na_threshold`` (a number, "auto", "off" or None) and the no-answer rule: the threshold
    saved in ``threshold_dir``, else tuned on ``calibration_questions`` (one decoding pass), else 0.5.

    Returns:
        The settings to decode with (a number or None, and the rule), what to record of where they came from in
        ``metrics.json``, and every rule's (threshold, F1) when tuned here (`tune_na_rules`; else empty).
    """
    extractive = decoding.extractive
    na_threshold, na_record = resolve_na_threshold(decoding.na_threshold, threshold_dir, bool(calibration_questions),
                                                   extractive)  # fmt: skip
    na_source = na_record.pop("na_source", None) or decoding.na_source or default_na_source(model)
    tuned = {}
    if na_threshold == "calibrate":
        na_source, na_threshold, tuned = calibrate(model, tokenizer, calibration_questions, decoding, na_record)
    if na_threshold is not None:
        na_record.update(na_source=na_source, na_method=NA_METHODS[na_source])
    return replace(decoding, na_threshold=na_threshold, na_source=na_source), na_record, tuned


def calibrate(
    model: GPT,
    tokenizer: Tokenizer,
    calibration_questions: list[Question],
    decoding: DecodingSettings,
    na_record: dict[str, Any],
) -> tuple[str, float, dict[str, tuple[float, float]]]:
    """Tune the no-answer rule and threshold for F1 on held-out questions (one decoding pass), recording how in
    ``na_record``.

    Returns:
        The rule, its threshold and every rule's (threshold, F1) (`tune_na_rules`).
    """
    calibrated = score_questions(model, tokenizer, calibration_questions, replace(decoding, na_threshold=1.0))
    tuned = tune_na_rules(calibration_questions, calibrated)
    na_source, na_threshold, calibration_f1 = best_na_rule(calibration_questions, calibrated)
    na_record.update(
        calibration_questions=len(calibration_questions),
        calibration_f1=round(calibration_f1, 3),
        calibration_always_abstain_f1=round(no_answer_baseline(calibration_questions)["f1"], 3),
    )
    print(f"no-answer rule {na_source}, threshold {na_threshold:.4f} (F1 {calibration_f1:.2f} on "
          f"{len(calibration_questions)} calibration questions)", file=sys.stderr)  # fmt: skip
    return na_source, na_threshold, tuned


def answer_resumably(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    partial_path: Path,
    settings: dict[str, Any],
    decoding: DecodingSettings,
) -> tuple[Answers, int]:
    """`score_questions`, resuming from the answers ``partial_path`` holds (if written with ``settings``) and
    appending each new batch to it as soon as it is answered.

    Returns:
        All the answers, and how many of them were resumed from the file.
    """
    scored = read_partial(partial_path, settings)
    if resumed := len(scored.final):
        print(f"resuming {resumed} of {len(questions)} answers from {partial_path}", file=sys.stderr)
    # Rewritten whole first: a line cut short by a kill must not run into the next one appended.
    known = "".join(partial_line(scored, qid) for qid in scored.final)
    write_atomic(partial_path, (json.dumps({"settings": settings}) + "\n" + known).encode())
    with open(partial_path, "a", encoding="utf-8") as partial:

        def save_partial(batch_answers: dict[str, str]) -> None:
            partial.write("".join(partial_line(scored, qid) for qid in batch_answers))
            partial.flush()  # in the OS's hands now: a killed process loses nothing

        score_questions(model, tokenizer, questions, decoding, on_batch=save_partial, result=scored)
    return scored, resumed


def write_results(
    out_dir: Path,
    questions: list[Question],
    scored: Answers,
    metrics: dict[str, Any],
    with_threshold: bool,
    tuned: dict[str, tuple[float, float]],
) -> None:
    """Write ``predictions.json``, ``question_scores.json`` and ``metrics.json`` (with a threshold first adding the
    oracle scores, the answerability diagnostics and the rule comparison to ``metrics``, and writing
    ``na_probs.json`` and ``best_spans.json``), then remove the partial file."""
    write_json(out_dir / PREDICTIONS_FILE, scored.final)
    # From every answer, resumed ones included, so it always matches predictions.json.
    write_json(out_dir / QUESTION_SCORES_FILE, question_scores_record(questions, scored.final))
    if with_threshold:
        metrics.update(oracle_thresholds(questions, scored))
        metrics.update(answerability_diagnostics(questions, scored))
        if tuned:
            metrics["na_rules"] = rule_comparison(questions, scored, tuned)
        write_json(out_dir / NA_PROBS_FILE, {q.id: scored.na_prob[q.id] for q in questions})
        write_json(out_dir / BEST_SPANS_FILE, {q.id: scored.best_span[q.id] for q in questions})
    write_json(out_dir / METRICS_FILE, metrics)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)


def prompt_settings(
    trained_dir: Path,
    prompt_style: str | None,
    no_answer: str | None,
    warn_if_unknown: bool = True,
    tokenizer: Tokenizer | None = None,
) -> tuple[str, str]:
    """The prompt style and no-answer string: the flags if given, else those the model in ``trained_dir`` (an
    adapter or a fine-tuned checkpoint folder) was trained with, as recorded in its ``prepare_config.json``.

    A flag that differs from the training setting is honoured with a warning: the model was never asked
    that way, so its scores will likely drop. Without a ``prepare_config.json`` (e.g. a base model) the training
    settings are unknown: the defaults are used and flags are taken as they are.

    Args:
        trained_dir: The folder of the trained weights.
        prompt_style: ``--prompt_style``, or None for the training setting.
        no_answer: ``--no_answer``, or None for the training setting.
        warn_if_unknown: Warn when ``trained_dir`` has no ``prepare_config.json``.
        tokenizer: The evaluation tokenizer: with the chat style, warn if its chat template is not the one the
            data was prepared with (see `check_chat_template`).

    Raises:
        LitQAError: If the prompt style is unknown.
    """
    path = Path(trained_dir) / PREPARE_CONFIG_FILE
    prepared = read_prepare_config(trained_dir) if path.is_file() else None
    if prepared is None and warn_if_unknown:
        print(f"warning: {trained_dir} has no {PREPARE_CONFIG_FILE}; assuming the default prompt settings",
              file=sys.stderr)  # fmt: skip
    defaults = {"prompt_style": "plain", "no_answer": NO_ANSWER}
    chosen = {"prompt_style": prompt_style, "no_answer": no_answer}
    for key, value in chosen.items():
        trained = (prepared or {}).get(key, defaults[key])
        if value is None:
            chosen[key] = trained
        elif prepared is not None and value != trained:
            print(f"warning: --{key} {value!r} differs from {trained!r}, which the model was trained with",
                  file=sys.stderr)  # fmt: skip
    check_prompt_style(chosen["prompt_style"])
    if tokenizer is not None:
        check_chat_template(trained_dir, chosen["prompt_style"], tokenizer)
    return chosen["prompt_style"], chosen["no_answer"]


def check_chat_template(trained_dir: Path, prompt_style: str, tokenizer: Tokenizer) -> None:
    """Warn when a chat-style model is evaluated with another chat template than its data was prepared with
    (``chat_template_sha256`` in ``trained_dir/prepare_config.json``): the prompts then differ from training's.
    Nothing is checked for the plain style or without a recorded template."""
    path = Path(trained_dir) / PREPARE_CONFIG_FILE
    if prompt_style != "chat" or not path.is_file():
        return
    recorded = read_prepare_config(trained_dir).get("chat_template_sha256")
    current = chat_template_sha256(tokenizer)
    if recorded is not None and recorded != current:
        current = f"sha256 {current[:12]}" if current else "none"
        print(f"warning: the chat template of {tokenizer.checkpoint_dir} ({current}) is not the one "
              f"the model was trained with ({path}: {recorded[:12]}); its prompts differ from training's",
              file=sys.stderr)  # fmt: skip
