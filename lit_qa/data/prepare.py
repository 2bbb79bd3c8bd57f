# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Turn SQuAD questions into token samples for fine-tuning, and read them back in batches.

A sample is the prompt followed by the answer::

    input_ids: [BOS?] prompt tokens ............ answer tokens EOS
    labels:    -100   -100   ...  -100           answer tokens EOS

so the loss only counts the answer (``labels[t]`` is ``input_ids[t]`` or -100; the training loop shifts by
one to predict the next token). The prompt and the answer are encoded separately, so the prompt tokens are
exactly what generation later feeds the model.

With ``answers="all"`` a question with several distinct gold answers gives one sample per answer (same
prompt, each its own target and window); ``"first"`` trains on the first gold answer only.

Each sample records its ``paragraph`` (the paragraph's index in the file), so that training can pack the questions
of one paragraph into one sequence with their shared prompt prefix once (`lit_qa.data.packing`); a windowed sample's
prompt is its own, and its ``paragraph`` is -1.

A paragraph too long for ``max_seq_length`` is cut into overlapping windows of whole words; the instruction,
question and answer always stay whole. An answerable question is trained on the window that holds its
answer span (the one where the span sits most centrally), an unanswerable one on the first window::

    context words:  w0 w1 w2 w3 w4 w5 w6 w7 w8 w9
    window 0:       [w0 ......... w5]
    window 1:                [w3 ......... w8]      (stride: about half a window)
    window 2:                         [w6 ..... w9]
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lit_qa.data.dataset import IGNORE_INDEX, SPLITS, VAL_SQUAD_FILE
from lit_qa.data.packing import packing_stats
from lit_qa.data.prompts import ANSWER_MODES, NO_ANSWER, answer_text, answer_texts, check_prompt_style, encode_prompt
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.files import read_json
from lit_qa.models.tokenizer import Tokenizer

_WORD = re.compile(r"\S+")


def split_by_article(
    questions: list[Question], val_fraction: float, seed: int
) -> tuple[list[Question], list[Question]]:
    """Split questions into train and val by article title, so no paragraph is seen in both.

    Args:
        questions: The questions (file order is kept within each split).
        val_fraction: Share of the articles that go to val; at least one article goes to each side.
        seed: Seed for the shuffle that picks the val articles.

    Returns:
        ``(train, val)``.

    Raises:
        LitQAError: If ``val_fraction`` is not between 0 and 1 or there are fewer than two articles.
    """
    if not 0 < val_fraction < 1:
        raise LitQAError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    titles = list(dict.fromkeys(q.title for q in questions))  # first-appearance order, without repeats
    if len(titles) < 2:
        raise LitQAError(f"need at least two articles to split train/val by article, got {len(titles)}")
    # A private Random, so the split does not depend on (or disturb) the global RNG state.
    random.Random(seed).shuffle(titles)
    n_val = min(max(1, round(val_fraction * len(titles))), len(titles) - 1)
    val_titles = set(titles[:n_val])
    train = [q for q in questions if q.title not in val_titles]
    val = [q for q in questions if q.title in val_titles]
    return train, val


def context_windows(word_spans: list[tuple[int, int]], word_costs: list[int], budget: int) -> list[tuple[int, int]]:
    """Cut a paragraph into overlapping windows of whole words that each fit a token budget.

    Args:
        word_spans: ``(start, end)`` character span of each word of the context, in order.
        word_costs: Tokens each word takes (with the whitespace before it).
        budget: Tokens a window may take. A single word over budget still forms a window of its own (the
            caller checks the real length and drops what does not fit).

    Returns:
        ``(start_word, end_word)`` index ranges (end exclusive). Each window starts about half a window after
        the previous one, so any span up to half a window long lies whole inside some window.
    """
    windows: list[tuple[int, int]] = []
    start, n = 0, len(word_spans)
    while start < n:
        end, used = start, 0
        while end < n and used + word_costs[end] <= budget:
            used += word_costs[end]
            end += 1
        end = max(end, start + 1)
        windows.append((start, end))
        if end >= n:
            break
        # Advance by about half the window's tokens, and by at least one word.
        step, advanced = start, 0
        while step < end - 1 and advanced + word_costs[step] <= used / 2:
            advanced += word_costs[step]
            step += 1
        start = max(step, start + 1)
    return windows


@dataclass
class EncodeResult:
    """What became of one question: a sample, or the reason it was dropped."""

    sample: dict[str, Any] | None
    full_length: int  # tokens of prompt + answer + EOS with the whole context
    windowed: bool = False
    dropped: str | None = None


class QuestionEncoder:
    """Encode questions into samples, caching the word split of each paragraph for windowing.

    Args:
        tokenizer: The model's tokenizer.
        max_seq_length: Most tokens a sample may have (prompt, answer and EOS).
        prompt_style: A key of `lit_qa.data.prompts.PROMPT_STYLES` (``"chat"`` uses the tokenizer's chat template).
        no_answer: The target text for unanswerable questions.

    Raises:
        LitQAError: If the prompt style is unknown or the tokenizer cannot build it (no chat template).
    """

    def __init__(
        self, tokenizer: Tokenizer, max_seq_length: int, prompt_style: str = "plain", no_answer: str = NO_ANSWER
    ) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.prompt_style = prompt_style
        self.no_answer = no_answer
        check_prompt_style(prompt_style, tokenizer)
        self._words: dict[str, tuple[list[tuple[int, int]], list[int]]] = {}

    def prompt_ids(self, context: str, question: str) -> torch.Tensor:
        """Token ids of the prompt, with BOS as the prompt style says (see `lit_qa.data.prompts.encode_prompt`)."""
        return encode_prompt(self.tokenizer, context, question, self.prompt_style, self.no_answer)

    def __call__(self, question: Question) -> EncodeResult:
        """Encode one question, windowing its context if the whole paragraph does not fit."""
        answer_ids = self.tokenizer.encode(answer_text(question.answers, self.no_answer), bos=False, eos=True)
        prompt_ids = self.prompt_ids(question.context, question.question)
        full_length = len(prompt_ids) + len(answer_ids)
        if full_length <= self.max_seq_length:
            return EncodeResult(_sample(question.id, prompt_ids, answer_ids), full_length)

        # Tokens left for the context once the instruction, question and answer are in.
        budget = self.max_seq_length - len(self.prompt_ids("", question.question)) - len(answer_ids)
        if budget <= 0:  # the question (or answer) is so long that not even one context word fits
            return EncodeResult(None, full_length, dropped="no_room_for_context")
        prompt_ids = self._windowed_prompt(question, budget, len(answer_ids))
        if prompt_ids is None:
            return EncodeResult(None, full_length, dropped="answer_not_in_window")
        return EncodeResult(_sample(question.id, prompt_ids, answer_ids), full_length, windowed=True)

    def _windowed_prompt(self, question: Question, budget: int, answer_length: int) -> torch.Tensor | None:
        spans, costs = self._word_split(question.context)
        windows = context_windows(spans, costs, budget)
        if question.answers:
            answer = (question.answer_starts[0], question.answer_starts[0] + len(question.answers[0]))
            windows = _windows_holding(spans, windows, answer)
            if not windows:
                return None
        else:
            answer = None
        first, last = windows[0]
        # Word costs are measured one word at a time, so a window can come out a token or two longer in the
        # real prompt; shrink it from the side farther from the answer until it fits.
        while first < last:
            window_text = question.context[spans[first][0] : spans[last - 1][1]]
            prompt_ids = self.prompt_ids(window_text, question.question)
            if len(prompt_ids) + answer_length <= self.max_seq_length:
                return prompt_ids
            if answer is None or answer[0] - spans[first][0] < spans[last - 1][1] - answer[1]:
                last -= 1
            else:
                first += 1
            if first == last or (answer is not None and not _holds(spans, (first, last), answer)):
                return None
        return None

    def _word_split(self, context: str) -> tuple[list[tuple[int, int]], list[int]]:
        """Word spans of the context and the tokens each word takes with the whitespace before it (cached)."""
        if context not in self._words:
            spans = [m.span() for m in _WORD.finditer(context)]
            starts = [0] + [end for _, end in spans[:-1]]
            costs = [
                len(self.tokenizer.encode(context[s:end], bos=False)) for s, (_, end) in zip(starts, spans, strict=True)
            ]
            self._words[context] = (spans, costs)
        return self._words[context]


def _windows_holding(
    spans: list[tuple[int, int]], windows: list[tuple[int, int]], answer: tuple[int, int]
) -> list[tuple[int, int]]:
    """The windows that hold the whole answer span, the one where it sits most centrally first."""
    holding = [w for w in windows if _holds(spans, w, answer)]
    # sorted() is stable, so among equally central windows the earlier one wins.
    return sorted(holding, key=lambda w: -min(answer[0] - spans[w[0]][0], spans[w[1] - 1][1] - answer[1]))


def _holds(spans: list[tuple[int, int]], window: tuple[int, int], answer: tuple[int, int]) -> bool:
    """Whether the characters of ``window`` (a word range) include the whole ``answer`` span."""
    return spans[window[0]][0] <= answer[0] and answer[1] <= spans[window[1] - 1][1]


def _sample(qid: str, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> dict[str, Any]:
    input_ids = torch.cat([prompt_ids, answer_ids])
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids])
    return {"id": qid, "input_ids": input_ids, "labels": labels}


