# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Validation during training: the loss (and the no-answer head's) on fixed batches, a few sample generations,
and with ``--eval.f1_questions`` the official F1 of answering fixed validation questions.

Validation never moves the global RNG (`rng_kept`), so whether and how often it runs leaves training unchanged.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import torch

from lit_qa.data.packing import forward_passes
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.calibration import apply_na_threshold, best_na_rule
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.squad_metric import evaluate_predictions
from lit_qa.generation.generate import generate
from lit_qa.models.na_head import na_loss_sum
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.distributed import one_cpu_process
from lit_qa.training.loss import loss_sums
from lit_qa.training.progress import Progress


@dataclass
class ValQuestions:
    """Validation questions answered by generation at each validation (``--eval.f1_questions``).

    Attributes:
        questions: A fixed subset of the validation split, in file order.
        prompt_style: The prompt template the data was prepared with.
        no_answer: The string the model is trained to say for an unanswerable question.
        source: Where the questions come from (e.g. the prepared data folder), recorded in ``na_threshold.json``.
    """

    questions: list[Question]
    prompt_style: str
    no_answer: str
    source: str = "the validation split"

    def decoding(self, eval_args: EvalArgs) -> DecodingSettings:
        """The F1 pass's settings: extractive greedy decoding that never abstains (threshold 1.0), so every
        question's best span and p_na are kept and the threshold is tuned on them afterwards."""
        return DecodingSettings(self.prompt_style, self.no_answer, eval_args.f1_batch_size, eval_args.max_new_tokens,
                                na_threshold=1.0, extractive=True)  # fmt: skip


@torch.no_grad()
def validation_metrics(
    fabric: L.Fabric,
    model: torch.nn.Module,
    val_data: list[dict[str, Any]],
    micro_batch_size: int,
    max_batches: int,
    pad_multiple: int = 64,
    pack: bool = False,
) -> dict[str, float]:
    """Mean token loss (``loss``) over the first ``max_batches`` validation micro-batches (the same every time);
    with a no-answer head also its mean cross-entropy (``na_loss``) and accuracy at p_na = 0.5 (``na_acc``).
    ``pack``: each micro-batch's questions on one paragraph in one sequence (`lit_qa.data.packing`), which gives
    the same numbers in less time."""
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device)
    na_total = torch.zeros(3, device=fabric.device)  # summed cross-entropy, correct, samples
    starts = list(range(0, min(len(val_data), max_batches * micro_batch_size), micro_batch_size))
    max_length = getattr(model, "module", model).max_seq_length
    # Every rank runs the same number of forward passes (FSDP gathers weights collectively in each);
    # a rank short of batches repeats its first one and does not count it.
    rounds = math.ceil(len(starts) / fabric.world_size)
    own = starts[fabric.global_rank :: fabric.world_size]
    for i in range(rounds):
        start = own[i] if i < len(own) else starts[0]
        # Packed rows one at a time on one CPU process, as training runs them; together on several ranks.
        for batch in forward_passes(val_data[start : start + micro_batch_size], 0, max_length, pad_multiple, pack,
                                    pack and one_cpu_process(fabric)):  # fmt: skip
            batch = {key: value.to(fabric.device) for key, value in batch.items()}
            loss_sum, na_logits = loss_sums(model, batch)
            if i >= len(own):
                continue
            total += loss_sum
            tokens += (batch["labels"][:, 1:] != -100).sum()
            if na_logits is not None:
                labels = batch["unanswerable"]  # (N,): one per question, packed or not
                na_total += torch.stack([na_loss_sum(na_logits, labels), ((na_logits > 0).float() == labels).sum(),
                                         torch.tensor(float(len(labels)), device=labels.device)])  # fmt: skip
    model.train(was_training)
    total, tokens = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(tokens, reduce_op="sum")
    if tokens == 0:
        raise LitQAError("the validation split has no answer tokens to compute a loss on")
    metrics = {"loss": float(total / tokens)}
    if getattr(getattr(model, "module", model), "na_head", None) is not None:
        na_total = fabric.all_reduce(na_total, reduce_op="sum")
        if na_total[2] > 0:
            metrics.update(na_loss=float(na_total[0] / na_total[2]), na_acc=100.0 * float(na_total[1] / na_total[2]))
    return metrics


