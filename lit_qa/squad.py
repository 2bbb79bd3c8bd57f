# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""SQuAD files and the official SQuAD 2.0 metric, as pure functions.

The metric mirrors the official ``evaluate-v2.0.py`` (https://rajpurkar.github.io/SQuAD-explorer/, CC BY-SA 4.0)
line for line, so scores here equal the official script's:

* answers are compared after `normalize_answer` (lower case, ASCII punctuation removed, the articles
  a/an/the removed, whitespace collapsed);
* a question scores the best exact match and the best token F1 over its gold answers;
* an unanswerable question's only gold answer is ``""``, so it scores 1 exactly when the prediction is empty
  (an empty prediction means "no answer");
* ``exact`` and ``f1`` are percentages over all questions, and ``HasAns_*`` / ``NoAns_*`` the same over the
  answerable and unanswerable ones. As in the official script, a group with no questions has no keys.

`load_squad` reads the official JSON format (v2.0, or v1.1 where every question is answerable) and checks it,
so that a bad file fails on load with the file and question id in the message, not halfway through training.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_qa.errors import LitQAError

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official script: "–" or "’" stay


@dataclass(frozen=True)
class Question:
    """One SQuAD question with its paragraph.

    Attributes:
        id: The official question id (unique in a file).
        title: Title of the article the paragraph comes from; articles are the unit of train/val splits.
        context: The paragraph, verbatim (``answer_starts`` are character offsets into it).
        question: The question text, verbatim.
        answers: Gold answer texts, in file order; may repeat. Empty for an unanswerable question.
        answer_starts: Character offset of each answer in ``context``.
        is_impossible: True for an unanswerable question (SQuAD 2.0); always False in v1.1 files.
    """

    id: str
    title: str
    context: str
    question: str
    answers: list[str]
    answer_starts: list[int]
    is_impossible: bool


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

    result = _summary(exact, f1, [q.id for q in questions])
    # The official script splits by whether the file lists answers at all, not by is_impossible.
    groups = {"HasAns": [q.id for q in questions if q.answers], "NoAns": [q.id for q in questions if not q.answers]}
    for prefix, ids in groups.items():
        if ids:
            result.update({f"{prefix}_{k}": v for k, v in _summary(exact, f1, ids).items()})
    return result


def _summary(exact: dict[str, int], f1: dict[str, float], ids: list[str]) -> dict[str, Any]:
    total = len(ids)
    return {
        "exact": 100.0 * sum(exact[i] for i in ids) / total,
        "f1": 100.0 * sum(f1[i] for i in ids) / total,
        "total": total,
    }


def read_json_file(path: Path | str) -> Any:
    """Read a UTF-8 JSON file.

    Raises:
        LitQAError: If the file is missing, not UTF-8 or not valid JSON, naming the file (and line/column).
    """
    path = Path(path)
    if not path.is_file():
        raise LitQAError(f"{path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise LitQAError(
            f"{path} is not UTF-8 text: bad byte {e.object[e.start]:#04x} at offset {e.start} (line {line})"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LitQAError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def load_squad(path: Path | str) -> list[Question]:
    """Read and check an official-format SQuAD v2.0 or v1.1 file.

    Args:
        path: The JSON file (``{"version": ..., "data": [{"title", "paragraphs": [{"context", "qas"}]}]}``).

    Returns:
        The questions in file order.

    Raises:
        LitQAError: If the file is missing, not UTF-8 or not JSON; a field is missing or has the wrong type (the
            message gives its JSON path and question id); a question id repeats; a context or question is
            empty; an answer text is not found at its ``answer_start``; or an answerable question has no
            answers (or an unanswerable one lists some).
    """
    path = Path(path)
    raw = read_json_file(path)
    data = _field(raw, "data", list, path, "")
    questions: list[Question] = []
    seen: set[str] = set()
    for a, article in enumerate(data):
        where = f"data[{a}]"
        title = _field(article, "title", str, path, where)
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, where)):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", str, path, where)
            if not context.strip():
                raise LitQAError(f"{path}: {where}.context is empty")
            for i, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                question = _parse_question(qa, title, context, path, f"{where}.qas[{i}]")
                if question.id in seen:
                    raise LitQAError(f"{path}: {where}.qas[{i}]: question id {question.id} appears more than once")
                seen.add(question.id)
                questions.append(question)
    return questions


