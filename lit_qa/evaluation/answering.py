# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Answer questions by batched greedy decoding, and score how likely each is to have no answer.

Prompts are built by the same `QuestionEncoder` as the training samples, so the model is asked exactly
the way it was trained. The model says `lit_qa.data.prompts.NO_ANSWER` when the context has no answer; that
string is mapped back to ``""``, the official format's "no answer". With ``extractive=True`` (the evaluate
scripts' default) decoding can only produce a span of the context or that string (`lit_qa.generation.extractive`).
With a threshold, one decoding pass per batch also yields each question's no-answer scores
(`lit_qa.evaluation.answers`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.prompts import NO_ANSWER
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answers import Answers, check_na_source, default_na_source, na_logit, sigmoid
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.generation.extractive import SpanDecoder
from lit_qa.generation.generate import decode_n_tokens, kv_cached, prefill, probe_logits
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer


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


def score_questions(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    decoding: DecodingSettings = DecodingSettings(),
    progress: bool = True,
    on_batch: Callable[[dict[str, str]], None] | None = None,
    result: Answers | None = None,
) -> Answers:
    """Answer questions by greedy decoding, and score how likely each is to have no answer.

    Without ``decoding.na_threshold`` this is plain greedy decoding: the model says the no-answer string or an answer
    as it likes. With it, each question gets one decoding pass that gives its best span (the no-answer string
    forbidden; with ``decoding.extractive`` a substring of the context) and p_na by ``decoding.na_source`` (module
    docstring); the model abstains when p_na >= the threshold. The best value for F1 is tuned on held-out data
    (`lit_qa.evaluation.calibration`). Every rule's logits are kept in ``na_logits`` either way (the span score's
    costs one forward of the no-answer string's few tokens through the KV cache; the head's, nothing: it reads the
    prefill).

    Args:
        model: The model, in eval mode. A prompt longer than ``model.max_seq_length - max_new_tokens`` is
            windowed to fit (the paragraph's first window, see `prompt_for`) instead of failing.
        tokenizer: Its tokenizer.
        questions: The questions to answer.
        decoding: The prompt and decoding settings (`DecodingSettings`; ``na_threshold`` a number or None).
        progress: Show a progress bar (in questions) on stderr.
        on_batch: Called with each batch's final ``{id: answer}``, e.g. to save partial results.
        result: Answers known already (from an interrupted run): those questions are skipped, and the new
            answers are added to this object.

    Returns:
        The final answers, and with a threshold the best spans, p_na and every rule's logits.

    Raises:
        LitQAError: If a setting is out of range, or a question cannot fit the model even windowed.
    """
    probe, targets, max_prompt_length = check_decoding(model, tokenizer, decoding)
    decoding = replace(decoding, na_source=decoding.na_source or default_na_source(model))
    check_na_source(decoding.na_source, getattr(model, "na_head", None) is not None)
    # The encoder's length limit only drives windowing, where the prompt alone must fit (no answer tokens).
    encoder = QuestionEncoder(tokenizer, max_prompt_length, decoding.prompt_style, decoding.no_answer)
    result = result if result is not None else Answers(final={})
    todo = [q for q in questions if q.id not in result.final]
    prompts = {q.id: prompt_for(encoder, q) for q in todo}
    if windowed := sum(was_windowed for _, was_windowed in prompts.values()):
        print(f"{windowed} of {len(todo)} contexts were windowed to fit {max_prompt_length} tokens",
              file=sys.stderr)  # fmt: skip
    spans = SpanDecoder(tokenizer, decoding.no_answer) if decoding.extractive and todo else None
    order, batch_size = paragraph_order(todo, prompts), decoding.batch_size
    with tqdm(total=len(order), desc="answering", unit="q", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            batch_prompts = [prompts[q.id][0] for q in batch]
            batch_answers = answer_batch(model, tokenizer, batch, batch_prompts, spans, probe, targets, decoding,
                                         result)  # fmt: skip
            result.final.update(batch_answers)
            if on_batch is not None:
                on_batch(batch_answers)
            bar.update(len(batch))
    # File order, for readable predictions files.
    result.final = {q.id: result.final[q.id] for q in questions}
    return result


def paragraph_order(questions: list[Question], prompts: dict[str, tuple[torch.Tensor, bool]]) -> list[Question]:
    """The order to answer in: questions about one paragraph together, so that a batch prefills the paragraph once
    for all of them (`lit_qa.generation.prefixes`); longest paragraphs first: a batch pads to its longest prompt,
    so similar lengths waste little, and an out-of-memory error shows up in the first batch rather than at the end.
    """
    longest = {}
    for q in questions:
        longest[q.context] = max(longest.get(q.context, 0), len(prompts[q.id][0]))
    return sorted(questions, key=lambda q: (-longest[q.context], q.context, -len(prompts[q.id][0])))


def check_decoding(
    model: GPT, tokenizer: Tokenizer, decoding: DecodingSettings
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Check `score_questions`' decoding settings.

    Returns:
        The no-answer probe and its targets (`no_answer_ids`; None without a threshold), and the longest prompt
        that leaves room for the answer (and for the probe, scored in the cache slots the answer uses later).

    Raises:
        LitQAError: If a setting is out of range or leaves no room for a prompt.
    """
    batch_size, max_new_tokens, na_threshold = decoding.batch_size, decoding.max_new_tokens, decoding.na_threshold
    if batch_size < 1 or max_new_tokens < 1:
        raise LitQAError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if na_threshold is not None and (isinstance(na_threshold, str) or not 0.0 <= na_threshold <= 1.0):
        raise LitQAError(f"--na_threshold must be in [0, 1], got {na_threshold!r}")
    probe, targets = (None, None) if na_threshold is None else no_answer_ids(tokenizer, decoding.no_answer)
    room = max_new_tokens if probe is None else max(max_new_tokens, len(probe))
    max_prompt_length = model.max_seq_length - room
    if max_prompt_length < 1:
        raise LitQAError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {model.max_seq_length} tokens"
        )
    return probe, targets, max_prompt_length


def answer_batch(
    model: GPT,
    tokenizer: Tokenizer,
    batch: list[Question],
    prompts: list[torch.Tensor],
    spans: SpanDecoder | None,
    probe: torch.Tensor | None,
    targets: torch.Tensor | None,
    decoding: DecodingSettings,
    result: Answers,
) -> dict[str, str]:
    """Decode one batch of questions together (`score_questions`; ``decoding.na_source`` resolved), recording
    each one's best span, p_na and rule logits in ``result`` when abstaining by ``decoding.na_threshold``.

    Returns:
        The batch's final answers by question id (``""``: no answer).
    """
    na_threshold, max_new_tokens = decoding.na_threshold, decoding.max_new_tokens
    # With a threshold the model abstains by p_na: the best span may not spell the no-answer string.
    contexts = [q.context for q in batch]
    constrain = None if spans is None else spans.processor(contexts, na_threshold is None, max_new_tokens)
    scorer = na_scores = None
    if na_threshold is not None:
        scorer = GreedyScorer(constrain, forbidden_first=None if spans is not None else int(probe[0]))
        na_scores = NoAnswerScores(targets)
    with_head = scorer is not None and getattr(model, "na_head", None) is not None
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # never attended to, any valid id works
    # The probe is scored in the cache slots that the answer overwrites later: room for the longer of the two.
    room = max_new_tokens if na_scores is None else max(max_new_tokens, probe.numel())
    # Prompt lengths rounded to 64: a few shapes keep CPU bf16 kernels from being re-built per batch.
    with kv_cached(model, prompts, room, pad_id, pad_multiple=64) as layout:
        first, head_logits = prefill(model, layout, na_head=with_head)
        if na_scores is not None:
            na_scores(probe_logits(model, layout, first, probe))
        outputs = decode_n_tokens(model, layout, first, max_new_tokens, stop_ids=tokenizer.eos_ids, pad_id=pad_id,
                                  logits_processor=constrain if scorer is None else scorer)  # fmt: skip
    texts = [to_official(tokenizer.decode(out.cpu(), skip_special_tokens=True), decoding.no_answer)
             for out in outputs]  # fmt: skip
    if scorer is None:
        return {question.id: text for question, text in zip(batch, texts, strict=True)}
    span_scores = scorer.mean_log_probs(outputs)
    head = None if head_logits is None else head_logits.float().tolist()
    answers = {}
    for row, (question, text) in enumerate(zip(batch, texts, strict=True)):
        logits = {"span": na_scores.scores[row] - span_scores[row]}
        if head is not None:
            logits["head"] = head[row]
        p_na = sigmoid(na_logit(logits, decoding.na_source))
        result.best_span[question.id], result.na_prob[question.id] = text, p_na
        result.na_logits[question.id] = logits
        answers[question.id] = "" if p_na >= na_threshold else text
    return answers


def no_answer_ids(tokenizer: Tokenizer, no_answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The no-answer reply as training encodes it (``encode(no_answer, eos=True)``), for scoring: the ids fed after
    the prompt (the probe), and the ids the probe's P + 1 logits predict (the probe, then EOS).

    Raises:
        LitQAError: If the string encodes to no tokens or the tokenizer has no EOS token.
    """
    ids = tokenizer.encode(no_answer, bos=False)
    if ids.numel() == 0 or tokenizer.eos_id is None:
        raise LitQAError(f"cannot score the no-answer string {no_answer!r}: it needs at least one token and an EOS")
    return ids, torch.cat([ids, torch.tensor([tokenizer.eos_id], dtype=ids.dtype)])


class GreedyScorer:
    """A logits processor (`lit_qa.generation.generate.decode_n_tokens`) for greedy decoding that also records, at
    every step, the raw log-probability (the model's own distribution, before any constraint) of the token greedy
    decoding takes.

    Args:
        constraint: An inner processor (e.g. a `lit_qa.generation.extractive.SpanConstraint`), applied first.
        forbidden_first: A token id that may not be chosen first (the no-answer string's, without a constraint).
    """

    def __init__(
        self,
        constraint: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
        forbidden_first: int | None = None,
    ) -> None:
        self.constraint, self.forbidden_first = constraint, forbidden_first
        self.chosen: list[torch.Tensor] = []  # one (B,) tensor per step

    def __call__(self, logits: torch.Tensor, last_tokens: torch.Tensor | None) -> torch.Tensor:
        """The constrained logits; records the raw log-prob of their argmax, which greedy `sample` picks too."""
        raw = logits.float().log_softmax(dim=-1)  # (B, V)
        if self.constraint is not None:
            logits = self.constraint(logits, last_tokens)
        if last_tokens is None and self.forbidden_first is not None:
            logits = logits.index_fill(-1, torch.tensor([self.forbidden_first], device=logits.device), float("-inf"))
        self.chosen.append(raw.gather(-1, logits.argmax(dim=-1, keepdim=True))[:, 0])
        return logits

    def mean_log_probs(self, outputs: list[torch.Tensor]) -> list[float]:
        """Per row of ``decode_n_tokens``' ``outputs``: the mean raw log-prob of its tokens and its stop token (a row
        cut at ``max_new_tokens`` has none: it gets the mean of its tokens)."""
        steps = torch.stack(self.chosen, dim=1).cpu()  # (B, S): one host sync per batch
        return [float(steps[row, : min(len(out) + 1, steps.size(1))].mean()) for row, out in enumerate(outputs)]


class NoAnswerScores:
    """Each row's mean log p(no-answer + EOS | prompt), from the no-answer probe's logits
    (`lit_qa.generation.generate.probe_logits`).

    Args:
        targets: The ids the probe's logits predict (`no_answer_ids`).
    """

    def __init__(self, targets: torch.Tensor) -> None:
        self.targets = targets
        self.scores: list[float] = []

    def __call__(self, logits: torch.Tensor) -> None:
        """Score the probe's (B, P + 1, vocab) logits."""
        targets = self.targets.to(logits.device)[None, :, None].expand(logits.size(0), -1, 1)  # (B, P+1, 1)
        log_probs = logits.float().log_softmax(dim=-1).gather(-1, targets)[..., 0]  # (B, P+1)
        self.scores = log_probs.mean(dim=-1).tolist()


def to_official(text: str, no_answer: str = NO_ANSWER) -> str:
    """Strip a generated answer and turn the no-answer string (any case) into ``""``."""
    text = text.strip()
    return "" if text.casefold() == no_answer.strip().casefold() else text
