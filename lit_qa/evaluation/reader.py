# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""A fine-tuned reader as a Python object: load a folder once, then answer questions about contexts::

    reader = Reader.load("out/finetune/lora/final")           # a LoRA, an adapter or a full checkpoint folder
    reader("Who ruled Normandy?", context)                    # one ReaderAnswer
    reader([(question, context), ...])                        # a list of them, decoded in batches

It loads a folder exactly as the evaluate script of its kind does (evaluate/lora.py, evaluate/adapter.py,
evaluate/base.py: the same library functions) and answers through the same `score_questions` with the same
settings: the prompt the weights were trained with, span-constrained (extractive) decoding, windowing of long
contexts, the no-answer head and the threshold and rule saved with the weights. So its answers are the
``predictions.json`` and its ``no_answer_probability`` the ``na_probs.json`` an evaluation of the same
questions writes. Nothing is written to disk and no metric is computed: there is no gold answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from lit_qa.checkpoints.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    check_adapter_dir,
    load_adapter_checkpoint,
    read_adapter_base_record,
)
from lit_qa.checkpoints.inference import check_lora_inference, load_for_inference, load_lora_for_inference
from lit_qa.checkpoints.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, read_lora_base_record
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.answers import Answers
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.launch import EvaluationArgs, answering_run, ready_to_answer
from lit_qa.evaluation.run import decide_na_rule
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import autocast, weights_dtype
from lit_qa.quantize import check_quantize_args

FolderKind = Literal["lora", "adapter", "full"]


@dataclass(frozen=True)
class ReaderAnswer:
    """One answer, with the Hugging Face question-answering pipeline's field names where it has them.

    Attributes:
        answer: The answer text, a substring of the context; ``""`` when the reader abstains (no answer).
        start: Character offset of ``answer`` in the context (``context[start:end] == answer``); 0 when abstaining
            (as the pipeline's impossible answer). The decoder produces text, not a position: this is the first
            occurrence of the text in the context, which may not be the one the model read if it occurs twice.
            None if the text is not found verbatim (a tokenizer whose decoding does not give back the context's
            characters, e.g. one that normalises whitespace).
        end: Character offset just past ``answer`` (0 when abstaining; None when ``start`` is None).
        score: 1 - ``no_answer_probability``: how likely the reader finds that the context answers the question
            (not the probability of this exact span, as the pipeline's score is). None with ``na_threshold="off"``.
        no_answer_probability: p_na by the rule in use (`lit_qa.evaluation.answers`); the reader abstains when it
            reaches the threshold. None with ``na_threshold="off"``.
        abstained: Whether the reader gives no answer (``answer == ""``).
        best_span: The best answer when abstaining is not allowed, given even when the reader abstains ("what it
            would have said"); with ``na_threshold="off"`` the answer itself.
        best_span_start: Offset of ``best_span`` in the context, found like ``start`` (None if not found or empty).
        best_span_end: Offset just past ``best_span`` (None when ``best_span_start`` is None).
    """

    answer: str
    start: int | None
    end: int | None
    score: float | None
    no_answer_probability: float | None
    abstained: bool
    best_span: str
    best_span_start: int | None
    best_span_end: int | None