def _parse_question(qa: Any, title: str, context: str, path: Path, where: str) -> Question:
    qid = _field(qa, "id", str, path, where)
    where = f"{where} (id {qid})"  # every later message names the question id
    text = _field(qa, "question", str, path, where)
    if not text.strip():
        raise LitQAError(f"{path}: {where}: question is empty")
    # v1.1 files have no is_impossible: every question there is answerable.
    is_impossible = _field(qa, "is_impossible", bool, path, where) if "is_impossible" in qa else False
    answers, starts = [], []
    for j, answer in enumerate(_field(qa, "answers", list, path, where)):
        answer_where = f"{where}.answers[{j}]"
        answer_text = _field(answer, "text", str, path, answer_where)
        start = _field(answer, "answer_start", int, path, answer_where)
        if not answer_text:
            raise LitQAError(f"{path}: {answer_where}: answer text is empty")
        if start < 0 or context[start : start + len(answer_text)] != answer_text:
            found = context[max(start, 0) : max(start, 0) + len(answer_text)]
            raise LitQAError(
                f"{path}: {answer_where}: answer {answer_text!r} is not at answer_start {start} "
                f"of the context (found {found!r})"
            )
        answers.append(answer_text)
        starts.append(start)
    if is_impossible and answers:
        raise LitQAError(f"{path}: {where}: is_impossible is true but answers is not empty")
    if not is_impossible and not answers:
        raise LitQAError(f"{path}: {where}: answerable question has no answers")
    return Question(qid, title, context, text, answers, starts, is_impossible)


def _field(obj: Any, key: str, kind: type, path: Path, where: str) -> Any:
    """Return ``obj[key]`` if ``obj`` is a JSON object holding a ``kind`` there, else raise naming the JSON path."""
    location = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise LitQAError(f"{path}: {where or 'top level'} must be a JSON object, got {_json_type(obj)}")
    if key not in obj:
        raise LitQAError(f"{path}: {location} is missing")
    value = obj[key]
    # bool is a subclass of int in Python, but true is not a valid answer_start.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise LitQAError(f"{path}: {location} must be {_json_type(kind)}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "an integer", bool: "true or false",
             float: "a number", type(None): "null"}  # fmt: skip
    kind = value if isinstance(value, type) else type(value)
    return names.get(kind, kind.__name__)


def load_predictions(path: Path | str, question_ids: Iterable[str]) -> dict[str, str]:
    """Read an official predictions file (a JSON object of question id to answer text, "" for no answer).

    Args:
        path: The predictions file.
        question_ids: The ids the file must cover exactly (e.g. ``[q.id for q in load_squad(...)]``).

    Returns:
        The predictions, id to text.

    Raises:
        LitQAError: If the file cannot be read, is not an object of strings, or misses or adds question ids
            (the message counts both and shows an example of each).
    """
    path = Path(path)
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise LitQAError(f"{path} must hold a JSON object of question id to answer text, got {_json_type(raw)}")
    for qid, text in raw.items():
        if not isinstance(text, str):
            raise LitQAError(f"{path}: prediction for id {qid} must be a string, got {_json_type(text)}")
    expected = list(dict.fromkeys(question_ids))
    missing = [i for i in expected if i not in raw]
    expected_set = set(expected)
    extra = [i for i in raw if i not in expected_set]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{len(missing)} question ids missing (e.g. {missing[0]})")
        if extra:
            problems.append(f"{len(extra)} ids not in the dataset (e.g. {extra[0]})")
        raise LitQAError(f"{path}: {' and '.join(problems)}")
    return raw
