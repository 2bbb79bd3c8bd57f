# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Answer SQuAD 2.0 questions with a model and score the answers with the official metric.

The evaluation scripts (``evaluate/base.py``, ``evaluate/lora.py``) differ only in how they load the model;
everything after that lives here::

    questions = select_subset(load_squad(eval_file), limit=500)       # stratified, seeded, file order
    predictions = answer_questions(model, tokenizer, questions)       # id -> answer text ("" = no answer)
    metrics = evaluate_predictions(questions, predictions)            # official SQuAD 2.0 metric

Prompts are built by the same `QuestionEncoder` as the training samples, so the model is asked exactly
the way it was trained. The model says `lit_qa.prompts.NO_ANSWER` when the context has no answer; that
string is mapped back to ``""``, the official format's "no answer".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lit_qa.data import QuestionEncoder, write_atomic
from lit_qa.errors import LitQAError
from lit_qa.generate import generate
from lit_qa.model import GPT
from lit_qa.prompts import NO_ANSWER
from lit_qa.squad import Question, evaluate_predictions
from lit_qa.tokenizer import Tokenizer

PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
PARTIAL_FILE = "predictions.partial.json"


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


def question_ids_sha256(questions: list[Question]) -> str:
    """A fingerprint of which questions were evaluated (order-independent), to compare runs safely."""
    return hashlib.sha256("\n".join(sorted(q.id for q in questions)).encode()).hexdigest()


def no_answer_baseline(questions: list[Question]) -> dict[str, Any]:
    """The official metrics of answering "no answer" (``""``) to every question: the floor to beat."""
    return evaluate_predictions(questions, {q.id: "" for q in questions})


def prompt_for(encoder: QuestionEncoder, question: Question) -> tuple[torch.Tensor, bool]:
    """The prompt tokens for one question, windowed to ``encoder.max_seq_length`` tokens if the paragraph is too long.

    The window is the one training uses for unanswerable questions: the first window of the paragraph,
    shrunk until it fits. (Training picks the window holding the answer for answerable questions, but at
    test time the answer is unknown, so an answer that lies further on is out of the model's sight.)

    Returns:
        The prompt ids and whether the context was windowed.

    Raises:
        LitQAError: If not even the instruction, the question and one word of context fit.
    """
    max_prompt_length = encoder.max_seq_length
    prompt_ids = encoder.prompt_ids(question.context, question.question)
    if len(prompt_ids) <= max_prompt_length:
        return prompt_ids, False
    budget = max_prompt_length - len(encoder.prompt_ids("", question.question))
    # Pretend the question is unanswerable: data.py then windows without looking for an answer span.
    unanswerable = replace(question, answers=[], answer_starts=[])
    windowed = encoder._windowed_prompt(unanswerable, budget, answer_length=0) if budget > 0 else None
    if windowed is None:
        raise LitQAError(
            f"question {question.id}: the prompt does not fit in {max_prompt_length} tokens "
            "(model max_seq_length minus max_new_tokens) even with one word of context"
        )
    return windowed, True


