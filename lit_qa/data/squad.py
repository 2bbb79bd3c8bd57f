# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""SQuAD files: the official JSON format read and checked, predictions files, and fixed subsets of questions.

`load_squad` reads the official JSON format (v2.0, or v1.1 where every question is answerable) and checks it,
so that a bad file fails on load with the file and question id in the message, not halfway through training.
`select_subset` draws the fixed, stratified subsets that evaluations and validations use; `select_paragraphs`
fixed subsets of whole paragraphs; `subset_selector` picks one of the two by the evaluate scripts' ``--subset``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_qa.errors import LitQAError
from lit_qa.files import read_json


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
    raw = read_json(path)
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
    raw = read_json(path)
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


def select_subset(questions: list[Question], limit: int | None, seed: int = 1234) -> list[Question]:
    """A fixed random subset that keeps the share of answerable and unanswerable questions.

    Args:
        questions: All questions, in file order.
        limit: How many to keep; None (or at least ``len(questions)``) keeps them all.
        seed: Seed of the draw; the same questions, limit and seed always give the same subset.

    Returns:
        ``limit`` questions in their original file order.

    Raises:
        LitQAError: If ``limit`` is not positive.
    """
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit <= 0:
        raise LitQAError(f"--limit must be positive, got {limit}")
    answerable = [i for i, q in enumerate(questions) if q.answers]
    unanswerable = [i for i, q in enumerate(questions) if not q.answers]
    # Round half up (not Python's round-half-even) so the split is easy to predict by hand. Neither group
    # can be overdrawn: n_answerable <= limit * A / n + 0.5 < A + 0.5, and likewise for the rest.
    n_answerable = int(limit * len(answerable) / len(questions) + 0.5)
    rng = random.Random(seed)  # private, so the draw neither depends on nor disturbs the global RNG
    picked = rng.sample(answerable, n_answerable) + rng.sample(unanswerable, limit - n_answerable)
    return [questions[i] for i in sorted(picked)]


def select_paragraphs(questions: list[Question], limit: int | None, seed: int = 1234) -> list[Question]:
    """A fixed random subset of whole paragraphs: every question about each drawn context, as a full evaluation
    asks them (and as `lit_qa.generation.prefixes` shares them), the last paragraph cut to make ``limit``.

    Args, Returns and Raises: as `select_subset` (the answerable share is the drawn paragraphs', not kept).
    """
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit <= 0:
        raise LitQAError(f"--limit must be positive, got {limit}")
    by_context: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_context.setdefault(q.context, []).append(i)
    paragraphs = list(by_context.values())
    random.Random(seed).shuffle(paragraphs)
    picked: list[int] = []
    for paragraph in paragraphs:
        picked += paragraph[: limit - len(picked)]
        if len(picked) == limit:
            break
    return [questions[i] for i in sorted(picked)]


SUBSETS: dict[str, Callable[[list[Question], int | None, int], list[Question]]] = {
    "questions": select_subset,
    "paragraphs": select_paragraphs,
}


def subset_selector(kind: str) -> Callable[[list[Question], int | None, int], list[Question]]:
    """The draw ``--subset kind`` names: `select_subset` ("questions") or `select_paragraphs` ("paragraphs").

    Raises:
        LitQAError: If ``kind`` is neither.
    """
    if kind not in SUBSETS:
        raise LitQAError(f"--subset must be one of {', '.join(SUBSETS)}, got {kind!r}")
    return SUBSETS[kind]


def question_ids_sha256(questions: list[Question]) -> str:
    """A fingerprint of which questions were evaluated (order-independent), to compare runs safely."""
    return hashlib.sha256("\n".join(sorted(q.id for q in questions)).encode()).hexdigest()
