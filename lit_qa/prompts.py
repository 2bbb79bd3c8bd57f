# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The prompt a model sees for one SQuAD question, and the answer text it is trained to produce.

Data preparation, validation, generation and evaluation all build prompts here, so the model is always asked
the same way it was trained. The model answers "unanswerable" (`NO_ANSWER`) rather than an empty string,
because an empty answer is just an immediate EOS, which a model learns to emit too eagerly; evaluation maps
the no-answer string back to ``""`` for the official metric.
"""

from __future__ import annotations

from collections.abc import Callable

from lit_qa.errors import LitQAError

NO_ANSWER = "unanswerable"

PLAIN_TEMPLATE = (
    "Answer the question with a short span copied from the context. "
    'If the context does not contain the answer, reply "{no_answer}".\n\n'
    "### Context:\n{context}\n\n"
    "### Question:\n{question}\n\n"
    "### Answer:\n"
)


def plain_prompt(context: str, question: str, no_answer: str = NO_ANSWER) -> str:
    """The instruction, context and question as plain text; the answer follows ``### Answer:\\n``."""
    return PLAIN_TEMPLATE.format(context=context, question=question, no_answer=no_answer)


# Name -> function(context, question, no_answer) -> prompt text. The name is stored in prepare_config.json,
# so later stages rebuild exactly the prompt the model was trained on.
PROMPT_STYLES: dict[str, Callable[[str, str, str], str]] = {"plain": plain_prompt}


def check_prompt_style(style: str) -> None:
    """Raise `LitQAError` listing the known styles if ``style`` is not one of them."""
    if style not in PROMPT_STYLES:
        raise LitQAError(f"unknown prompt style {style!r}; choose one of: {', '.join(sorted(PROMPT_STYLES))}")


def build_prompt(context: str, question: str, style: str = "plain", no_answer: str = NO_ANSWER) -> str:
    """Build the prompt for one question.

    Args:
        context: The paragraph (or a window of it), verbatim.
        question: The question, verbatim.
        style: A key of `PROMPT_STYLES`.
        no_answer: The text the model is told to reply when the context has no answer.

    Returns:
        The prompt text, ending where the answer starts.

    Raises:
        LitQAError: If ``style`` is unknown.
    """
    check_prompt_style(style)
    return PROMPT_STYLES[style](context, question, no_answer)


def answer_text(answers: list[str], no_answer: str = NO_ANSWER) -> str:
    """The training target: the first gold answer, or ``no_answer`` for an unanswerable question.

    Args:
        answers: The gold answer texts (empty for an unanswerable question).
        no_answer: What the model says when there is no answer.

    Returns:
        The text the model should generate (before EOS).
    """
    return answers[0] if answers else no_answer
