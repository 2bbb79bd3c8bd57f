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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lit_qa.data import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.data import QuestionEncoder, read_prepare_config, write_atomic
from lit_qa.errors import LitQAError
from lit_qa.extractive import SpanDecoder
from lit_qa.generate import generate
from lit_qa.model import GPT
from lit_qa.prompts import NO_ANSWER, check_prompt_style
from lit_qa.squad import Question, evaluate_predictions, f1_score, gold_answers
from lit_qa.tokenizer import Tokenizer

PREDICTIONS_FILE = "predictions.json"
METRICS_FILE = "metrics.json"
NA_PROBS_FILE = "na_probs.json"
PARTIAL_FILE = "predictions.partial.jsonl"  # header line, then one line per answered question


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
    """What the model answered, and how sure it was that there is no answer.

    Attributes:
        final: Question id to reported answer, ``""`` meaning "no answer".
        best_span: Question id to the best answer when abstaining is not allowed (with ``na_threshold``).
        abstain_prob: Question id to P(first token of the no-answer string) (empty without ``na_threshold``).
    """

    final: dict[str, str]
    best_span: dict[str, str] = field(default_factory=dict)
    abstain_prob: dict[str, float] = field(default_factory=dict)


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
) -> Answers:
    """Answer questions by greedy decoding, and score how likely each is to have no answer.

    Greedy decoding compares the no-answer string's first token with each single answer token. The
    probability of answering is spread over many candidate spans while abstaining is one token, so a
    fine-tuned model that is unsure abstains almost always. With ``na_threshold``, the first token of the
    no-answer string is forbidden during decoding (giving the best answer span), and the model abstains
    when the probability it gave that token reaches the threshold: at 0.5 that is when abstaining is more
    likely than all answers together; the best value for F1 is tuned on held-out data (`best_na_threshold`).

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
        on_batch: Called with each batch's final ``{id: answer}``, e.g. to save partial results.
        na_threshold: Abstain when P(first token of the no-answer string) >= this; None for plain greedy decoding.
        result: Answers known already (from an interrupted run): those questions are skipped, and the new
            answers are added to this object.
        extractive: Span-constrained decoding (`lit_qa.extractive`): every answer is a substring of its
            question's context or the no-answer string. With ``na_threshold`` the best span may only be a
            substring of the context.

    Returns:
        The final answers, and with ``na_threshold`` the best spans and abstain probabilities.

    Raises:
        LitQAError: If the arguments are out of range, or a question cannot fit the model even windowed.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise LitQAError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if na_threshold is not None and not 0.0 <= na_threshold <= 1.0:
        raise LitQAError(f"--na_threshold must be in [0, 1], got {na_threshold}")
    max_prompt_length = model.max_seq_length - max_new_tokens
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
    abstain_token = int(tokenizer.encode(no_answer, bos=False)[0])
    spans = SpanDecoder(tokenizer, no_answer) if extractive and todo else None
    with tqdm(total=len(order), desc="answering", unit="q", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            probs: list[torch.Tensor] = []

            def forbid_abstaining(logits: torch.Tensor) -> torch.Tensor:
                probs.append(logits.float().softmax(dim=-1)[:, abstain_token])  # (B,)
                return logits.index_fill(-1, torch.tensor([abstain_token], device=logits.device), float("-inf"))

            # With a threshold the model abstains by probability: the best span may not spell the no-answer string.
            contexts = [q.context for q in batch]
            constrain = None if spans is None else spans.processor(contexts, na_threshold is None, max_new_tokens)
            # Prompt lengths rounded to 64: a few shapes keep CPU bf16 kernels from being re-built per batch.
            outputs = generate(model, [prompts[q.id][0] for q in batch], max_new_tokens, stop_ids=tokenizer.eos_ids,
                               pad_id=pad_id, pad_multiple=64,
                               first_step_processor=None if na_threshold is None else forbid_abstaining,
                               logits_processor=constrain)  # fmt: skip
            texts = [to_official(tokenizer.decode(out.cpu(), skip_special_tokens=True), no_answer) for out in outputs]
            batch_answers = {}
            for row, (question, text) in enumerate(zip(batch, texts, strict=True)):
                if na_threshold is not None:
                    result.best_span[question.id] = text
                    result.abstain_prob[question.id] = float(probs[0][row])
                    text = "" if result.abstain_prob[question.id] >= na_threshold else text
                batch_answers[question.id] = text
            result.final.update(batch_answers)
            if on_batch is not None:
                on_batch(batch_answers)
            bar.update(len(batch))
    # File order, for readable predictions files.
    result.final = {q.id: result.final[q.id] for q in questions}
    return result


def best_na_threshold(questions: list[Question], answers: Answers) -> tuple[float, float]:
    """The abstain threshold that maximises F1 on ``questions``, and that F1 (0-100).

    Every question contributes the F1 of "no answer" when its abstain probability reaches the threshold and
    the F1 of its best span otherwise, so all thresholds are scored from one decoding pass.
    """
    if not answers.abstain_prob:
        raise LitQAError("tuning the no-answer threshold needs answers scored with an na_threshold")
    gains = []  # (abstain probability, F1 if abstaining, F1 if answering)
    for question in questions:
        golds = gold_answers(question)
        gains.append((answers.abstain_prob[question.id], max(f1_score("", g) for g in golds),
                      max(f1_score(answers.best_span[question.id], g) for g in golds)))  # fmt: skip
    best_threshold, best_f1 = 1.0 + 1e-9, sum(answer for _, _, answer in gains)  # never abstain
    for threshold in sorted({prob for prob, _, _ in gains}):
        total = sum(abstain if prob >= threshold else answer for prob, abstain, answer in gains)
        if total > best_f1:
            best_threshold, best_f1 = threshold, total
    return min(best_threshold, 1.0), 100.0 * best_f1 / max(1, len(gains))


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
) -> dict[str, Any]:
    """Answer, score and write ``predictions.json`` and ``metrics.json`` into ``out_dir``.

    Each batch's answers are appended to ``predictions.partial.jsonl`` as they come (the file is removed at
    the end). Run again with the same questions, model and settings after a crash or a kill, and only the
    questions not in that file are answered; a file from other settings is ignored with a warning, so the
    answers of two different runs are never mixed.

    Args:
        model, tokenizer, questions, prompt_style, no_answer, batch_size, max_new_tokens: See `score_questions`.
        na_threshold: A float or None (see `score_questions`), or "auto": tune it for F1 on
            ``calibration_questions`` (held-out data, never the evaluation set) and apply it.
        calibration_questions: Questions to tune the threshold on, for "auto".
        extractive: Span-constrained decoding (see `score_questions`); the evaluate scripts turn it on by default.
        out_dir: Folder for the two files (created if needed).
        info: Run settings to record in ``metrics.json`` (paths, precision, limit, seed, ...).

    Returns:
        The metrics written: the official ones, ``no_answer_baseline``, timing and ``info``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = {}
    if na_threshold == "auto":
        if not calibration_questions:
            raise LitQAError("--na_threshold auto needs --calibration_file (held-out questions to tune it on)")
        scored = score_questions(model, tokenizer, calibration_questions, prompt_style, no_answer, batch_size,
                                 max_new_tokens, na_threshold=1.0, extractive=extractive)  # fmt: skip
        na_threshold, calibration_f1 = best_na_threshold(calibration_questions, scored)
        calibration = {"calibration_questions": len(calibration_questions), "calibration_f1": round(calibration_f1, 3)}
        print(f"no-answer threshold {na_threshold:.4f} (F1 {calibration_f1:.2f} on {len(calibration_questions)} "
              "calibration questions)", file=sys.stderr)  # fmt: skip
    settings = partial_settings(model, questions, prompt_style, no_answer, max_new_tokens, na_threshold, info,
                                extractive)  # fmt: skip
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
                        extractive=extractive)  # fmt: skip
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
        "extractive": extractive,
        **calibration,
        **(info or {}),
    }
    write_json(out_dir / PREDICTIONS_FILE, predictions)
    if scored.abstain_prob:  # the official evaluation script's --na-prob-file
        metrics["best_threshold_f1"] = round(best_na_threshold(questions, scored)[1], 3)
        write_json(out_dir / NA_PROBS_FILE, {q.id: scored.abstain_prob[q.id] for q in questions})
    write_json(out_dir / METRICS_FILE, metrics)
    (out_dir / PARTIAL_FILE).unlink(missing_ok=True)
    return metrics