class Reader:
    """A loaded model that answers questions about contexts as the evaluate scripts do (module docstring).

    Build it with `Reader.load`. Attributes: ``model``, ``tokenizer``, ``decoding`` (the resolved settings: prompt
    style, no-answer string, batch size, max_new_tokens, the numeric threshold and its rule ``na_source``),
    ``device``, ``precision``, ``path`` (the folder loaded) and ``kind`` ("lora", "adapter" or "full").
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        decoding: DecodingSettings,
        device: str,
        precision: str,
        path: Path,
        kind: FolderKind,
    ) -> None:
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.device, self.precision, self.path, self.kind = device, precision, path, kind

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        checkpoint_dir: str | Path | None = None,
        quantize: str | None = None,
        gptq_checkpoint: str | Path | None = None,
        device: str = "auto",
        precision: str = "auto",
        na_threshold: float | Literal["auto", "off"] | None = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 32,
        prompt_style: str | None = None,
        no_answer: str | None = None,
    ) -> Reader:
        """Load a fine-tuned (or base) model folder to answer with, as its evaluate script would.

        Args:
            path: A LoRA folder (finetune/lora.py: ``lit_lora.safetensors``), an adapter folder (finetune/adapter.py
                or adapter_v2.py: ``lit_adapter.safetensors``), else a lit checkpoint folder (converted, merged or
                fully fine-tuned).
            checkpoint_dir: A LoRA's or adapter's base checkpoint; None: the one its ``base_checkpoint.json``
                records. Not taken with a full checkpoint.
            quantize, gptq_checkpoint, device, precision, batch_size, max_new_tokens, prompt_style, no_answer: As
                the evaluate scripts' flags (`lit_qa.evaluation.launch.EvaluationArgs`).
            na_threshold: "auto": the threshold and rule saved with the weights (``na_threshold.json``), else 0.5
                with a warning (there is no calibration file here); a number in [0, 1]: that threshold, with the
                model's default rule (the no-answer head's if it has one, else the span score's); "off": plain
                greedy span decoding, no p_na.

        Raises:
            LitQAError: For a missing or incomplete folder or a bad setting, before any weights are read.
        """
        path = Path(path)
        kind = folder_kind(path)
        checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        gptq_checkpoint = None if gptq_checkpoint is None else Path(gptq_checkpoint)
        args = EvaluationArgs(batch_size=batch_size, max_new_tokens=max_new_tokens, na_threshold=na_threshold,
                              precision=precision, device=device, prompt_style=prompt_style, no_answer=no_answer,
                              quantize=quantize, extractive=True)  # fmt: skip
        if kind == "lora":
            check_lora_inference(path, quantize, gptq_checkpoint)
            base = checkpoint_dir or Path(read_lora_base_record(path)["path"])
        elif kind == "adapter":
            check_adapter_dir(path)
            check_quantize_args(quantize, gptq_checkpoint)
            base = checkpoint_dir or Path(read_adapter_base_record(path)["path"])
        else:
            if checkpoint_dir is not None:
                raise LitQAError(f"checkpoint_dir is the base of a LoRA or adapter folder; {path} is a full checkpoint")
            check_quantize_args(quantize, gptq_checkpoint)
            base = path
        # A full checkpoint may be a converted base model, which records no prompt settings: no warning then.
        run = answering_run(args, path, [], warn_if_unknown=kind != "full")
        dtype = weights_dtype(run.precision)
        if kind == "lora":
            model, config, _ = load_lora_for_inference(path, base, run.device, dtype, quantize)
        elif kind == "adapter":
            model, config, _ = load_adapter_checkpoint(path, base, run.device, dtype, False, quantize, gptq_checkpoint)
        else:
            model, config = load_for_inference(path, run.device, dtype, quantize, gptq_checkpoint)
        tokenizer = ready_to_answer(model, config, run, base)
        # No calibration questions: the saved threshold and rule, else 0.5 with a warning, as run_evaluation decides.
        decoding, _, _ = decide_na_rule(model, tokenizer, run.decoding, None, path)
        return cls(model, tokenizer, decoding, run.device, run.precision, path, kind)

    @overload
    def __call__(self, question: str, context: str) -> ReaderAnswer: ...

    @overload
    def __call__(self, question: Sequence[tuple[str, str]], context: None = None) -> list[ReaderAnswer]: ...

    def __call__(self, question, context=None):
        """``reader(question, context)``: one `ReaderAnswer`; ``reader([(question, context), ...])``: a list of them
        in the same order (`answer_batch`).

        Raises:
            LitQAError: For an empty or non-string question or context, or a bad list of pairs.
        """
        if isinstance(question, str):
            return self.answer_batch([(question, context)])[0]
        if context is not None:
            raise LitQAError("reader(question, context) takes a string question; a list of pairs takes no context")
        return self.answer_batch(question)

    def answer_batch(self, pairs: Sequence[tuple[str, str]]) -> list[ReaderAnswer]:
        """Answer ``(question, context)`` pairs, in their order, through `score_questions` with the reader's settings:
        ``decoding.batch_size`` at a time, questions on one context together so that it is prefilled once for them.
        Each answer is the one the question gets alone (batching changes speed, not answers).

        Raises:
            LitQAError: For an empty or non-string question or context, or ``pairs`` not a list of pairs.
        """
        questions = [Question(str(i), "", context, question, [], [], False)
                     for i, (question, context) in enumerate(checked_pairs(pairs))]  # fmt: skip
        if not questions:
            return []
        with autocast(self.precision, self.device):
            scored = score_questions(self.model, self.tokenizer, questions, self.decoding, progress=False)
        return [reader_answer(q, scored) for q in questions]


def folder_kind(path: Path) -> FolderKind:
    """What a folder holds, by its weights or config file: "lora", "adapter", else "full" (a lit checkpoint; loading
    checks it). An incomplete LoRA or adapter folder is named as such by its check, with the files it has.

    Raises:
        LitQAError: If ``path`` is not a folder.
    """
    if not path.is_dir():
        raise LitQAError(f"{path}: no such folder (a LoRA, adapter or checkpoint folder)")
    if any((path / name).exists() for name in (LORA_WEIGHTS_FILE, LORA_CONFIG_FILE)):
        return "lora"
    if any((path / name).exists() for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)):
        return "adapter"
    return "full"


def checked_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` as a list of (question, context), each a non-empty string (whitespace alone counts as empty).

    Raises:
        LitQAError: One line naming the first bad pair.
    """
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise LitQAError(f"expected a list of (question, context) pairs, got {type(pairs).__name__}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise LitQAError(f"pair {i}: expected a (question, context) pair, got {type(pair).__name__}")
        for name, value in zip(("question", "context"), pair):
            if not isinstance(value, str):
                raise LitQAError(f"pair {i}: the {name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise LitQAError(f"pair {i}: the {name} is empty")
    return [tuple(pair) for pair in pairs]


def reader_answer(question: Question, scored: Answers) -> ReaderAnswer:
    """The `ReaderAnswer` of one scored question (`ReaderAnswer` says how offsets and scores are read)."""
    answer = scored.final[question.id]
    best_span = scored.best_span.get(question.id, answer)  # without a threshold there is no separate best span
    p_na = scored.na_prob.get(question.id)
    start, end = span_offsets(question.context, answer) if answer else (0, 0)
    best_start, best_end = span_offsets(question.context, best_span)
    return ReaderAnswer(answer=answer, start=start, end=end, score=None if p_na is None else 1.0 - p_na,
                        no_answer_probability=p_na, abstained=answer == "", best_span=best_span,
                        best_span_start=best_start, best_span_end=best_end)  # fmt: skip


def span_offsets(context: str, text: str) -> tuple[int | None, int | None]:
    """The first occurrence of ``text`` in ``context`` as (start, end), or (None, None) if absent or empty."""
    start = context.find(text) if text else -1
    return (None, None) if start < 0 else (start, start + len(text))
