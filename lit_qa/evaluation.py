# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Answer SQuAD 2.0 questions with a model and score the answers with the official metric.

The evaluation scripts (``evaluate/base.py``, ``evaluate/lora.py``) differ only in how they load the model;
everything after that lives here::

    questions = select_subset(load_squad(eval_file), limit=500)       # stratified, seeded, file order
    predictions = answer_questions(model, tokenizer, questions)       # id -> answer text ("" = no answer)
    metrics = evaluate_predictions(questions, predictions)            # official SQuAD 2.0 metric

Prompts are built by the same `QuestionEncoder` as the training samples, so the model is asked exactly
the way it was trained. The model says `lit_qa.prompts.NO_ANSWER` when the context has no answer; that
string is mapped back to ``""``, the official format's "no answer". With ``extractive=True`` (the evaluate
scripts' default) decoding can only produce a span of the context or that string (`lit_qa.extractive`).

Deciding to abstain (``na_threshold``): plain greedy decoding compares the no-answer string's first token with
single answer tokens, while the probability of answering is spread over many spans. Instead each question gets
one decoding pass that yields two length-normalised scores under the model's own distribution::

    s_span = mean log p(best span + EOS | prompt)      the span decoded greedily, the no-answer string forbidden
    s_na   = mean log p(no-answer + EOS | prompt)      read from one extra forward pass through the KV cache
    p_na   = sigmoid(s_na - s_span)                     abstain when p_na >= na_threshold

A model fine-tuned with a no-answer head (`lit_qa.na_head`) has a third score, read from the same prefill::

    z_head = the head's logit of "unanswerable"        from the prompt's forward pass, no extra pass

and p_na is taken from one of three rules (`NA_SOURCES`): ``head`` (sigmoid(z_head)), ``span`` (sigmoid(s_na -
s_span)) or ``head+span`` (sigmoid(z_head + s_na - s_span), both read as log-odds). Which one, and its threshold,
is what tuning on held-out questions picks (`best_na_rule`); always and never abstaining are among the candidates,
so on those questions the chosen rule is never worse than either.