def partial_settings(
    model: torch.nn.Module,
    questions: list[Question],
    prompt_style: str,
    no_answer: str,
    max_new_tokens: int,
    na_threshold: float | None,
    info: dict[str, Any] | None,
    extractive: bool = False,
) -> dict[str, Any]:
    """What a partial answers file must have been written with to be resumed: the same questions, weights,
    prompt and decoding settings, and run settings (``info``). The batch size is left out: it does not change
    the answers, and a smaller one is the usual fix for an out-of-memory crash."""
    settings = {"question_ids_sha256": question_ids_sha256(questions), "weights": weights_sample_sha256(model),
                "prompt_style": prompt_style, "no_answer": no_answer, "max_new_tokens": max_new_tokens,
                "na_threshold": na_threshold, **(info or {})}  # fmt: skip
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
        if "abstain_prob" in entry:
            answers.best_span[qid], answers.abstain_prob[qid] = entry["best_span"], entry["abstain_prob"]
    return answers


def partial_line(answers: Answers, qid: str) -> str:
    """One question's answer (and with a threshold its best span and abstain probability) as a JSON line."""
    entry = {"id": qid, "answer": answers.final[qid]}
    if qid in answers.abstain_prob:
        entry.update(best_span=answers.best_span[qid], abstain_prob=answers.abstain_prob[qid])
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


def prompt_settings(
    trained_dir: Path, prompt_style: str | None, no_answer: str | None, warn_if_unknown: bool = True
) -> tuple[str, str]:
    """The prompt style and no-answer string: the flags if given, else those the model in ``trained_dir`` (an
    adapter or a fine-tuned checkpoint folder) was trained with, as recorded in its ``prepare_config.json``.

    A flag that differs from the training setting is honoured with a warning: the model was never asked
    that way, so its scores will likely drop.
    """
    trained = {"prompt_style": "plain", "no_answer": NO_ANSWER}
    if (Path(trained_dir) / PREPARE_CONFIG_FILE).is_file():
        trained.update({k: v for k, v in read_prepare_config(trained_dir).items() if k in trained})
    elif warn_if_unknown:
        print(f"warning: {trained_dir} has no {PREPARE_CONFIG_FILE}; assuming the default prompt settings",
              file=sys.stderr)  # fmt: skip
    chosen = {"prompt_style": prompt_style, "no_answer": no_answer}
    for key, value in chosen.items():
        if value is None:
            chosen[key] = trained[key]
        elif value != trained[key]:
            print(f"warning: --{key} {value!r} differs from {trained[key]!r}, which the model was trained with",
                  file=sys.stderr)  # fmt: skip
    check_prompt_style(chosen["prompt_style"])
    return chosen["prompt_style"], chosen["no_answer"]
