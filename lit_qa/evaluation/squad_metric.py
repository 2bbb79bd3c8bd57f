# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The official SQuAD 2.0 metric, as pure functions.

The metric mirrors the official ``evaluate-v2.0.py`` (https://rajpurkar.github.io/SQuAD-explorer/, CC BY-SA 4.0)
line for line, so scores here equal the official script's:

* answers are compared after `normalize_answer` (lower case, ASCII punctuation removed, the articles
  a/an/the removed, whitespace collapsed);
* a question scores the best exact match and the best token F1 over its gold answers;
* an unanswerable question's only gold answer is ``""``, so it scores 1 exactly when the prediction is empty
  (an empty prediction means "no answer");
* ``exact`` and ``f1`` are percentages over all questions, and ``HasAns_*`` / ``NoAns_*`` the same over the
  answerable and unanswerable ones. As in the official script, a group with no questions has no keys.

`question_scores` gives each question's exact match and F1, from which the totals are averaged (and
`lit_qa.evaluation.bootstrap` draws its intervals). `no_answer_baseline` scores answering "no answer" everywhere:
the floor every evaluation reports.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable
from typing import Any

from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official script: "–" or "’" stay


def normalize_answer(s: str) -> str:
    """Normalize an answer the way the official script does before comparing.

    Args:
        s: An answer text.

    Returns:
        ``s`` lower-cased, without ASCII punctuation and the words a/an/the, with whitespace collapsed.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match(prediction: str, gold: str) -> int:
    """Return 1 if the prediction equals the gold answer after `normalize_answer`, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between a prediction and one gold answer, both normalized.

    If either side has no tokens after normalization (e.g. the empty "no answer" prediction), the F1 is 1.0
    when both are empty and 0.0 otherwise.

    Args:
        prediction: The predicted answer text ("" for no answer).
        gold: One gold answer text ("" for an unanswerable question).

    Returns:
        The F1 in [0, 1].
    """
    gold_tokens = _tokens(gold)
    pred_tokens = _tokens(prediction)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    # Counter & Counter keeps the minimum count of each token, so a repeated word only matches as often as
    # it appears on both sides.
    num_same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(question: Question) -> list[str]:
    """The answers a prediction is scored against: the gold texts that survive normalization, else ``[""]``."""
    answers = [a for a in question.answers if normalize_answer(a)]
    return answers or [""]


def evaluate_predictions(dataset_questions: Iterable[Question], predictions: dict[str, str]) -> dict[str, Any]:
    """Score predictions with the official SQuAD 2.0 metric (no no-answer threshold).

    Args:
        dataset_questions: The questions, e.g. from `load_squad`.
        predictions: Question id to predicted answer text; ``""`` means "no answer". Ids not in the
            dataset are ignored, as the official script does.

    Returns:
        ``exact``, ``f1`` (percentages 0-100) and ``total`` over all questions, and the same three with the
        prefixes ``HasAns_`` (answerable) and ``NoAns_`` (unanswerable) for each group that has questions.

    Raises:
        LitQAError: If a question has no prediction, or there are no questions. (The official script prints
            a warning and then crashes or scores on a subset; use `load_predictions` to check a file first.)
    """
    questions = list(dataset_questions)
    exact, f1 = question_scores(questions, predictions)
    result = _summary(exact, f1, [q.id for q in questions])
    # The official script splits by whether the file lists answers at all, not by is_impossible.
    groups = {"HasAns": [q.id for q in questions if q.answers], "NoAns": [q.id for q in questions if not q.answers]}
    for prefix, ids in groups.items():
        if ids:
            result.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, ids).items()})
    return result


def question_scores(
    dataset_questions: Iterable[Question], predictions: dict[str, str]
) -> tuple[dict[str, int], dict[str, float]]:
    """Each question's official scores: the best exact match and the best F1 over its gold answers.

    Args:
        dataset_questions, predictions: As `evaluate_predictions`.

    Returns:
        Question id to exact match (0 or 1), and question id to F1 in [0, 1], in question order.

    Raises:
        LitQAError: As `evaluate_predictions`.
    """
    questions = list(dataset_questions)
    if not questions:
        raise LitQAError("cannot evaluate: there are no questions")
    missing = [q.id for q in questions if q.id not in predictions]
    if missing:
        raise LitQAError(f"no prediction for {len(missing)} of {len(questions)} questions, e.g. {missing[0]}")

    exact, f1 = {}, {}
    for q in questions:
        golds = gold_answers(q)
        prediction = predictions[q.id]
        exact[q.id] = max(exact_match(prediction, g) for g in golds)
        f1[q.id] = max(f1_score(prediction, g) for g in golds)
    return exact, f1


def _summary(exact: dict[str, int], f1: dict[str, float], ids: list[str]) -> dict[str, Any]:
    total = len(ids)
    return {
        "exact": 100.0 * sum(exact[i] for i in ids) / total,
        "f1": 100.0 * sum(f1[i] for i in ids) / total,
        "total": total,
    }


def no_answer_baseline(questions: list[Question]) -> dict[str, Any]:
    """The official metrics of answering "no answer" (``""``) to every question: the floor to beat."""
    return evaluate_predictions(questions, {q.id: "" for q in questions})
