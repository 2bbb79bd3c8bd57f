# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""No-answer calibration: which rule and which threshold on p_na to abstain at, and how well p_na separates.

`best_na_threshold` scores every threshold from one decoding pass; `best_na_rule` picks the rule and threshold
that maximise F1 on held-out questions, always and never abstaining among the candidates, so on those questions
the chosen rule is never worse than either. The training loop saves its choice next to the fine-tuned weights
(``na_threshold.json``), which `resolve_na_threshold` / `read_na_threshold` find again. ``p_na`` is written to
``na_probs.json`` (the official script's ``--na-prob-file``); `roc_auc` and `answerability_diagnostics` tell
answering from abstaining apart.
"""

from __future__ import annotations

import sys
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

from lit_qa.data.squad import Question, load_squad
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answers import NA_METHODS, Answers, na_logit
from lit_qa.evaluation.squad_metric import evaluate_predictions, exact_match, f1_score, gold_answers
from lit_qa.files import read_json

NA_THRESHOLD_FILE = "na_threshold.json"  # next to fine-tuned weights: the threshold tuned during training

ORACLE_NOTE = ("best_f1/best_exact: the best threshold chosen on these evaluation questions themselves (as the "
               "official script's --na-prob-file output); an oracle for reference, not a result")  # fmt: skip


def apply_na_threshold(answers: Answers, threshold: float, questions: list[Question]) -> dict[str, str]:
    """The answers at ``threshold``: ``""`` where p_na >= threshold, else the best span."""
    return {q.id: "" if answers.na_prob[q.id] >= threshold else answers.best_span[q.id] for q in questions}


def best_na_threshold(
    questions: list[Question], answers: Answers, metric: Literal["f1", "exact"] = "f1"
) -> tuple[float, float]:
    """The abstain threshold that maximises F1 (or EM) on ``questions``, and that score (0-100).

    Every question contributes the score of "no answer" when its p_na reaches the threshold and that of its best
    span otherwise, so all thresholds are scored from one decoding pass: sorted by p_na once, the score of
    abstaining on the k most likely no-answers is a prefix sum plus a suffix sum. Only cuts between distinct
    probabilities count (no threshold splits equal ones). The threshold returned is the midpoint between the
    highest p_na answered and the lowest abstained (0 to abstain on all, 1 to answer all); among cuts of equal
    score the one abstaining most wins, as in the official script.

    Raises:
        LitQAError: If there are no questions, or one has no p_na (answers scored without ``na_threshold``).
    """
    if not questions:
        raise LitQAError("tuning the no-answer threshold needs at least one question")
    if missing := [q.id for q in questions if q.id not in answers.na_prob]:
        raise LitQAError(f"tuning the no-answer threshold needs answers scored with an na_threshold ({missing[0]} "
                         "has no no-answer probability)")  # fmt: skip
    score = f1_score if metric == "f1" else exact_match
    rows = []  # (p_na, score if abstaining, score if answering), by p_na
    for question in questions:
        golds = gold_answers(question)
        rows.append((answers.na_prob[question.id], max(score("", g) for g in golds),
                     max(score(answers.best_span[question.id], g) for g in golds)))  # fmt: skip
    rows.sort(key=lambda row: row[0])
    answered = list(accumulate((row[2] for row in rows), initial=0.0))  # [k]: the k lowest p_na answer
    abstained = list(accumulate((row[1] for row in reversed(rows)), initial=0.0))[::-1]  # [k]: rows k.. abstain
    n = len(rows)
    cuts = [k for k in range(n + 1) if k in (0, n) or rows[k - 1][0] < rows[k][0]]
    totals = [answered[k] + abstained[k] for k in cuts]
    best = max(totals)
    i = next(i for i, total in enumerate(totals) if total >= best - 1e-9)  # float sums: ties up to rounding
    return _threshold_at(rows, cuts[i]), 100.0 * totals[i] / n


def best_na_rule(
    questions: list[Question], answers: Answers, sources: tuple[str, ...] | None = None
) -> tuple[str, float, float]:
    """The no-answer rule and threshold that maximise F1 on ``questions``: `best_na_threshold` for each rule in
    ``sources`` (default: every rule the answers have logits for), the best F1 winning, ties going to the rule
    listed first in `NA_SOURCES`. Thresholds 0 (always abstain) and 1 (never) are candidates of every rule.

    Returns:
        ``(rule, threshold, F1 at it)``.

    Raises:
        LitQAError: If no rule can be scored (answers scored without ``na_threshold``).
    """
    tuned = tune_na_rules(questions, answers, sources)
    best = max(f1 for _, f1 in tuned.values())
    source = next(source for source, (_, f1) in tuned.items() if f1 >= best - 1e-9)
    return source, *tuned[source]


def tune_na_rules(
    questions: list[Question], answers: Answers, sources: tuple[str, ...] | None = None
) -> dict[str, tuple[float, float]]:
    """Rule to (best threshold, its F1) on ``questions`` (`best_na_threshold`), for each rule in ``sources``
    (default: every rule the answers have logits for), in `NA_SOURCES` order."""
    sources = answers.sources() if sources is None else sources
    if not sources:
        raise LitQAError("tuning the no-answer rule needs answers scored with an na_threshold")
    return {source: best_na_threshold(questions, answers.with_source(source, questions)) for source in sources}


def _threshold_at(rows: list[tuple[float, float, float]], k: int) -> float:
    """A threshold that answers rows[:k] and abstains on rows[k:] (sorted by p_na)."""
    if k == 0:
        return 0.0
    if k == len(rows):
        return 1.0
    low, high = rows[k - 1][0], rows[k][0]
    middle = (low + high) / 2
    return middle if low < middle else high  # adjacent floats: the midpoint rounds onto one of them


def oracle_thresholds(questions: list[Question], answers: Answers) -> dict[str, Any]:
    """The official script's ``--na-prob-file`` extras: the best EM and F1 over all thresholds on ``questions``
    themselves, and those thresholds (ours abstain at p_na >= t, the official script's at p_na > t; the midpoints
    `best_na_threshold` returns separate the same questions either way)."""
    f1_threshold, f1 = best_na_threshold(questions, answers, "f1")
    exact_threshold, exact = best_na_threshold(questions, answers, "exact")
    return {"best_exact": exact, "best_exact_thresh": exact_threshold, "best_f1": f1, "best_f1_thresh": f1_threshold,
            "best_thresholds_note": ORACLE_NOTE}  # fmt: skip


def rule_comparison(
    questions: list[Question], answers: Answers, tuned: dict[str, tuple[float, float]]
) -> dict[str, dict[str, Any]]:
    """Per no-answer rule: its threshold and F1 on the calibration questions (``tuned``, `tune_na_rules`) and the
    official scores of these questions at that threshold: the ablation of the rules from one decoding pass."""
    table = {}
    for source, (threshold, calibration_f1) in tuned.items():
        by_rule = answers.with_source(source, questions)
        scores = evaluate_predictions(questions, apply_na_threshold(by_rule, threshold, questions))
        table[source] = {"threshold": threshold, "calibration_f1": round(calibration_f1, 3),
                         **{key: scores[key] for key in ("exact", "f1", "HasAns_f1", "NoAns_exact") if key in scores},
                         "na_prob_auc": roc_auc([by_rule.na_prob[q.id] for q in questions],
                                                [not q.answers for q in questions])}  # fmt: skip
    return table


def answerability_diagnostics(questions: list[Question], answers: Answers) -> dict[str, Any]:
    """Tell the two skills SQuAD 2.0 F1 mixes apart: copying the right span, and knowing when to abstain.

    Returns:
        ``span_HasAns_f1``: F1 of the best spans on the answerable questions, as if the model never abstained
        (None without answerable questions). ``na_prob_auc``: ROC AUC of p_na for telling unanswerable from
        answerable questions, 0.5 being chance (None unless both kinds are present).
    """
    answerable = [q for q in questions if q.answers]
    span_f1 = [max(f1_score(answers.best_span[q.id], g) for g in gold_answers(q)) for q in answerable]
    na_probs = [answers.na_prob[q.id] for q in questions]
    unanswerable = [not q.answers for q in questions]
    diagnostics = {"span_HasAns_f1": 100.0 * sum(span_f1) / len(span_f1) if span_f1 else None,
                   "na_prob_auc": roc_auc(na_probs, unanswerable)}  # fmt: skip
    if len(sources := answers.sources()) > 1:  # which rule separates best, whichever is in use
        diagnostics["na_prob_auc_by_rule"] = {
            source: roc_auc([na_logit(answers.na_logits[q.id], source) for q in questions], unanswerable)
            for source in sources
        }
    return diagnostics


def roc_auc(scores: list[float], positive: list[bool]) -> float | None:
    """The probability that a random positive scores above a random negative, ties counting one half (the
    Mann-Whitney form of the ROC AUC); None unless both classes are present."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, start = 0.0, 0
    while start < len(order):  # a run of equal scores shares the mean of its 1-based ranks
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        rank_sum += sum(positive[i] for i in order[start : end + 1]) * (start + end + 2) / 2
        start = end + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def resolve_na_threshold(
    na_threshold: float | str | None, threshold_dir: Path | None = None, calibration: bool = False,
    extractive: bool = True, verbose: bool = True,
) -> tuple[float | None | Literal["calibrate"], dict[str, Any]]:  # fmt: skip
    """Decide the no-answer threshold from ``--na_threshold``, before any model is loaded.

    Args:
        na_threshold: A float in [0, 1]; "off" or None: plain greedy decoding; "auto": the threshold saved in
            ``threshold_dir`` (`read_na_threshold`), else tuned on the calibration questions, else 0.5 (the
            no-answer string as likely per token as the best span) with a warning.
        threshold_dir: The fine-tuned weights' folder (None: nothing saved to look for).
        calibration: Whether calibration questions were given.
        extractive: Whether answers are span-constrained (a saved threshold tuned otherwise gets a warning).
        verbose: Print which threshold is used when there is a choice (the scripts check early, quietly).

    Returns:
        The threshold (None for off, "calibrate" to tune it on the calibration questions) and what to record
        in ``metrics.json`` about where it came from; for a saved threshold also its rule (``na_source``).

    Raises:
        LitQAError: For a value out of range, or a saved threshold file that is unreadable.
    """
    if na_threshold is None or na_threshold == "off":
        return None, {"na_threshold_source": "off (plain greedy decoding)"}
    if na_threshold == "auto":
        saved = read_na_threshold(threshold_dir) if threshold_dir is not None else None
        if saved is not None:
            path = Path(threshold_dir) / NA_THRESHOLD_FILE
            if calibration and verbose:
                print(f"note: using the threshold saved in {path}; --calibration_file is not used", file=sys.stderr)
            if saved.get("extractive", True) != extractive and verbose:
                print(f"warning: {path} was tuned with extractive={saved.get('extractive')}, this evaluation uses "
                      f"extractive={extractive}", file=sys.stderr)  # fmt: skip
            return float(saved["threshold"]), {"na_threshold_source": f"saved: {path}", "na_source": saved["source"],
                                               "na_threshold_saved": saved}  # fmt: skip
        if calibration:
            return "calibrate", {"na_threshold_source": "tuned on --calibration_file"}
        if verbose:
            where = f"{threshold_dir} has no {NA_THRESHOLD_FILE}" if threshold_dir else "no threshold is saved"
            print(f"warning: --na_threshold auto: {where} (training writes it with --eval.f1_questions) and no "
                  "--calibration_file was given; using 0.5. Tune it: --calibration_file val-v2.0.json of the "
                  "prepared data", file=sys.stderr)  # fmt: skip
        return 0.5, {"na_threshold_source": "0.5 (nothing saved or tuned)"}
    if isinstance(na_threshold, (int, float)) and not isinstance(na_threshold, bool) and 0 <= na_threshold <= 1:
        return float(na_threshold), {"na_threshold_source": "--na_threshold"}
    raise LitQAError(f"--na_threshold must be auto, off or a number in [0, 1], got {na_threshold!r}")


def load_calibration_questions(
    calibration_file: Path | None, eval_file: Path, questions: list[Question]
) -> list[Question] | None:
    """The ``--calibration_file`` questions, checked against the evaluation: never the evaluation file itself (a
    threshold tuned on the questions it scores flatters the score); questions it shares with the evaluation, or no
    unanswerable question (then the tuning can only choose "never abstain"), are each said in one warning line.

    Raises:
        LitQAError: If the file is unreadable or is the evaluation file.
    """
    if calibration_file is None:
        return None
    if Path(calibration_file).resolve() == Path(eval_file).resolve():
        raise LitQAError(f"--calibration_file {calibration_file} is the evaluation file: tune the threshold on held-out "
                         "questions, e.g. the val-v2.0.json of the prepared data")  # fmt: skip
    calibration = load_squad(calibration_file)
    evaluated = {question.id for question in questions}
    if shared := [question.id for question in calibration if question.id in evaluated]:
        print(f"warning: --calibration_file {calibration_file}: {len(shared)} of its questions are evaluation questions "
              f"(e.g. {shared[0]}), so the tuned threshold is not held out", file=sys.stderr)  # fmt: skip
    if not any(question.is_impossible for question in calibration):
        print(f"warning: --calibration_file {calibration_file} has no unanswerable question, so the tuning can only "
              "choose never to abstain", file=sys.stderr)  # fmt: skip
    return calibration


def read_na_threshold(folder: Path) -> dict[str, Any] | None:
    """The no-answer threshold saved next to fine-tuned weights (``na_threshold.json``, written by training with
    ``--eval.f1_questions``), or None if there is none or it was tuned for another rule (with a warning).

    Raises:
        LitQAError: If the file is not valid JSON or its ``threshold`` is not a number in [0, 1].
    """
    path = Path(folder) / NA_THRESHOLD_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    threshold = record.get("threshold") if isinstance(record, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise LitQAError(f"{path}: 'threshold' must be a number in [0, 1], got {threshold!r}")
    sources = [source for source, method in NA_METHODS.items() if method == record.get("method")]
    if not sources:
        print(f"warning: ignoring {path}: tuned for another no-answer rule ({record.get('method')!r})", file=sys.stderr)
        return None
    return {**record, "source": sources[0]}
