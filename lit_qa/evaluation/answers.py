# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""What the model answered, and the rules that read "no answer" off its scores.

Deciding to abstain (``na_threshold``): plain greedy decoding compares the no-answer string's first token with
single answer tokens, while the probability of answering is spread over many spans. Instead each question gets
one decoding pass (`lit_qa.evaluation.answering`) that yields two length-normalised scores under the model's own
distribution::

    s_span = mean log p(best span + EOS | prompt)      the span decoded greedily, the no-answer string forbidden
    s_na   = mean log p(no-answer + EOS | prompt)      read from one extra forward pass through the KV cache
    p_na   = sigmoid(s_na - s_span)                     abstain when p_na >= na_threshold

A model fine-tuned with a no-answer head (`lit_qa.models.na_head`) has a third score, read from the same prefill::

    z_head = the head's logit of "unanswerable"        from the prompt's forward pass, no extra pass

and p_na is taken from one of three rules (`NA_SOURCES`): ``head`` (sigmoid(z_head)), ``span`` (sigmoid(s_na -
s_span)) or ``head+span`` (sigmoid(z_head + s_na - s_span), both read as log-odds). Which one, and its threshold,
is what tuning on held-out questions picks (`lit_qa.evaluation.calibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError

# What p_na means; recorded with every threshold, so one tuned for another rule is never applied to this one.
NA_METHOD = "p_na = sigmoid(mean log p(no-answer + EOS) - mean log p(best span + EOS))"

# Each no-answer rule and the formula recorded with a threshold tuned for it (a threshold only fits its own rule).
NA_METHODS = {
    "head": "p_na = sigmoid(no-answer head logit)",
    "span": NA_METHOD,
    "head+span": "p_na = sigmoid(no-answer head logit + mean log p(no-answer + EOS) - mean log p(best span + EOS))",
}

NA_SOURCES = tuple(NA_METHODS)  # in order of preference when two rules tune to the same F1


@dataclass
class Answers:
    """What the model answered, and how likely it found that there is no answer.

    Attributes:
        final: Question id to reported answer, ``""`` meaning "no answer".
        best_span: Question id to the best answer when abstaining is not allowed (with ``na_threshold``).
        na_prob: Question id to p_na by the rule in use (module docstring; with ``na_threshold``).
        na_logits: Question id to the log-odds each rule reads: ``span`` (s_na - s_span) and, with a no-answer
            head, ``head`` (its logit).
    """

    final: dict[str, str]
    best_span: dict[str, str] = field(default_factory=dict)
    na_prob: dict[str, float] = field(default_factory=dict)
    na_logits: dict[str, dict[str, float]] = field(default_factory=dict)

    def with_source(self, source: str, questions: list[Question]) -> Answers:
        """These answers with ``na_prob`` taken from rule ``source`` (`NA_SOURCES`) for ``questions``."""
        na_prob = {q.id: sigmoid(na_logit(self.na_logits[q.id], source)) for q in questions}
        return replace(self, na_prob=na_prob)

    def sources(self) -> tuple[str, ...]:
        """The rules every scored question has the logits for."""
        if not self.na_logits:
            return ()
        return tuple(s for s in NA_SOURCES if all(_has_logits(logits, s) for logits in self.na_logits.values()))


def na_logit(logits: dict[str, float], source: str) -> float:
    """The log-odds of "no answer" under rule ``source``: the head's logit, the span score or their sum."""
    check_na_source(source, "head" in logits)
    return sum(logits[part] for part in source.split("+"))


def check_na_source(source: str, has_head: bool) -> None:
    """Raise `LitQAError` for an unknown rule, or one that needs a no-answer head the model does not have."""
    if source not in NA_METHODS:
        raise LitQAError(f"unknown no-answer rule {source!r}; choose one of: {', '.join(NA_SOURCES)}")
    if "head" in source and not has_head:
        raise LitQAError(f"no-answer rule {source!r} needs a model with a no-answer head (lit_qa.models.na_head)")


def _has_logits(logits: dict[str, float], source: str) -> bool:
    return all(part in logits for part in source.split("+"))


def default_na_source(model: torch.nn.Module) -> str:
    """The rule used when nothing was tuned: the head's when the model has one, else the span score's."""
    return "head" if getattr(model, "na_head", None) is not None else "span"


def sigmoid(x: float) -> float:
    # Both branches keep exp() from overflowing.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
