# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""How questions are answered: the decoding settings, as one object.

The evaluate scripts build one from their flags (`lit_qa.evaluation.launch`), training's F1 pass from its
``--eval.*`` settings (`lit_qa.training.validation`); `run_evaluation` and `score_questions` take it whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_qa.data.prompts import NO_ANSWER


@dataclass(frozen=True)
class DecodingSettings:
    """The settings that decide an answer.

    Attributes:
        prompt_style: The prompt template the model was trained with (`lit_qa.data.prompts`).
        no_answer: The text the model was trained to say when there is no answer; mapped to ``""``.
        batch_size: Questions decoded together. Each row decodes exactly as it would alone, so it changes speed
            and memory, never an answer.
        max_new_tokens: Longest answer in tokens. A span cut at this length is scored without its EOS.
        na_threshold: Abstain when p_na >= this (in [0, 1]); None for plain greedy decoding (the model says the
            no-answer string or a span as it likes). `run_evaluation` also takes the requests "auto" and "off"
            and resolves them (`lit_qa.evaluation.calibration.resolve_na_threshold`) before decoding.
        extractive: Span-constrained decoding (`lit_qa.generation.extractive`): every answer is a substring of its
            question's context or the no-answer string.
        na_source: The rule p_na is read from (`lit_qa.evaluation.answers.NA_SOURCES`): the span score, the
            no-answer head or both; None: the default for the model (`default_na_source`).
    """

    prompt_style: str = "plain"
    no_answer: str = NO_ANSWER
    batch_size: int = 8
    max_new_tokens: int = 32
    na_threshold: float | str | None = 0.5
    extractive: bool = False
    na_source: str | None = None
