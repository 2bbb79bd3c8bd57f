# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The prompt a model sees for one SQuAD question, and the answer texts it is trained to produce.

Data preparation, validation, generation and evaluation all build prompts here, so the model is always asked
the same way it was trained. The model answers "unanswerable" (`NO_ANSWER`) rather than an empty string,
because an empty answer is just an immediate EOS, which a model learns to emit too eagerly; evaluation maps
the no-answer string back to ``""`` for the official metric.

Two prompt styles (`PROMPT_STYLES`) ask the same thing:

* ``plain``: the instruction, context and question as plain text; the answer follows ``### Answer:\\n``.
* ``chat``: the same text as the one user message of the checkpoint's own chat template (its
  ``chat_template``, rendered the way ``transformers``' ``apply_chat_template(..., add_generation_prompt=True)``
  does), so the answer is the assistant's reply. For SmolLM2-Instruct (ChatML)::

      <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n
      <|im_start|>user\\nAnswer the question ... ### Question:\\n...<|im_end|>\\n
      <|im_start|>assistant\\n                                   <- the answer, then EOS (<|im_end|>), follows

  No system message is passed, so the template's own default (if any) is kept. The special tokens the
  template writes (``<|im_start|>``, ``<|begin_of_text|>``, ``<s>`` ...) become their single ids, and BOS is
  exactly what the template writes (``apply_chat_template`` adds none either).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from lit_qa.errors import LitQAError

if TYPE_CHECKING:  # the tokenizer is only passed through; importing it for real would load tokenizers early
    from lit_qa.models.tokenizer import Tokenizer

NO_ANSWER = "unanswerable"
ANSWER_MODES = ("first", "all")

USER_TEMPLATE = (
    "Answer the question with a short span copied from the context. "
    'If the context does not contain the answer, reply "{no_answer}".\n\n'
    "### Context:\n{context}\n\n"
    "### Question:\n{question}"
)

PLAIN_TEMPLATE = USER_TEMPLATE + "\n\n### Answer:\n"

# The name is stored in prepare_config.json, so later stages rebuild exactly the prompt the model was trained on.
PROMPT_STYLES = {
    "plain": "instruction, context and question as plain text",
    "chat": "the same as one user turn of the checkpoint's chat template (for instruct models)",
}


def plain_prompt(context: str, question: str, no_answer: str = NO_ANSWER) -> str:
    """The instruction, context and question as plain text; the answer follows ``### Answer:\\n``."""
    return PLAIN_TEMPLATE.format(context=context, question=question, no_answer=no_answer)


def check_prompt_style(style: str, tokenizer: Tokenizer | None = None) -> None:
    """Check a prompt style name and, given the tokenizer, that the checkpoint supports it.

    Args:
        style: A key of `PROMPT_STYLES`.
        tokenizer: The model's tokenizer. For ``"chat"`` its chat template must render a user message and an
            assistant turn start.

    Raises:
        LitQAError: If the style is unknown (listing the known ones), or ``"chat"`` is asked for a checkpoint
            without a usable chat template.
    """
    if style not in PROMPT_STYLES:
        raise LitQAError(f"unknown prompt style {style!r}; choose one of: {', '.join(sorted(PROMPT_STYLES))}")
    if style == "chat" and tokenizer is not None:
        _check_chat_template(tokenizer)


def build_prompt(
    context: str, question: str, style: str = "plain", no_answer: str = NO_ANSWER, tokenizer: Tokenizer | None = None
) -> str:
    """Build the prompt text for one question.

    Args:
        context: The paragraph (or a window of it), verbatim.
        question: The question, verbatim.
        style: A key of `PROMPT_STYLES`.
        no_answer: The text the model is told to reply when the context has no answer.
        tokenizer: The model's tokenizer; needed for ``"chat"`` (its chat template and special tokens).

    Returns:
        The prompt text, ending where the answer starts.

    Raises:
        LitQAError: If ``style`` is unknown, or ``"chat"`` has no tokenizer or the tokenizer no chat template.
    """
    check_prompt_style(style)
    if style == "plain":
        return plain_prompt(context, question, no_answer)
    if tokenizer is None:
        raise LitQAError("prompt style 'chat' needs the model's tokenizer, which holds the chat template")
    user = USER_TEMPLATE.format(context=context, question=question, no_answer=no_answer)
    return render_chat(tokenizer, user)