def training_targets(question: Question, answers: str = "first") -> list[Question]:
    """The question once per answer it is trained on (see `lit_qa.data.prompts.answer_texts`).

    Args:
        question: The question.
        answers: ``"first"`` gives the question itself; ``"all"`` one copy per distinct gold answer text,
            holding only that answer and its offset (so windowing keeps that answer in the window).

    Returns:
        The questions to encode, one sample each.
    """
    if answers == "first" or not question.answers:
        return [question]
    pairs = answer_texts(question.answers, question.answer_starts, answers)
    return [replace(question, answers=[text], answer_starts=[start]) for text, start in pairs]


def encode_questions(
    encoder: QuestionEncoder, questions: list[Question], desc: str = "tokenizing", answers: str = "first"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Encode questions into samples and count what happened to them.

    Args:
        encoder: The `QuestionEncoder` (its settings decide the prompt and the length limit).
        questions: The questions to encode.
        desc: Label of the progress bar.
        answers: ``"first"``: one sample per question, on its first gold answer. ``"all"``: one per distinct
            gold answer (see `training_targets`); the samples of a question share its id.

    Returns:
        The samples (file order, dropped ones left out) and their statistics: ``questions``, ``samples``,
        ``answerable``, ``unanswerable`` (samples of each kind), ``windowed``, ``dropped`` (count per reason:
        ``no_room_for_context`` when instruction, question and answer alone exceed ``max_seq_length``;
        ``answer_not_in_window`` when no window that fits holds the whole answer span), token-length
        percentiles of the samples (``tokens``) and of the whole, unwindowed samples (``full_tokens``), and
        with ``answers="all"`` also ``extra_answer_samples``: the samples for the second and later distinct
        answers of a question; and ``packing``: what packing each paragraph's samples into one sequence saves
        (`lit_qa.data.packing.packing_stats`).

    Raises:
        LitQAError: If ``answers`` is not ``"first"`` or ``"all"``.
    """
    if answers not in ANSWER_MODES:
        raise LitQAError(f"unknown answers mode {answers!r}; choose one of: {', '.join(ANSWER_MODES)}")
    samples, full_lengths, dropped = [], [], Counter()
    answerable = windowed = extra = 0
    paragraphs: dict[tuple[str, str], int] = {}  # (title, context) -> index in file order
    for question in tqdm(questions, desc=desc, unit="q", mininterval=1.0):
        paragraph = paragraphs.setdefault((question.title, question.context), len(paragraphs))
        for i, target in enumerate(training_targets(question, answers)):
            result = encoder(target)
            full_lengths.append(result.full_length)
            if result.sample is None:
                dropped[result.dropped] += 1
                continue
            result.sample["paragraph"] = -1 if result.windowed else paragraph
            samples.append(result.sample)
            answerable += bool(target.answers)
            windowed += result.windowed
            extra += i > 0
    stats = {
        "questions": len(questions),
        "samples": len(samples),
        "answerable": answerable,
        "unanswerable": len(samples) - answerable,
        "windowed": windowed,
        "dropped": dict(sorted(dropped.items())),
        "tokens": length_stats([len(s["input_ids"]) for s in samples]),
        "full_tokens": length_stats(full_lengths),
        "packing": packing_stats(samples),
    }
    if answers != "first":  # absent for "first", so its stats.json is what it always was
        stats["extra_answer_samples"] = extra
    return samples, stats


def length_stats(lengths: list[int]) -> dict[str, float | int]:
    """Min, mean, nearest-rank percentiles (50/90/95/99) and max of a list of lengths ({} if it is empty)."""
    if not lengths:
        return {}
    ordered = sorted(lengths)
    n = len(ordered)
    stats: dict[str, float | int] = {"min": ordered[0], "mean": round(sum(ordered) / n, 1)}
    for p in (50, 90, 95, 99):
        stats[f"p{p}"] = ordered[max(0, -(-p * n // 100) - 1)]  # ceil(p * n / 100) - 1
    stats["max"] = ordered[-1]
    return stats


def samples_to_bytes(samples: list[dict[str, Any]]) -> bytes:
    """Serialize samples with `torch.save`, byte-identically for identical samples.

    Saving to a buffer (not a file path) keeps the archive's inner folder name fixed; torch otherwise takes
    it from the file name, so a temporary file name would change the bytes.
    """
    buffer = io.BytesIO()
    torch.save(samples, buffer)
    return buffer.getvalue()


def encode_splits(
    encoder: QuestionEncoder,
    questions: list[Question],
    train_file: Path,
    val_fraction: float,
    seed: int,
    answers: str,
    extra_train: list[Question] | None = None,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Split ``questions`` by article into train and val (`split_by_article`) and encode both; ``extra_train``
    questions (another file's articles, `extra_training_questions`) join the train split only.

    Returns:
        The files of a prepared folder but its stats and config (``train.pt``, ``val.pt``, ``val-v2.0.json``: the
        val articles of ``train_file`` in the official format), and each split's statistics.

    Raises:
        LitQAError: If a split has no sample left (every question dropped as too long).
    """
    splits = dict(zip(SPLITS, split_by_article(questions, val_fraction, seed), strict=True))
    splits["train"] = splits["train"] + list(extra_train or [])
    files, stats = {}, {}
    for split, split_questions in splits.items():
        # Validation keeps one sample per question, so its loss means the same whatever --answers is.
        mode = answers if split == "train" else "first"
        samples, stats[split] = encode_questions(encoder, split_questions, f"tokenizing {split}", mode)
        if not samples:
            raise LitQAError(
                f"no {split} samples left: all {len(split_questions)} questions were dropped "
                f"({stats[split]['dropped']}); raise --max_seq_length"
            )
        stats[split]["articles"] = len({q.title for q in split_questions})
        if split == "train" and extra_train:
            stats[split]["extra_questions"] = len(extra_train)
        files[f"{split}.pt"] = samples_to_bytes(samples)
    files[VAL_SQUAD_FILE] = val_squad_json(train_file, {q.title for q in splits["val"]})
    return files, stats


def extra_training_questions(extra: list[Question], exclude_titles: set[str]) -> list[Question]:
    """The questions of ``extra`` whose article is not among ``exclude_titles`` (the training and evaluation files'
    articles): e.g. of the SQuAD v1.1 dev set, the 13 articles that neither demo file holds."""
    return [q for q in extra if q.title not in exclude_titles]


def val_squad_json(train_file: Path, val_titles: set[str]) -> bytes:
    """The val articles of the training file in official format, serialized as the official files are."""
    raw = read_json(train_file)
    subset = {"version": raw.get("version", "v2.0"), "data": [a for a in raw["data"] if a["title"] in val_titles]}
    return json.dumps(subset).encode("utf-8")