def print_sample_generations(
    fabric: L.Fabric, model: torch.nn.Module, val_data: list[dict[str, Any]], tokenizer: Tokenizer, eval_args: EvalArgs
) -> None:
    """Greedy-decode a few validation prompts and print them next to their targets."""
    if eval_args.num_samples == 0 or not val_data:
        return
    module = getattr(model, "module", model)
    fits = [s for s in val_data if int((s["labels"] == -100).sum()) + eval_args.max_new_tokens <= module.max_seq_length]
    samples = fits[:: max(1, len(fits) // eval_args.num_samples)][: eval_args.num_samples]  # spread out
    was_training = module.training
    module.eval()
    prompts = [sample["input_ids"][sample["labels"] == -100] for sample in samples]
    outputs = generate(module, prompts, eval_args.max_new_tokens, stop_ids=tokenizer.eos_ids)
    module.train(was_training)
    for sample, output in zip(samples, outputs):
        target = sample["labels"][sample["labels"] != -100]
        expected = tokenizer.decode(target[~torch.isin(target, torch.tensor(sorted(tokenizer.eos_ids)))])
        fabric.print(f"  [{sample.get('id', '?')}] generated {tokenizer.decode(output)!r}, expected {expected!r}")


def run_validation(
    fabric: L.Fabric,
    model: torch.nn.Module,
    val_data: list[dict[str, Any]],
    val_questions: ValQuestions | None,
    tokenizer: Tokenizer,
    train_args: TrainArgs,
    eval_args: EvalArgs,
    progress: Progress,
) -> dict[str, float]:
    """Validate at the current step: the loss, and with ``val_questions`` generation EM/F1; logged as
    ``val/*``, printed, followed by the sample generations, and stored in ``progress``.

    The global RNG is left as it was (`rng_kept`): validation only observes the run.
    """
    with rng_kept(fabric.device):
        metrics = validation_metrics(fabric, model, val_data, train_args.micro_batch_size, eval_args.max_batches,
                                     train_args.pad_multiple, train_args.pack)  # fmt: skip
        if val_questions is not None:
            metrics.update(generation_metrics(fabric, model, tokenizer, val_questions, eval_args))
        numbers = {f"val/{name}": value for name, value in metrics.items() if isinstance(value, (int, float))}
        fabric.log_dict(numbers, step=progress.step)
        fabric.print(f"\nstep {progress.step}: {format_val(metrics)}")
        print_sample_generations(fabric, model, val_data, tokenizer, eval_args)
    progress.val_loss, progress.val = metrics["loss"], metrics
    return metrics


def format_val(metrics: dict[str, float]) -> str:
    """``val loss 1.2345, F1 52.10, EM 48.00, has-answer F1 40.20, no-answer accuracy 63.00, no-answer threshold
    0.3120`` (what is there)."""
    labels = {"f1": "F1", "em": "EM", "has_ans_f1": "has-answer F1", "no_ans_acc": "no-answer accuracy",
              "na_acc": "no-answer head accuracy"}
    parts = [f"val loss {metrics['loss']:.4f}"] + [f"{label} {metrics[key]:.2f}" for key, label in labels.items()
                                                   if key in metrics]  # fmt: skip
    if "na_loss" in metrics:
        parts.append(f"no-answer head loss {metrics['na_loss']:.4f}")
    if "na_threshold" in metrics:
        parts.append(f"no-answer threshold {metrics['na_threshold']:.4f}")
    if "na_source" in metrics:
        parts.append(f"rule {metrics['na_source']}")
    return ", ".join(parts)


@torch.no_grad()
def generation_metrics(
    fabric: L.Fabric, model: torch.nn.Module, tokenizer: Tokenizer, val_questions: ValQuestions, eval_args: EvalArgs
) -> dict[str, float]:
    """Answers to ``val_questions`` at a no-answer threshold tuned on them, scored with the official SQuAD 2.0
    metric (0-100): ``f1``, ``em``, ``has_ans_f1`` / ``no_ans_acc`` where the subset has answerable / unanswerable
    questions, and the threshold itself (``na_threshold``).

    One decoding pass, as `lit_qa.evaluation.answering.score_questions` does for the evaluate scripts: extractive greedy
    decoding of the best span plus the no-answer string's score, then every threshold is scored from it
    (`lit_qa.evaluation.calibration.best_na_threshold`). Tuned and scored on the same questions, F1 is optimistic; it
    ranks steps, and the threshold goes into ``na_threshold.json``. Prompts longer than ``model.max_seq_length -
    eval_args.max_new_tokens`` are windowed to fit (training sets that length from the prepared samples), as
    the evaluation scripts do for the model's full length.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    # Every rank answers every question and rank 0's scores are kept. Sharding the questions would not work
    # under FSDP: each forward pass all-gathers the sharded weights, a collective every rank must join equally
    # often, but decoding a batch stops once all its answers have ended, so ranks answering different
    # questions would run different numbers of forward passes and hang. The same questions give the same
    # passes on every rank (under DDP that repeats the work, in the wall time of one process).
    quiet = contextlib.redirect_stderr(io.StringIO()) if fabric.global_rank else contextlib.nullcontext()
    questions = val_questions.questions
    try:
        with fabric.autocast(), quiet:
            scored = score_questions(module, tokenizer, questions, val_questions.decoding(eval_args), progress=False)
    finally:
        module.train(was_training)
    source, threshold, _ = best_na_rule(questions, scored)
    scores = evaluate_predictions(questions, apply_na_threshold(scored.with_source(source, questions), threshold,
                                                                questions))  # fmt: skip
    metrics = {"f1": scores["f1"], "em": scores["exact"]}
    if "HasAns_f1" in scores:
        metrics["has_ans_f1"] = scores["HasAns_f1"]
    if "NoAns_exact" in scores:  # for an unanswerable question EM is whether the model abstained
        metrics["no_ans_acc"] = scores["NoAns_exact"]
    metrics["na_threshold"], metrics["na_source"] = threshold, source
    return fabric.broadcast(metrics, src=0) if fabric.world_size > 1 else metrics


@contextmanager
def rng_kept(device: torch.device) -> Iterator[None]:
    """Put the global torch RNG (CPU, and CUDA on ``device``) back as it was on exit.

    Whether and how often validation runs must not shift the dropout masks of the steps after it. (Eval
    mode and greedy decoding draw nothing today; a sampling decoder would.)
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def first_validation(fabric: L.Fabric, model: torch.nn.Module, val_data: list[dict[str, Any]],
                     val_questions: ValQuestions | None, tokenizer: Tokenizer, train_args: TrainArgs,
                     eval_args: EvalArgs, progress: Progress) -> None:  # fmt: skip
    """Fail fast, before any training time is spent: a full validation with ``--eval.initial_validation``, else
    two batches of the loss and two questions' answers, which exercise the model and the data."""
    if eval_args.initial_validation:
        run_validation(fabric, model, val_data, val_questions, tokenizer, train_args, eval_args, progress)
        return
    with rng_kept(fabric.device):
        validation_metrics(fabric, model, val_data, train_args.micro_batch_size, 2, train_args.pad_multiple,
                           train_args.pack)  # fmt: skip
        if val_questions is not None:
            first_two = replace(val_questions, questions=val_questions.questions[:2])
            generation_metrics(fabric, model, tokenizer, first_two, eval_args)