def encode_prompt(
    tokenizer: Tokenizer, context: str, question: str, style: str = "plain", no_answer: str = NO_ANSWER
) -> torch.Tensor:
    """Token ids of the prompt for one question (see `build_prompt`).

    A plain prompt gets BOS as the tokenizer's default says; a chat prompt gets exactly the BOS its template
    writes, and its special-token strings become their ids with either tokenizer backend.
    """
    text = build_prompt(context, question, style, no_answer, tokenizer)
    if style == "chat":
        return tokenizer.encode(text, bos=False, specials=True)
    return tokenizer.encode(text)


def render_chat(tokenizer: Tokenizer, user: str, add_generation_prompt: bool = True) -> str:
    """Render one user message with the tokenizer's chat template.

    Args:
        tokenizer: The model's tokenizer, with a ``chat_template``.
        user: The user message.
        add_generation_prompt: End with the start of the assistant's turn.

    Returns:
        The rendered text, special tokens written out.

    Raises:
        LitQAError: If there is no chat template, or it does not compile or render.
    """
    template = _compiled(tokenizer)
    specials = {
        f"{kind}_token": tokenizer.id_to_token(i)
        for kind, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id))
        if i is not None
    }
    try:
        return template.render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=add_generation_prompt, **specials
        )
    except Exception as e:  # noqa: BLE001 - a template can raise anything jinja2 or its own code raises
        raise LitQAError(f"{_template_source(tokenizer)}: the chat template fails to render: {_one_line(e)}") from None


def chat_template_sha256(tokenizer: Tokenizer) -> str | None:
    """SHA-256 of the tokenizer's chat template text (None without one): recorded with prepared data, so a
    change of template between training and evaluation can be told."""
    if tokenizer.chat_template is None:
        return None
    return hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest()


def answer_texts(answers: list[str], answer_starts: list[int], mode: str = "first") -> list[tuple[str, int]]:
    """The gold answers a question is trained on, each with its character offset in the context.

    Args:
        answers: The gold answer texts, in file order (empty for an unanswerable question).
        answer_starts: The offset of each answer.
        mode: ``"first"``: only the first answer. ``"all"``: every distinct answer text, in file order, each
            with the offset of its first occurrence (a repeated text adds nothing to learn).

    Returns:
        ``(text, start)`` pairs; empty for an unanswerable question.

    Raises:
        LitQAError: If ``mode`` is not one of `ANSWER_MODES`.
    """
    if mode not in ANSWER_MODES:
        raise LitQAError(f"unknown answers mode {mode!r}; choose one of: {', '.join(ANSWER_MODES)}")
    pairs = list(zip(answers, answer_starts, strict=True))
    if mode == "first":
        return pairs[:1]
    first_start = dict(reversed(pairs))  # text -> offset of its first occurrence
    return [(text, first_start[text]) for text in dict.fromkeys(answers)]


def answer_text(answers: list[str], no_answer: str = NO_ANSWER) -> str:
    """The training target: the first gold answer, or ``no_answer`` for an unanswerable question.

    Args:
        answers: The gold answer texts (empty for an unanswerable question).
        no_answer: What the model says when there is no answer.

    Returns:
        The text the model should generate (before EOS).
    """
    return answers[0] if answers else no_answer


def _check_chat_template(tokenizer: Tokenizer) -> None:
    """Fail early, in one line, if the template cannot carry a question.

    A template may ignore ``add_generation_prompt``: Llama-2-chat's and Mistral's user turn ends with
    ``[/INST]``, and the reply follows it directly.
    """
    probe = "lit-qa probe: the user message"
    if probe not in render_chat(tokenizer, probe):
        raise LitQAError(
            f"{_template_source(tokenizer)}: the chat template does not write the user message; "
            "use --prompt_style plain"
        )


def _compiled(tokenizer: Tokenizer) -> Any:
    if tokenizer.chat_template is None:
        raise LitQAError(
            f"prompt style 'chat' needs a chat template, but {tokenizer.checkpoint_dir} has none (no chat_template "
            "in tokenizer_config.json, no chat_template.jinja); use --prompt_style plain"
        )
    try:
        return _compile(tokenizer.chat_template)
    except Exception as e:  # noqa: BLE001 - jinja2 raises TemplateSyntaxError, and others for odd input
        where = _template_source(tokenizer)
        raise LitQAError(f"{where}: the chat template is not valid Jinja: {_one_line(e)}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """Compile a chat template as ``transformers`` does: a sandbox (templates come from model hubs), blocks
    trimmed, loop controls, ``raise_exception`` and a ``tojson`` that does not HTML-escape.

    Unlike ``transformers`` there is no ``strftime_now``: a template that writes today's date (Llama-3.2) would
    make training and evaluation prompts differ; without it such templates fall back to a fixed date.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _template_source(tokenizer: Tokenizer) -> str:
    return str(tokenizer.chat_template_file or tokenizer.checkpoint_dir)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
