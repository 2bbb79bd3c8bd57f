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
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lit_qa.errors import LitQAError
from lit_qa.prompts import ANSWER_MODES, NO_ANSWER, answer_text, answer_texts, check_prompt_style, encode_prompt
from lit_qa.squad import Question
from lit_qa.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value are skipped by torch.nn.functional.cross_entropy
SPLITS = ("train", "val")
CONFIG_FILE = "prepare_config.json"
STATS_FILE = "stats.json"
VAL_SQUAD_FILE = "val-v2.0.json"
PREPARED_BY = "lit-qa scripts/prepare_squad.py"
FORMAT_VERSION = 1

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
        prompt_style: A key of `lit_qa.prompts.PROMPT_STYLES` (``"chat"`` uses the tokenizer's chat template).
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
        """Token ids of the prompt, with BOS as the prompt style says (see `lit_qa.prompts.encode_prompt`)."""
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
    """The question once per answer it is trained on (see `lit_qa.prompts.answer_texts`).

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
        answers of a question.

    Raises:
        LitQAError: If ``answers`` is not ``"first"`` or ``"all"``.
    """
    if answers not in ANSWER_MODES:
        raise LitQAError(f"unknown answers mode {answers!r}; choose one of: {', '.join(ANSWER_MODES)}")
    samples, full_lengths, dropped = [], [], Counter()
    answerable = windowed = extra = 0
    for question in tqdm(questions, desc=desc, unit="q", mininterval=1.0):
        for i, target in enumerate(training_targets(question, answers)):
            result = encoder(target)
            full_lengths.append(result.full_length)
            if result.sample is None:
                dropped[result.dropped] += 1
                continue
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual permissions instead
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prepared(data_dir: Path | str, split: str) -> list[dict[str, Any]]:
    """Load the samples ``scripts/prepare_squad.py`` wrote for one split.

    Args:
        data_dir: The script's ``out_dir``.
        split: ``"train"`` or ``"val"``.

    Returns:
        The samples: dicts with ``id`` (str), ``input_ids`` and ``labels`` (1-D ``torch.long``, same length).

    Raises:
        LitQAError: If the split is unknown, the folder was not prepared by the script (no or a foreign
            ``prepare_config.json``), or the file is missing, corrupt or not in the expected format.
    """
    if split not in SPLITS:
        raise LitQAError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    read_prepare_config(data_dir)
    path = data_dir / f"{split}.pt"
    if not path.is_file():
        raise LitQAError(f"{path} does not exist; run scripts/prepare_squad.py --out_dir {data_dir} again")
    try:
        samples = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        message = " ".join(str(e).split())[:200] or type(e).__name__
        raise LitQAError(f"cannot read {path}: {message}") from None
    _check_samples(samples, path)
    return samples


def read_prepare_config(data_dir: Path | str) -> dict[str, Any]:
    """Read ``prepare_config.json`` of a prepared folder.

    Raises:
        LitQAError: If it is missing, unreadable, or was not written by ``scripts/prepare_squad.py`` in this
            format version.
    """
    path = Path(data_dir) / CONFIG_FILE
    if not path.is_file():
        raise LitQAError(f"{path} does not exist: {data_dir} was not prepared by scripts/prepare_squad.py")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LitQAError(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict) or config.get("prepared_by") != PREPARED_BY:
        raise LitQAError(f"{path} was not written by scripts/prepare_squad.py")
    if config.get("format_version") != FORMAT_VERSION:
        raise LitQAError(
            f"{path} has format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "prepare the data again with --overwrite"
        )
    return config


def _check_samples(samples: Any, path: Path) -> None:
    if not isinstance(samples, list):
        raise LitQAError(f"{path} must hold a list of samples, got {type(samples).__name__}")
    for i, sample in enumerate(samples):
        ok = (
            isinstance(sample, dict)
            and isinstance(sample.get("id"), str)
            and all(
                isinstance(sample.get(k), torch.Tensor) and sample[k].dtype == torch.long and sample[k].ndim == 1
                for k in ("input_ids", "labels")
            )
        )
        if not ok or sample["input_ids"].shape != sample["labels"].shape:
            raise LitQAError(
                f"{path}: sample {i} is not a dict of id (str) and equally long 1-D long tensors input_ids, labels"
            )


def collate(
    samples: list[dict[str, Any]], pad_id: int, max_length: int | None = None, pad_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Stack samples into a right-padded batch.

    Args:
        samples: Dicts with 1-D ``input_ids`` and ``labels``.
        pad_id: Token id to pad ``input_ids`` with (it is never learned: its labels are -100).
        max_length: Cut longer samples to this many tokens first; None keeps them whole.
        pad_multiple: Round T up to a multiple of this. On CPUs, bf16 kernels are re-built for every new
            shape, which made training on varying lengths several times slower than a few fixed shapes.

    Returns:
        ``{"input_ids": (B, T), "labels": (B, T)}``, where T is the longest (cut) sample in the batch, rounded
        up to ``pad_multiple``; plus ``"unanswerable": (B,)`` 0/1 floats when the samples are marked
        (`mark_unanswerable`).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids = [s["input_ids"][:max_length] for s in samples]
    labels = [s["labels"][:max_length] for s in samples]
    longest = max(len(x) for x in input_ids)
    longest = -(-longest // pad_multiple) * pad_multiple
    longest = min(longest, max_length) if max_length is not None else longest  # rounding never exceeds the limit
    batch_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)  # (B, T)
    batch_labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        batch_ids[row, : len(x)] = x
        batch_labels[row, : len(y)] = y
    batch = {"input_ids": batch_ids, "labels": batch_labels}
    if all("unanswerable" in s for s in samples):
        batch["unanswerable"] = torch.tensor([float(s["unanswerable"]) for s in samples])  # (B,)
    return batch


def mark_unanswerable(samples: list[dict[str, Any]], no_answer_ids: torch.Tensor) -> int:
    """Label each sample ``unanswerable`` (True/False) by its target: the no-answer reply's tokens
    (``tokenizer.encode(no_answer, eos=True)``, as `QuestionEncoder` writes them) or an answer. Works on data
    prepared before the no-answer head existed. Returns how many are unanswerable."""
    count = 0
    for sample in samples:
        target = sample["input_ids"][sample["labels"] != IGNORE_INDEX]
        sample["unanswerable"] = bool(target.shape == no_answer_ids.shape and torch.equal(target, no_answer_ids))
        count += sample["unanswerable"]
    return count