``p_na`` is written to ``na_probs.json`` (the official script's ``--na-prob-file``), and the threshold that
maximises F1 is tuned on held-out questions (`best_na_threshold`) or saved with the fine-tuned weights by the
training loop (``na_threshold.json``, `read_na_threshold`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from lit_qa.data import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.data import QuestionEncoder, read_prepare_config, write_atomic
from lit_qa.errors import LitQAError
from lit_qa.extractive import SpanDecoder
from lit_qa.generate import generate
from lit_qa.model import GPT
from lit_qa.na_head import NAHeadOutputs
from lit_qa.prompts import NO_ANSWER, chat_template_sha256, check_prompt_style
from lit_qa.squad import Question, evaluate_predictions, exact_match, f1_score, gold_answers
from lit_qa.tokenizer import Tokenizer

PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
NA_PROBS_FILE = "na_probs.json"
BEST_SPANS_FILE = "best_spans.json"  # with a threshold: every question's best span, abstained or not
PARTIAL_FILE = "predictions.partial.jsonl"  # header line, then one line per answered question
NA_THRESHOLD_FILE = "na_threshold.json"  # next to fine-tuned weights: the threshold tuned during training
# What p_na means; recorded with every threshold, so one tuned for another rule is never applied to this one.
NA_METHOD = "p_na = sigmoid(mean log p(no-answer + EOS) - mean log p(best span + EOS))"
# Each no-answer rule and the formula recorded with a threshold tuned for it (a threshold only fits its own rule).
NA_METHODS = {
    "head": "p_na = sigmoid(no-answer head logit)",
    "span": NA_METHOD,
    "head+span": "p_na = sigmoid(no-answer head logit + mean log p(no-answer + EOS) - mean log p(best span + EOS))",
}
NA_SOURCES = tuple(NA_METHODS)  # in order of preference when two rules tune to the same F1
ORACLE_NOTE = ("best_f1/best_exact: the best threshold chosen on these evaluation questions themselves (as the "
               "official script's --na-prob-file output); an oracle for reference, not a result")  # fmt: skip


def check_out_dir(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse to write over a finished evaluation, before any model is loaded.

    A folder holding only ``predictions.partial.jsonl`` is an interrupted run, which `run_evaluation` resumes.

    Raises:
        LitQAError: If ``out_dir`` holds ``metrics.json`` or ``predictions.json`` and ``overwrite`` is False.
    """
    finished = [name for name in (METRICS_FILE, PREDICTIONS_FILE) if (Path(out_dir) / name).exists()]
    if finished and not overwrite:
        raise LitQAError(f"{out_dir} already holds a finished evaluation ({finished[0]}); pass --overwrite true "
                         "to replace it or choose another --out_dir")  # fmt: skip


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
        na_prob = {q.id: _sigmoid(na_logit(self.na_logits[q.id], source)) for q in questions}
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
        raise LitQAError(f"no-answer rule {source!r} needs a model with a no-answer head (lit_qa.na_head)")


def _has_logits(logits: dict[str, float], source: str) -> bool:
    return all(part in logits for part in source.split("+"))


def default_na_source(model: torch.nn.Module) -> str:
    """The rule used when nothing was tuned: the head's when the model has one, else the span score's."""
    return "head" if getattr(model, "na_head", None) is not None else "span"


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
    na_threshold: float | None = 0.5,
    extractive: bool = False,
) -> dict[str, str]:
    """Answer questions by greedy decoding, in batches of similar prompt length.

    Args:
        model, tokenizer, questions, ...: See `score_questions`.

    Returns:
        Question id to answer text, ``""`` meaning "no answer".
    """
    return score_questions(model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens,
                           progress, on_batch, na_threshold, extractive=extractive).final  # fmt: skip


def score_questions(
    model: GPT,
    tokenizer: Tokenizer,
    questions: list[Question],
    prompt_style: str = "plain",
    no_answer: str = NO_ANSWER,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = True,
    on_batch: Callable[[dict[str, str]], None] | None = None,
    na_threshold: float | None = 0.5,
    result: Answers | None = None,
    extractive: bool = False,
    na_source: str | None = None,
) -> Answers:
    """Answer questions by greedy decoding, and score how likely each is to have no answer.

    Without ``na_threshold`` this is plain greedy decoding: the model says the no-answer string or an answer as
    it likes. With it, each question gets one decoding pass that gives its best span (the no-answer string
    forbidden) and p_na = sigmoid(s_na - s_span) (module docstring); the model abstains when p_na >=
    ``na_threshold``. The best value for F1 is tuned on held-out data (`best_na_threshold`).

    Args:
        model: The model, in eval mode. A prompt longer than ``model.max_seq_length - max_new_tokens`` is
            windowed to fit (the paragraph's first window, see `prompt_for`) instead of failing.
        tokenizer: Its tokenizer.
        questions: The questions to answer.
        prompt_style: The prompt template the model was trained with.
        no_answer: The text the model was trained to say when there is no answer; mapped to ``""``.
        batch_size: Questions decoded together. Each row decodes exactly as it would alone.
        max_new_tokens: Longest answer in tokens. A span cut at this length is scored without its EOS.
        progress: Show a progress bar (in questions) on stderr.
        on_batch: Called with each batch's final ``{id: answer}``, e.g. to save partial results.
        na_threshold: Abstain when p_na >= this (in [0, 1]); None for plain greedy decoding.
        result: Answers known already (from an interrupted run): those questions are skipped, and the new
            answers are added to this object.
        extractive: Span-constrained decoding (`lit_qa.extractive`): every answer is a substring of its
            question's context or the no-answer string. With ``na_threshold`` the best span may only be a
            substring of the context; without ``extractive`` only the no-answer string's first token is forbidden.
        na_source: The rule p_na is read from (`NA_SOURCES`); None: `default_na_source`. Every rule's logits are
            kept in ``na_logits`` either way (the span score's costs one forward of the no-answer string's few
            tokens through the KV cache; the head's, nothing: it reads the prefill).

    Returns:
        The final answers, and with ``na_threshold`` the best spans, p_na and every rule's logits.

    Raises:
        LitQAError: If the arguments are out of range, or a question cannot fit the model even windowed.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise LitQAError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if na_threshold is not None and not 0.0 <= na_threshold <= 1.0:
        raise LitQAError(f"--na_threshold must be in [0, 1], got {na_threshold}")
    probe, targets = (None, None) if na_threshold is None else no_answer_ids(tokenizer, no_answer)
    has_head = getattr(model, "na_head", None) is not None
    na_source = na_source or default_na_source(model)
    check_na_source(na_source, has_head)
    # With a threshold, the no-answer string is scored in the cache slots the answer uses later: room for both.
    room = max_new_tokens if probe is None else max(max_new_tokens, len(probe))
    max_prompt_length = model.max_seq_length - room
    if max_prompt_length < 1:
        raise LitQAError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {model.max_seq_length} tokens"
        )
    # The encoder's length limit only drives windowing, where the prompt alone must fit (no answer tokens).
    encoder = QuestionEncoder(tokenizer, max_prompt_length, prompt_style, no_answer)
    result = result if result is not None else Answers(final={})
    todo = [q for q in questions if q.id not in result.final]
    prompts = {q.id: prompt_for(encoder, q) for q in todo}
    if windowed := sum(was_windowed for _, was_windowed in prompts.values()):
        print(f"{windowed} of {len(todo)} contexts were windowed to fit {max_prompt_length} tokens",
              file=sys.stderr)  # fmt: skip
    # Longest first: a batch pads to its longest prompt, so similar lengths waste little, and an
    # out-of-memory error shows up in the first batch rather than at the end.
    order = sorted(todo, key=lambda q: -len(prompts[q.id][0]))
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # never attended to, any valid id works
    spans = SpanDecoder(tokenizer, no_answer) if extractive and todo else None
    with tqdm(total=len(order), desc="answering", unit="q", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            # With a threshold the model abstains by p_na: the best span may not spell the no-answer string.
            contexts = [q.context for q in batch]
            constrain = None if spans is None else spans.processor(contexts, na_threshold is None, max_new_tokens)
            scorer = na_scores = head = None
            if na_threshold is not None:
                scorer = GreedyScorer(constrain, forbidden_first=None if extractive else int(probe[0]))
                na_scores = NoAnswerScores(targets)
                head = NAHeadOutputs() if has_head else None
            # Prompt lengths rounded to 64: a few shapes keep CPU bf16 kernels from being re-built per batch.
            outputs = generate(model, [prompts[q.id][0] for q in batch], max_new_tokens, stop_ids=tokenizer.eos_ids,
                               pad_id=pad_id, pad_multiple=64, logits_processor=constrain if scorer is None else scorer,
                               probe=None if na_scores is None else probe, on_probe=na_scores,
                               on_na_logits=head)  # fmt: skip
            texts = [to_official(tokenizer.decode(out.cpu(), skip_special_tokens=True), no_answer) for out in outputs]
            span_scores = None if scorer is None else scorer.mean_log_probs(outputs)
            batch_answers = {}
            for row, (question, text) in enumerate(zip(batch, texts, strict=True)):
                if span_scores is not None:
                    logits = {"span": na_scores.scores[row] - span_scores[row]}
                    if head is not None:
                        logits["head"] = head.logits[row]
                    p_na = _sigmoid(na_logit(logits, na_source))
                    result.best_span[question.id], result.na_prob[question.id] = text, p_na
                    result.na_logits[question.id] = logits
                    text = "" if p_na >= na_threshold else text
                batch_answers[question.id] = text
            result.final.update(batch_answers)
            if on_batch is not None:
                on_batch(batch_answers)
            bar.update(len(batch))
    # File order, for readable predictions files.
    result.final = {q.id: result.final[q.id] for q in questions}
    return result


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
    """A `lit_qa.generate.generate` logits processor for greedy decoding that also records, at every step, the raw
    log-probability (the model's own distribution, before any constraint) of the token greedy decoding takes.

    Args:
        constraint: An inner processor (e.g. a `lit_qa.extractive.SpanConstraint`), applied first.
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
        """Per row of ``generate``'s ``outputs``: the mean raw log-prob of its tokens and its stop token (a row cut
        at ``max_new_tokens`` has none: it gets the mean of its tokens)."""
        steps = torch.stack(self.chosen, dim=1).cpu()  # (B, S): one host sync per batch
        return [float(steps[row, : min(len(out) + 1, steps.size(1))].mean()) for row, out in enumerate(outputs)]


class NoAnswerScores:
    """`lit_qa.generate.generate`'s ``on_probe`` callback: keeps each row's mean log p(no-answer + EOS | prompt).

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


def _sigmoid(x: float) -> float:
    # Both branches keep exp() from overflowing.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def apply_na_threshold(answers: Answers, threshold: float, questions: list[Question]) -> dict[str, str]:
    """The answers at ``threshold``: ``""`` where p_na >= threshold, else the best span."""
    return {q.id: "" if answers.na_prob[q.id] >= threshold else answers.best_span[q.id] for q in questions}


def best_na_threshold(
    questions: list[Question], answers: Answers, metric: Literal["f1", "exact"] = "f1"
) -> tuple[float, float]:
    """The abstain threshold that maximises F1 (or EM) on ``questions``, and that score (0-100).

    Every question contributes the score of "no answer" when its p_na reaches the threshold and that of its best
    span otherwise, so all thresholds are scored from one decoding pass: sorted by p_na once, the score of
    abstaining on the k most likely no-answers is a prefix sum plus a suffix sum. Only cuts between distinct
    probabilities count (no threshold splits equal ones). The threshold returned is the midpoint between the
    highest p_na answered and the lowest abstained (0 to abstain on all, 1 to answer all); among cuts of equal
    score the one abstaining most wins, as in the official script.

    Raises:
        LitQAError: If there are no questions, or one has no p_na (answers scored without ``na_threshold``).
    """
    if not questions:
        raise LitQAError("tuning the no-answer threshold needs at least one question")
    if missing := [q.id for q in questions if q.id not in answers.na_prob]:
        raise LitQAError(f"tuning the no-answer threshold needs answers scored with an na_threshold ({missing[0]} "
                         "has no no-answer probability)")  # fmt: skip
    score = f1_score if metric == "f1" else exact_match
    rows = []  # (p_na, score if abstaining, score if answering), by p_na
    for question in questions:
        golds = gold_answers(question)
        rows.append((answers.na_prob[question.id], max(score("", g) for g in golds),
                     max(score(answers.best_span[question.id], g) for g in golds)))  # fmt: skip
    rows.sort(key=lambda row: row[0])
    answered = list(accumulate((row[2] for row in rows), initial=0.0))  # [k]: the k lowest p_na answer
    abstained = list(accumulate((row[1] for row in reversed(rows)), initial=0.0))[::-1]  # [k]: rows k.. abstain
    n = len(rows)
    cuts = [k for k in range(n + 1) if k in (0, n) or rows[k - 1][0] < rows[k][0]]
    totals = [answered[k] + abstained[k] for k in cuts]
    best = max(totals)
    i = next(i for i, total in enumerate(totals) if total >= best - 1e-9)  # float sums: ties up to rounding
    return _threshold_at(rows, cuts[i]), 100.0 * totals[i] / n


def best_na_rule(
    questions: list[Question], answers: Answers, sources: tuple[str, ...] | None = None
) -> tuple[str, float, float]:
    """The no-answer rule and threshold that maximise F1 on ``questions``: `best_na_threshold` for each rule in
    ``sources`` (default: every rule the answers have logits for), the best F1 winning, ties going to the rule
    listed first in `NA_SOURCES`. Thresholds 0 (always abstain) and 1 (never) are candidates of every rule.

    Returns:
        ``(rule, threshold, F1 at it)``.

    Raises:
        LitQAError: If no rule can be scored (answers scored without ``na_threshold``).
    """
    tuned = tune_na_rules(questions, answers, sources)
    best = max(f1 for _, f1 in tuned.values())
    source = next(source for source, (_, f1) in tuned.items() if f1 >= best - 1e-9)
    return source, *tuned[source]


def tune_na_rules(
    questions: list[Question], answers: Answers, sources: tuple[str, ...] | None = None
) -> dict[str, tuple[float, float]]:
    """Rule to (best threshold, its F1) on ``questions`` (`best_na_threshold`), for each rule in ``sources``
    (default: every rule the answers have logits for), in `NA_SOURCES` order."""
    sources = answers.sources() if sources is None else sources
    if not sources:
        raise LitQAError("tuning the no-answer rule needs answers scored with an na_threshold")
    return {source: best_na_threshold(questions, answers.with_source(source, questions)) for source in sources}


def _threshold_at(rows: list[tuple[float, float, float]], k: int) -> float:
    """A threshold that answers rows[:k] and abstains on rows[k:] (sorted by p_na)."""
    if k == 0:
        return 0.0
    if k == len(rows):
        return 1.0
    low, high = rows[k - 1][0], rows[k][0]
    middle = (low + high) / 2
    return middle if low < middle else high  # adjacent floats: the midpoint rounds onto one of them


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
    na_threshold: float | str | None = 0.5,
    calibration_questions: list[Question] | None = None,
    extractive: bool = False,
    threshold_dir: Path | None = None,
) -> dict[str, Any]:
    """Answer, score and write ``predictions.json``, ``metrics.json`` and (with a threshold) ``na_probs.json``.

    Each batch's answers are appended to ``predictions.partial.jsonl`` as they come (the file is removed at
    the end). Run again with the same questions, model and settings after a crash or a kill, and only the
    questions not in that file are answered; a file from other settings is ignored with a warning, so the
    answers of two different runs are never mixed.

    Args:
        model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens: See `score_questions`.
        na_threshold: See `resolve_na_threshold`: a float in [0, 1], "off" or None (plain greedy decoding),
            "auto" (the threshold saved in ``threshold_dir``, else tuned for F1 on ``calibration_questions``,
            else 0.5).
        calibration_questions: Held-out questions (never the evaluation set) to tune the threshold on, for "auto".
        extractive: Span-constrained decoding (see `score_questions`); the evaluate scripts turn it on by default.
        out_dir: Folder for the files (created if needed).
        info: Run settings to record in ``metrics.json`` (paths, precision, limit, seed, ...).
        threshold_dir: The fine-tuned weights' folder, where training saves ``na_threshold.json``.

    Returns:
        The metrics written: the official ones, ``no_answer_baseline``, the threshold used and where it came from,
        the oracle best-threshold scores (``best_f1``, ``best_exact``; see `ORACLE_NOTE`), the span and abstain
        diagnostics (`answerability_diagnostics`), timing and ``info``. With a threshold, ``best_spans.json`` holds
        every question's best span, so other thresholds can be scored without decoding again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    na_threshold, na_record = resolve_na_threshold(na_threshold, threshold_dir, bool(calibration_questions), extractive)
    na_source = na_record.pop("na_source", None) or default_na_source(model)
    tuned = {}
    if na_threshold == "calibrate":
        calibrated = score_questions(model, tokenizer, calibration_questions, prompt_style, no_answer, batch_size,
                                     max_new_tokens, na_threshold=1.0, extractive=extractive)  # fmt: skip
        tuned = tune_na_rules(calibration_questions, calibrated)
        na_source, na_threshold, calibration_f1 = best_na_rule(calibration_questions, calibrated)
        na_record.update(calibration_questions=len(calibration_questions), calibration_f1=round(calibration_f1, 3),
                         calibration_always_abstain_f1=round(no_answer_baseline(calibration_questions)["f1"], 3))
        print(f"no-answer rule {na_source}, threshold {na_threshold:.4f} (F1 {calibration_f1:.2f} on "
              f"{len(calibration_questions)} calibration questions)", file=sys.stderr)  # fmt: skip
    if na_threshold is not None:
        na_record.update(na_source=na_source, na_method=NA_METHODS[na_source])
    settings = partial_settings(model, questions, prompt_style, no_answer, max_new_tokens, na_threshold, info,
                                extractive, na_source)  # fmt: skip
    partial_path = out_dir / PARTIAL_FILE
    scored = read_partial(partial_path, settings)
    if resumed := len(scored.final):
        print(f"resuming {resumed} of {len(questions)} answers from {partial_path}", file=sys.stderr)
    # Rewritten whole first: a line cut short by a kill must not run into the next one appended.
    known = "".join(partial_line(scored, qid) for qid in scored.final)
    write_atomic(partial_path, (json.dumps({"settings": settings}) + "\n" + known).encode())
    start = time.perf_counter()
    with open(partial_path, "a", encoding="utf-8") as partial:

        def save_partial(batch_answers: dict[str, str]) -> None:
            partial.write("".join(partial_line(scored, qid) for qid in batch_answers))
            partial.flush()  # in the OS's hands now: a killed process loses nothing

        score_questions(model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens,
                        on_batch=save_partial, na_threshold=na_threshold, result=scored,
                        extractive=extractive, na_source=na_source)  # fmt: skip
    predictions = scored.final
    seconds = time.perf_counter() - start
    metrics = {
        **evaluate_predictions(questions, predictions),
        "no_answer_baseline": no_answer_baseline(questions),
        "num_questions": len(questions),
        "question_ids_sha256": question_ids_sha256(questions),
        "seconds": round(seconds, 3),
        "questions_per_second": round((len(questions) - resumed) / max(seconds, 1e-9), 3),
        **({"resumed_answers": resumed} if resumed else {}),
        "prompt_style": prompt_style,
        "no_answer": no_answer,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "na_threshold": na_threshold,
        **na_record,
        "extractive": extractive,
        **(info or {}),
    }
    write_json(out_dir / PREDICTIONS_FILE, predictions)
    if na_threshold is not None:
        metrics.update(oracle_thresholds(questions, scored))
        metrics.update(answerability_diagnostics(questions, scored))
        if tuned:
            metrics["na_rules"] = rule_comparison(questions, scored, tuned)
        write_json(out_dir / NA_PROBS_FILE, {q.id: scored.na_prob[q.id] for q in questions})
        write_json(out_dir / BEST_SPANS_FILE, {q.id: scored.best_span[q.id] for q in questions})
    write_json(out_dir / METRICS_FILE, metrics)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    return metrics


def oracle_thresholds(questions: list[Question], answers: Answers) -> dict[str, Any]:
    """The official script's ``--na-prob-file`` extras: the best EM and F1 over all thresholds on ``questions``
    themselves, and those thresholds (ours abstain at p_na >= t, the official script's at p_na > t; the midpoints
    `best_na_threshold` returns separate the same questions either way)."""
    f1_threshold, f1 = best_na_threshold(questions, answers, "f1")
    exact_threshold, exact = best_na_threshold(questions, answers, "exact")
    return {"best_exact": exact, "best_exact_thresh": exact_threshold, "best_f1": f1, "best_f1_thresh": f1_threshold,
            "best_thresholds_note": ORACLE_NOTE}  # fmt: skip


def rule_comparison(
    questions: list[Question], answers: Answers, tuned: dict[str, tuple[float, float]]
) -> dict[str, dict[str, Any]]:
    """Per no-answer rule: its threshold and F1 on the calibration questions (``tuned``, `tune_na_rules`) and the
    official scores of these questions at that threshold: the ablation of the rules from one decoding pass."""
    table = {}
    for source, (threshold, calibration_f1) in tuned.items():
        by_rule = answers.with_source(source, questions)
        scores = evaluate_predictions(questions, apply_na_threshold(by_rule, threshold, questions))
        table[source] = {"threshold": threshold, "calibration_f1": round(calibration_f1, 3),
                         **{key: scores[key] for key in ("exact", "f1", "HasAns_f1", "NoAns_exact") if key in scores},
                         "na_prob_auc": roc_auc([by_rule.na_prob[q.id] for q in questions],
                                                [not q.answers for q in questions])}  # fmt: skip
    return table


def answerability_diagnostics(questions: list[Question], answers: Answers) -> dict[str, Any]:
    """Tell the two skills SQuAD 2.0 F1 mixes apart: copying the right span, and knowing when to abstain.

    Returns:
        ``span_HasAns_f1``: F1 of the best spans on the answerable questions, as if the model never abstained
        (None without answerable questions). ``na_prob_auc``: ROC AUC of p_na for telling unanswerable from
        answerable questions, 0.5 being chance (None unless both kinds are present).
    """
    answerable = [q for q in questions if q.answers]
    span_f1 = [max(f1_score(answers.best_span[q.id], g) for g in gold_answers(q)) for q in answerable]
    na_probs = [answers.na_prob[q.id] for q in questions]
    unanswerable = [not q.answers for q in questions]
    diagnostics = {"span_HasAns_f1": 100.0 * sum(span_f1) / len(span_f1) if span_f1 else None,
                   "na_prob_auc": roc_auc(na_probs, unanswerable)}  # fmt: skip
    if len(sources := answers.sources()) > 1:  # which rule separates best, whichever is in use
        diagnostics["na_prob_auc_by_rule"] = {
            source: roc_auc([na_logit(answers.na_logits[q.id], source) for q in questions], unanswerable)
            for source in sources
        }
    return diagnostics


def roc_auc(scores: list[float], positive: list[bool]) -> float | None:
    """The probability that a random positive scores above a random negative, ties counting one half (the
    Mann-Whitney form of the ROC AUC); None unless both classes are present."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, start = 0.0, 0
    while start < len(order):  # a run of equal scores shares the mean of its 1-based ranks
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        rank_sum += sum(positive[i] for i in order[start : end + 1]) * (start + end + 2) / 2
        start = end + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def resolve_na_threshold(
    na_threshold: float | str | None, threshold_dir: Path | None = None, calibration: bool = False,
    extractive: bool = True, verbose: bool = True,
) -> tuple[float | None | Literal["calibrate"], dict[str, Any]]:  # fmt: skip
    """Decide the no-answer threshold from ``--na_threshold``, before any model is loaded.

    Args:
        na_threshold: A float in [0, 1]; "off" or None: plain greedy decoding; "auto": the threshold saved in
            ``threshold_dir`` (`read_na_threshold`), else tuned on the calibration questions, else 0.5 (the
            no-answer string as likely per token as the best span) with a warning.
        threshold_dir: The fine-tuned weights' folder (None: nothing saved to look for).
        calibration: Whether calibration questions were given.
        extractive: Whether answers are span-constrained (a saved threshold tuned otherwise gets a warning).
        verbose: Print which threshold is used when there is a choice (the scripts check early, quietly).

    Returns:
        The threshold (None for off, "calibrate" to tune it on the calibration questions) and what to record
        in ``metrics.json`` about where it came from; for a saved threshold also its rule (``na_source``).

    Raises:
        LitQAError: For a value out of range, or a saved threshold file that is unreadable.
    """
    if na_threshold is None or na_threshold == "off":
        return None, {"na_threshold_source": "off (plain greedy decoding)"}
    if na_threshold == "auto":
        saved = read_na_threshold(threshold_dir) if threshold_dir is not None else None
        if saved is not None:
            path = Path(threshold_dir) / NA_THRESHOLD_FILE
            if calibration and verbose:
                print(f"note: using the threshold saved in {path}; --calibration_file is not used", file=sys.stderr)
            if saved.get("extractive", True) != extractive and verbose:
                print(f"warning: {path} was tuned with extractive={saved.get('extractive')}, this evaluation uses "
                      f"extractive={extractive}", file=sys.stderr)  # fmt: skip
            return float(saved["threshold"]), {"na_threshold_source": f"saved: {path}", "na_source": saved["source"],
                                               "na_threshold_saved": saved}  # fmt: skip
        if calibration:
            return "calibrate", {"na_threshold_source": "tuned on --calibration_file"}
        if verbose:
            where = f"{threshold_dir} has no {NA_THRESHOLD_FILE}" if threshold_dir else "no threshold is saved"
            print(f"warning: --na_threshold auto: {where} (training writes it with --eval.f1_questions) and no "
                  "--calibration_file was given; using 0.5. Tune it: --calibration_file val-v2.0.json of the "
                  "prepared data", file=sys.stderr)  # fmt: skip
        return 0.5, {"na_threshold_source": "0.5 (nothing saved or tuned)"}
    if isinstance(na_threshold, (int, float)) and not isinstance(na_threshold, bool) and 0 <= na_threshold <= 1:
        return float(na_threshold), {"na_threshold_source": "--na_threshold"}
    raise LitQAError(f"--na_threshold must be auto, off or a number in [0, 1], got {na_threshold!r}")


def read_na_threshold(folder: Path) -> dict[str, Any] | None:
    """The no-answer threshold saved next to fine-tuned weights (``na_threshold.json``, written by training with
    ``--eval.f1_questions``), or None if there is none or it was tuned for another rule (with a warning).

    Raises:
        LitQAError: If the file is not valid JSON or its ``threshold`` is not a number in [0, 1].
    """
    path = Path(folder) / NA_THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LitQAError(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    threshold = record.get("threshold") if isinstance(record, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise LitQAError(f"{path}: 'threshold' must be a number in [0, 1], got {threshold!r}")
    sources = [source for source, method in NA_METHODS.items() if method == record.get("method")]
    if not sources:
        print(f"warning: ignoring {path}: tuned for another no-answer rule ({record.get('method')!r})", file=sys.stderr)
        return None
    return {**record, "source": sources[0]}


def partial_settings(
    model: torch.nn.Module,
    questions: list[Question],
    prompt_style: str,
    no_answer: str,
    max_new_tokens: int,
    na_threshold: float | None,
    info: dict[str, Any] | None,
    extractive: bool = False,
    na_source: str = "span",
) -> dict[str, Any]:
    """What a partial answers file must have been written with to be resumed: the same questions, weights,
    prompt and decoding settings, and run settings (``info``). The batch size is left out: it does not change
    the answers, and a smaller one is the usual fix for an out-of-memory crash."""
    settings = {"question_ids_sha256": question_ids_sha256(questions), "weights": weights_sample_sha256(model),
                "prompt_style": prompt_style, "no_answer": no_answer, "max_new_tokens": max_new_tokens,
                "na_threshold": na_threshold, **(info or {})}  # fmt: skip
    if na_threshold is not None:  # answers abstained by another rule (the first token's probability) never mix in
        settings["na_method"] = NA_METHODS[na_source]
    if extractive:  # only then: free-decoding partial files written before the flag existed still resume
        settings["extractive"] = True
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file


def weights_sample_sha256(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the weights: every tensor's name and shape and its first and last 8 values (a
    retrained model differs in those; hashing every weight of a 7B model would take longer than a batch)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        values = torch.cat([flat[:8], flat[-8:]]).to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + values.numpy().tobytes())
    return digest.hexdigest()


def read_partial(path: Path, settings: dict[str, Any]) -> Answers:
    """The answers in a partial file written with ``settings``; none (with a warning) if it was written with
    other settings. A last line cut short by a kill is dropped."""
    answers = Answers(final={})
    if not path.is_file():
        return answers
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    try:
        saved = json.loads(lines[0])["settings"]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        saved = None
    saved = saved if isinstance(saved, dict) else {}
    if saved != settings:
        differs = sorted(k for k in settings.keys() | saved.keys() if saved.get(k) != settings.get(k))
        print(f"warning: ignoring {path}: written with other settings (differs in: {', '.join(differs)})",
              file=sys.stderr)  # fmt: skip
        return answers
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            qid, answer = entry["id"], entry["answer"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        answers.final[qid] = answer
        if "na_prob" in entry:
            answers.best_span[qid], answers.na_prob[qid] = entry["best_span"], entry["na_prob"]
            answers.na_logits[qid] = entry.get("na_logits", {})
    return answers


def partial_line(answers: Answers, qid: str) -> str:
    """One question's answer (and with a threshold its best span and p_na) as a JSON line."""
    entry = {"id": qid, "answer": answers.final[qid]}
    if qid in answers.na_prob:
        entry.update(best_span=answers.best_span[qid], na_prob=answers.na_prob[qid], na_logits=answers.na_logits[qid])
    return json.dumps(entry, ensure_ascii=False) + "\n"


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
    lines.append("  ".join(groups))
    if metrics.get("na_threshold") is not None:
        lines.append(f"no-answer threshold {metrics['na_threshold']:.4f} ({metrics['na_threshold_source']}); oracle "
                     f"(best threshold on these very questions): F1 {metrics['best_f1']:.2f} at "
                     f"{metrics['best_f1_thresh']:.4f}")  # fmt: skip
        diagnostics = []
        if metrics.get("span_HasAns_f1") is not None:
            diagnostics.append(f"HasAns F1 if never abstaining (best spans) {metrics['span_HasAns_f1']:.2f}")
        if metrics.get("na_prob_auc") is not None:
            diagnostics.append(f"p_na ROC AUC {metrics['na_prob_auc']:.3f} (0.5 = chance)")
        if diagnostics:
            lines.append("; ".join(diagnostics))
    else:
        lines.append(f"no-answer decision: {metrics.get('na_threshold_source', 'off')}")
    lines.append(f"wrote {out_dir / PREDICTIONS_FILE} and {out_dir / METRICS_FILE}")
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


def prompt_settings(
    trained_dir: Path,
    prompt_style: str | None,
    no_answer: str | None,
    warn_if_unknown: bool = True,
    tokenizer: Tokenizer | None = None,
) -> tuple[str, str]:
    """The prompt style and no-answer string: the flags if given, else those the model in ``trained_dir`` (an
    adapter or a fine-tuned checkpoint folder) was trained with, as recorded in its ``prepare_config.json``.

    A flag that differs from the training setting is honoured with a warning: the model was never asked
    that way, so its scores will likely drop. Without a ``prepare_config.json`` (e.g. a base model) the training
    settings are unknown: the defaults are used and flags are taken as they are.

    Args:
        trained_dir: The folder of the trained weights.
        prompt_style: ``--prompt_style``, or None for the training setting.
        no_answer: ``--no_answer``, or None for the training setting.
        warn_if_unknown: Warn when ``trained_dir`` has no ``prepare_config.json``.
        tokenizer: The evaluation tokenizer: with the chat style, warn if its chat template is not the one the
            data was prepared with (see `check_chat_template`).

    Raises:
        LitQAError: If the prompt style is unknown.
    """
    path = Path(trained_dir) / PREPARE_CONFIG_FILE
    prepared = read_prepare_config(trained_dir) if path.is_file() else None
    if prepared is None and warn_if_unknown:
        print(f"warning: {trained_dir} has no {PREPARE_CONFIG_FILE}; assuming the default prompt settings",
              file=sys.stderr)  # fmt: skip
    defaults = {"prompt_style": "plain", "no_answer": NO_ANSWER}
    chosen = {"prompt_style": prompt_style, "no_answer": no_answer}
    for key, value in chosen.items():
        trained = (prepared or {}).get(key, defaults[key])
        if value is None:
            chosen[key] = trained
        elif prepared is not None and value != trained:
            print(f"warning: --{key} {value!r} differs from {trained!r}, which the model was trained with",
                  file=sys.stderr)  # fmt: skip
    check_prompt_style(chosen["prompt_style"])
    if tokenizer is not None:
        check_chat_template(trained_dir, chosen["prompt_style"], tokenizer)
    return chosen["prompt_style"], chosen["no_answer"]


def check_chat_template(trained_dir: Path, prompt_style: str, tokenizer: Tokenizer) -> None:
    """Warn when a chat-style model is evaluated with another chat template than its data was prepared with
    (``chat_template_sha256`` in ``trained_dir/prepare_config.json``): the prompts then differ from training's.
    Nothing is checked for the plain style or without a recorded template."""
    path = Path(trained_dir) / PREPARE_CONFIG_FILE
    if prompt_style != "chat" or not path.is_file():
        return
    recorded = read_prepare_config(trained_dir).get("chat_template_sha256")
    current = chat_template_sha256(tokenizer)
    if recorded is not None and recorded != current:
        current = f"sha256 {current[:12]}" if current else "none"
        print(f"warning: the chat template of {tokenizer.checkpoint_dir} ({current}) is not the one "
              f"the model was trained with ({path}: {recorded[:12]}); its prompts differ from training's",
              file=sys.stderr)  # fmt: skip