def answer_questions(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    prompt_style: str = "plain",
    no_answer: str = NO_ANSWER,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    on_batch: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, str]:
    """Answer questions by greedy decoding, in batches of similar prompt length.

    Args:
        model: The model, in eval mode. A prompt longer than ``model.max_seq_length - max_new_tokens`` is
            windowed to fit (the paragraph's first window, see `prompt_for`) instead of failing.
        tokenizer: Its tokenizer.
        questions: The questions to answer.
        prompt_style: The prompt template the model was trained with.
        no_answer: The text the model was trained to say when there is no answer; mapped to ``""``.
        batch_size: Questions decoded together. Each row decodes exactly as it would alone.
        max_new_tokens: Longest answer in tokens.
        progress: Show a progress bar (in questions) on stderr.
        on_batch: Called with each batch's ``{id: answer}``, e.g. to save partial results.

    Returns:
        Question id to answer text, ``""`` meaning "no answer".

    Raises:
        LitQAError: If the arguments are out of range, or a question cannot fit the model even windowed.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise LitQAError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    max_prompt_length = model.max_seq_length - max_new_tokens
    if max_prompt_length < 1:
        raise LitQAError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {model.max_seq_length} tokens"
        )
    # The encoder's length limit only drives windowing, where the prompt alone must fit (no answer tokens).
    encoder = QuestionEncoder(tokenizer, max_prompt_length, prompt_style, no_answer)
    prompts = {q.id: prompt_for(encoder, q) for q in questions}
    if windowed := sum(was_windowed for _, was_windowed in prompts.values()):
        print(f"{windowed} of {len(questions)} contexts were windowed to fit {max_prompt_length} tokens",
              file=sys.stderr)  # fmt: skip
    # Longest first: a batch pads to its longest prompt, so similar lengths waste little, and an
    # out-of-memory error shows up in the first batch rather than at the end.
    order = sorted(questions, key=lambda q: -len(prompts[q.id][0]))
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # never attended to, any valid id works
    answers: dict[str, str] = {}
    with tqdm(total=len(order), desc="answering", unit="q", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            # Prompt lengths rounded to 64: a few shapes keep CPU bf16 kernels from being re-built per batch.
            outputs = generate(model, [prompts[q.id][0] for q in batch], max_new_tokens, stop_ids=tokenizer.eos_ids,
                               pad_id=pad_id, pad_multiple=64)  # fmt: skip
            batch_answers = {q.id: to_official(tokenizer.decode(out.cpu(), skip_special_tokens=True), no_answer)
                             for q, out in zip(batch, outputs, strict=True)}  # fmt: skip
            answers.update(batch_answers)
            if on_batch is not None:
                on_batch(batch_answers)
            bar.update(len(batch))
    return {q.id: answers[q.id] for q in questions}  # file order, for readable predictions files


def to_official(text: str, no_answer: str = NO_ANSWER) -> str:
    """Strip a generated answer and turn the no-answer string (any case) into ``""``."""
    text = text.strip()
    return "" if text.casefold() == no_answer.strip().casefold() else text


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    write_atomic(Path(path), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def run_evaluation(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    out_dir: Path,
    prompt_style: str = "plain",
    no_answer: str = NO_ANSWER,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer, score and write ``predictions.json`` and ``metrics.json`` into ``out_dir``.

    While it runs, the answers so far are saved to ``predictions.partial.json`` every few seconds (removed
    at the end), so a long run that dies still leaves something to look at.

    Args:
        model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens: See `answer_questions`.
        out_dir: Folder for the two files (created if needed).
        info: Run settings to record in ``metrics.json`` (paths, precision, limit, seed, ...).

    Returns:
        The metrics written: the official ones, ``no_answer_baseline``, timing and ``info``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial: dict[str, str] = {}
    last_write = time.monotonic()

    def save_partial(batch_answers: dict[str, str]) -> None:
        nonlocal last_write
        partial.update(batch_answers)
        if time.monotonic() - last_write > 10:  # rewriting the whole file every batch would be quadratic
            write_json(out_dir / PARTIAL_FILE, partial)
            last_write = time.monotonic()

    start = time.perf_counter()
    predictions = answer_questions(
        model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens, on_batch=save_partial
    )
    seconds = time.perf_counter() - start
    metrics = {
        **evaluate_predictions(questions, predictions),
        "no_answer_baseline": no_answer_baseline(questions),
        "num_questions": len(questions),
        "question_ids_sha256": question_ids_sha256(questions),
        "seconds": round(seconds, 3),
        "questions_per_second": round(len(questions) / seconds, 3),
        "prompt_style": prompt_style,
        "no_answer": no_answer,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        **(info or {}),
    }
    write_json(out_dir / PREDICTIONS_FILE, predictions)
    write_json(out_dir / METRICS_FILE, metrics)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    return metrics


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
    lines += ["  ".join(groups), f"wrote {out_dir / PREDICTIONS_FILE} and {out_dir / METRICS_FILE}"]
    return "\n".join(lines)


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when a GPU is available, else "cpu"."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """Mixed precision keeps float32 weights and computes in half precision; "-true" precisions need nothing."""
    if not precision.endswith("-mixed"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
