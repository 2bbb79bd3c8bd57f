# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The one training loop every fine-tuning script uses: plain functions, no Trainer class, no callbacks.

The scripts in ``finetune/`` differ only in what they make trainable and what they save; all of them call
`fit`. To customise the loop, copy `fit` into your script and change it there.

Determinism and exact resume: the order of micro-batches is a pure function of (seed, epoch), and a
checkpoint records the optimizer, the scheduler, the fp16 loss scale, the position in that order and every
rank's RNG state. Validation never moves the RNG, and the model is in training mode for every step whether
the run started fresh or resumed, so a run stopped after step k and resumed ends with exactly the weights of
a run that never stopped, dropout included.

Model selection: with ``--eval.f1_questions N`` each validation also answers N fixed questions of the
validation split by extractive greedy decoding, tunes the no-answer threshold on them (`lit_qa.evaluation`:
abstain when p_na = sigmoid(s_na - s_span) reaches it) and scores them with the official SQuAD metric at that
threshold; the step with the best validation F1 (or loss, ``--eval.best_metric``) is kept in ``out_dir/best/``,
with the threshold in ``na_threshold.json`` next to the weights (the scripts write the last one into ``final/``),
where ``evaluate/*.py --na_threshold auto`` reads it.

SIGTERM or SIGINT (Ctrl-C) stops the run cleanly: the current optimizer step finishes, a checkpoint is
saved and the process exits (status 0 after SIGTERM, 130 after SIGINT) with a line saying how to resume.
A second signal stops at once; checkpoints are written atomically, so that never leaves a broken one.

Gradient accumulation is exact too: each micro-batch's summed token loss is divided by the number of
loss tokens in the whole global batch (known in advance, since every rank computes the same order), so
k accumulated micro-batches give the gradient of one batch k times bigger.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lit_qa.args import EvalArgs, TrainArgs
from lit_qa.data import collate
from lit_qa.distributed import SHARDED_STATE_DIR, is_sharded, load_sharded_state, save_sharded_state
from lit_qa.errors import LitQAError
from lit_qa.evaluation import (NA_METHODS, NA_THRESHOLD_FILE, apply_na_threshold, best_na_rule, score_questions,
                               write_json)  # fmt: skip
from lit_qa.generate import generate
from lit_qa.na_head import last_prompt_positions, na_loss_sum
from lit_qa.squad import Question, evaluate_predictions
from lit_qa.tokenizer import Tokenizer

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
BEST_DIR = "best"
BEST_FILE = "best.json"  # inside best/: the step and the validation metrics it was chosen by
# Below this loss scale, non-finite fp16 gradients are not an overflow of the scaling but of the gradients.
MIN_LOSS_SCALE = 1.0


class NonFiniteLossError(LitQAError):
    """The loss or the gradient norm became NaN or infinite."""


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


class TrainingStopped(SystemExit):
    """Raised by `fit` after a SIGTERM or SIGINT, once the checkpoint is saved: the process exits with status
    0 after SIGTERM (a polite request, e.g. a scheduler's preemption) and 130 after SIGINT (Ctrl-C, so a
    ``train && evaluate`` chain stops). Scripts let it through, so they do not save ``final/``."""


def fit(
    fabric: L.Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: list[dict[str, Any]],
    val_data: list[dict[str, Any]],
    train_args: TrainArgs,
    eval_args: EvalArgs,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    tokenizer: Tokenizer,
    resume: bool | str | Path = False,
    seed: int = 42,
    val_questions: ValQuestions | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` with AdamW-style ``optimizer``, validating and checkpointing as it goes.

    Args:
        fabric: A launched Fabric.
        model: The model after ``fabric.setup_module``; its parameters with ``requires_grad`` are trained.
        optimizer: The optimizer after ``fabric.setup_optimizers``.
        train_data: Prepared samples (dicts with ``input_ids`` and ``labels``; -100 marks tokens without loss).
        val_data: Prepared validation samples.
        train_args: Batch sizes, schedule, clipping, intervals.
        eval_args: Validation settings.
        out_dir: Run folder; checkpoints go to ``out_dir/step-000200/`` and so on, the best one to ``out_dir/best/``.
        save_fn: Writes what the method trains (e.g. the LoRA weights and their config) into a folder.
            Called on every rank; it must write on rank 0 only.
        tokenizer: Decodes the sample generations printed at each validation.
        resume: False to start fresh; True or "auto" to continue from the latest checkpoint in ``out_dir``
            ("auto" starts fresh if there is none); a path to continue from that checkpoint folder.
        seed: Seed of the data order (the model's dropout uses the global torch RNG).
        val_questions: Questions answered by generation at each validation for EM/F1 (`load_val_questions`
            in ``lit_qa.launch``); None computes the validation loss only.

    Returns:
        The final progress counters (step, epoch, tokens seen, last validation metrics, the best step, ...).

    Raises:
        TrainingStopped: After a SIGTERM or SIGINT, once the current step is done and saved.
        NonFiniteLossError: On a NaN or infinite loss or gradient, with ``nan_policy="stop"``.
        LitQAError: On bad settings or data, or when a checkpoint cannot be written (e.g. a full disk).
    """
    world_size = fabric.world_size
    train_args.validate(world_size)
    eval_args.validate()
    if eval_args.f1_questions and val_questions is None:
        raise LitQAError("--eval.f1_questions needs the validation questions (lit_qa.launch.load_val_questions)")
    val_questions = val_questions if eval_args.f1_questions else None
    # Crop to the model's limit too, so padding lengths up to a multiple of pad_multiple never exceeds it.
    max_length = min(train_args.max_seq_length or math.inf, getattr(model, "module", model).max_seq_length)
    lengths = [len(sample["input_ids"]) for sample in train_data]
    loss_token_counts = [count_loss_tokens(sample, max_length) for sample in train_data]
    if empty := [i for i, count in enumerate(loss_token_counts) if count == 0]:
        sample = train_data[empty[0]]
        raise LitQAError(
            f"cropping samples to {max_length} tokens (--train.max_seq_length or the model's limit) leaves no answer "
            f"token in {len(empty)} of {len(train_data)} training samples (e.g. {sample.get('id', empty[0])}, "
            f"{len(sample['input_ids'])} tokens); raise it or prepare the data with a smaller --max_seq_length"
        )
    steps_per_epoch = len(lengths) // train_args.global_batch_size
    if steps_per_epoch == 0:
        raise LitQAError(
            f"{len(lengths)} training samples are fewer than one global batch ({train_args.global_batch_size})"
        )
    total_steps = train_args.total_steps(steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train_args, total_steps))
    trainable = trainable_parameter_names(model)
    na_head = getattr(model, "module", model).na_head
    na_weight = na_head.config.loss_weight if na_head is not None else 0.0
    if train_args.compile:
        compile_blocks(model)
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0, "val_loss": None, "val": None, "best": None}
    criterion = best_criterion(eval_args, val_questions)

    checkpoint = find_resume_checkpoint(out_dir, resume)
    if checkpoint is not None:
        load_training_state(fabric, checkpoint, model, optimizer, scheduler, progress, trainable)
        fabric.print(f"Resumed from {checkpoint} at step {progress['step']}")
        if progress["best"] is not None and progress["best"].get("criterion") != criterion:
            fabric.print(f"{out_dir / BEST_DIR} was chosen by {progress['best'].get('criterion')}, now by "
                         f"{criterion}: the best step is chosen anew")  # fmt: skip
            progress["best"] = None
    else:
        remove_stale_best(fabric, out_dir)
        # Fail fast: a short validation exercises the model and the data before any training time is spent.
        if eval_args.initial_validation:
            run_validation(fabric, model, val_data, val_questions, tokenizer, train_args, eval_args, progress)
        else:
            with rng_kept(fabric.device):
                validate(fabric, model, val_data, train_args.micro_batch_size, 2, train_args.pad_multiple)
                if val_questions is not None:
                    first_two = replace(val_questions, questions=val_questions.questions[:2])
                    generation_metrics(fabric, model, tokenizer, first_two, eval_args)
    # load_model returns an eval-mode model: without this a resumed run (which skips the check above) would
    # train without dropout, and diverge from the run it continues.
    model.train()

    progress_bar = tqdm(
        total=total_steps, initial=progress["step"], desc="training", unit="step", disable=fabric.global_rank != 0
    )
    window_start, window_tokens = time.perf_counter(), 0
    deadline = time.monotonic() + 60 * train_args.max_time_minutes if train_args.max_time_minutes else math.inf
    step_batches = []
    pad_id = tokenizer_pad_id(tokenizer)
    stop = None
    with signals_caught() as signals:
        while progress["step"] < total_steps:
            if not step_batches:
                step_batches = rank_batches_of_epoch(
                    lengths, loss_token_counts, train_args, progress["epoch"], seed, world_size, fabric.global_rank
                )[progress["step_in_epoch"] :]
                if not step_batches:
                    progress["epoch"], progress["step_in_epoch"] = progress["epoch"] + 1, 0
                    continue
            micro_batches, loss_tokens = step_batches.pop(0)
            step_loss = torch.zeros((), device=fabric.device)
            step_na_loss = torch.zeros((), device=fabric.device)
            for i, indices in enumerate(micro_batches):
                samples = [train_data[j] for j in indices]
                batch = collate(samples, pad_id, max_length, train_args.pad_multiple)
                batch = {key: value.to(fabric.device) for key, value in batch.items()}
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    # Sum of token losses / tokens of the global batch, times world_size because DDP averages ranks;
                    # the no-answer head's term is a mean over the global batch's samples, weighted.
                    token_sum, na_logits = loss_sums(model, batch, train_args.loss_positions_only)
                    loss = token_sum * world_size / loss_tokens
                    if na_logits is not None:
                        na_loss = na_loss_sum(na_logits, batch["unanswerable"]) * world_size
                        na_loss = na_loss / train_args.global_batch_size
                        loss = loss + na_weight * na_loss
                        step_na_loss += na_loss.detach()
                    fabric.backward(loss)
                step_loss += loss.detach()
                window_tokens += int(batch["input_ids"].numel())
            # Unscales fp16 gradients first (--precision 16-mixed), so the norm is that of the true gradients.
            grad_norm = fabric.clip_gradients(
                model, optimizer, max_norm=train_args.max_grad_norm or float("inf"), error_if_nonfinite=False
            )
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            step_loss = fabric.all_reduce(step_loss, reduce_op="mean")
            optimizer_step(fabric, optimizer, train_args, progress, out_dir, step_loss, grad_norm)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress["step"] += 1
            progress["step_in_epoch"] += 1
            step = progress["step"]
            progress_bar.update(1)

            if step % train_args.log_interval == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": float(step_loss),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/tokens_per_sec": window_tokens * world_size / elapsed,
                    "train/epoch": progress["epoch"] + progress["step_in_epoch"] / steps_per_epoch,
                    "train/memory_gb": peak_memory_gb(fabric.device),
                }
                if na_head is not None:  # the head's mean cross-entropy per sample (0.693 = knows nothing)
                    metrics["train/na_loss"] = float(fabric.all_reduce(step_na_loss, reduce_op="mean"))
                if (scaler := loss_scaler(fabric)) is not None:
                    metrics["train/loss_scale"] = scaler.get_scale()
                fabric.log_dict(metrics, step=step)
                progress_bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                         tok_s=f"{metrics['train/tokens_per_sec']:.0f}")  # fmt: skip
                progress["tokens"] += window_tokens * world_size
                window_start, window_tokens = time.perf_counter(), 0

            stop = stop_reason(fabric, signals, deadline)
            if stop == "time":
                minutes = train_args.max_time_minutes
                fabric.print(f"\nTime budget of {minutes} minutes reached at step {step}/{total_steps}")
            # Validate before saving, so the checkpoint records this step's validation and the best step so far;
            # best/ is written before that checkpoint, so no resumed run counts on a best/ that is not on disk.
            # After a signal the user is waiting for the process to end: no validation then.
            if (step % eval_args.interval == 0 or step == total_steps or stop == "time") and stop in (None, "time"):
                run_validation(fabric, model, val_data, val_questions, tokenizer, train_args, eval_args, progress)
                if update_best(progress, eval_args.tracked_metric(), criterion):
                    save_best(fabric, out_dir, save_fn, progress["best"], val_questions)
                    fabric.print(f"step {step} is the best so far by {criterion}: saved {out_dir / BEST_DIR}")
            if step % train_args.save_interval == 0 or step == total_steps or stop:
                save_training_checkpoint(fabric, out_dir / f"step-{step:06d}", model, optimizer, scheduler, progress,
                                         trainable, save_fn)  # fmt: skip
            if stop:
                break
    progress_bar.close()
    for logger in fabric.loggers:
        logger.finalize("success")
    if stop in ("SIGTERM", "SIGINT"):
        saved = out_dir / f"step-{progress['step']:06d}"
        fabric.print(f"\nstopped by {stop} at step {progress['step']}/{total_steps}; saved {saved}; "
                     "continue with --resume auto")  # fmt: skip
        raise TrainingStopped(0 if stop == "SIGTERM" else 128 + signal.SIGINT)
    return progress


def print_best(fabric: L.Fabric, progress: dict[str, Any], out_dir: Path) -> None:
    """Say where the best checkpoint is (the scripts call this at the end), if one was selected."""
    best = progress.get("best")
    if best:
        fabric.print(f"Best checkpoint (step {best['step']}, by {best['criterion']}: {format_val(best['val'])}): "
                     f"{out_dir / BEST_DIR}")  # fmt: skip


@contextmanager
def signals_caught(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Record SIGTERM and SIGINT in the yielded list instead of dying, so the loop can save and stop.

    A second signal goes to the previous handler (by default: stop at once, which checkpoints survive since
    they are renamed into place only when complete). The previous handlers come back on exit. Nothing
    changes off the main thread (only it may set handlers) or for a signal ignored from the start (nohup).
    """
    received: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signums} if in_main_thread else {}
    previous = {s: handler for s, handler in previous.items() if handler not in (None, signal.SIG_IGN)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def record(signum: int, frame: Any) -> None:
        if received:  # the user insists
            restore()
            signal.raise_signal(signum)
        else:
            received.append(signum)

    for s in previous:
        signal.signal(s, record)
    try:
        yield received
    finally:
        restore()


def stop_reason(fabric: L.Fabric, signals: list[int], deadline: float) -> str | None:
    """Why to stop after this step, the same on every rank: "SIGTERM" or "SIGINT" if any rank received it,
    "time" once rank 0's clock passes ``deadline``, else None."""
    signum = signals[0] if signals else 0
    out_of_time = fabric.global_rank == 0 and time.monotonic() > deadline
    if fabric.world_size > 1:  # one tiny collective per step
        flags = fabric.all_reduce(torch.tensor([signum, int(out_of_time)], device=fabric.device), reduce_op="max")
        signum, out_of_time = int(flags[0]), bool(flags[1])
    if signum:
        return signal.Signals(signum).name
    return "time" if out_of_time else None


def lr_factor(step: int, train_args: TrainArgs, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then constant or cosine decay."""
    if step < train_args.warmup_steps:
        return (step + 1) / (train_args.warmup_steps + 1)
    if train_args.lr_schedule == "constant":
        return 1.0
    progress = (step - train_args.warmup_steps) / max(1, total_steps - train_args.warmup_steps)
    min_factor = train_args.min_lr / train_args.learning_rate
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_global_batches(lengths: list[int], global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches (lists of sample indices) of one epoch: a pure function of its arguments.

    A step's samples depend only on the seed, the epoch and the global batch size, never on the micro-batch
    size or the number of devices, so changing either leaves the optimisation unchanged. A last partial
    batch is dropped.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    return [order[start : start + global_batch_size] for start in range(0, len(order) - global_batch_size + 1,
                                                                         global_batch_size)]  # fmt: skip


def split_global_batch(
    indices: list[int], lengths: list[int], micro_batch_size: int, group_by_length: bool
) -> list[list[int]]:
    """Cut one global batch into micro-batches; with ``group_by_length`` similar lengths share a micro-batch,
    so little padding is computed."""
    if group_by_length:
        indices = sorted(indices, key=lambda i: -lengths[i])
    return [indices[start : start + micro_batch_size] for start in range(0, len(indices), micro_batch_size)]


def rank_batches_of_epoch(
    lengths: list[int],
    loss_token_counts: list[int],
    train_args: TrainArgs,
    epoch: int,
    seed: int,
    world_size: int,
    rank: int,
) -> list[tuple[list[list[int]], int]]:
    """For each optimizer step of the epoch: this rank's micro-batches and the global batch's loss-token count.

    Every rank computes the same epoch order, takes every world_size-th micro-batch of each step (so long
    and short ones spread evenly over ranks), and knows the loss-token count of the whole global batch
    without communicating.
    """
    steps = []
    for indices in epoch_global_batches(lengths, train_args.global_batch_size, seed, epoch):
        micro_batches = split_global_batch(indices, lengths, train_args.micro_batch_size, train_args.group_by_length)
        steps.append((micro_batches[rank::world_size], sum(loss_token_counts[i] for i in indices)))
    return steps


def count_loss_tokens(sample: dict[str, Any], max_seq_length: int | None = None) -> int:
    """Positions of ``sample`` that carry loss: those whose next token has a label (after cropping)."""
    return int((sample["labels"][1:max_seq_length] != -100).sum())


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_positions_only: bool = True
) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not -100.

    With ``loss_positions_only`` only those positions go through the output head: for question answering the
    answer is a few tokens of a few hundred, and the vocabulary projection is a large share of a small
    model's FLOPs. Without it, logits are computed at every position first (the usual, slower way; the
    result is the same, which a test checks).
    """
    return _token_loss_sum(model, batch, loss_positions_only)[0]


def loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_positions_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed answer-token loss (`token_loss_sum`) and, when the model has a no-answer head and the batch its
    labels (``unanswerable``), the head's (B,) logits at each row's last prompt token; both from one forward pass.
    Without a head the second is None."""
    if getattr(getattr(model, "module", model), "na_head", None) is None or "unanswerable" not in batch:
        return token_loss_sum(model, batch, loss_positions_only), None
    return _token_loss_sum(model, batch, loss_positions_only, last_prompt_positions(batch["labels"]))


def _token_loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loss_positions_only: bool,
    na_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_loss_sum`, and with ``na_positions`` the no-answer head's logits from the same forward pass."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    targets = labels[:, 1:]  # the token each position predicts
    output_mask = None
    if loss_positions_only:
        output_mask = torch.zeros_like(labels, dtype=torch.bool)
        output_mask[:, :-1] = targets != -100
    out = model(input_ids, output_mask=output_mask, na_positions=na_positions)
    logits, na_logits = out if na_positions is not None else (out, None)
    if not loss_positions_only:
        logits = logits[:, :-1]  # (B, T-1, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum"), na_logits  # fmt: skip
    return F.cross_entropy(logits.float(), targets[targets != -100], reduction="sum"), na_logits  # (N, vocab) logits


def setup_model(fabric: L.Fabric, model: torch.nn.Module, train_args: TrainArgs) -> torch.nn.Module:
    """Hand a model whose trainable parameters are marked to Fabric: activation checkpointing first (it must
    wrap the blocks before FSDP shards them), then the strategy's wrapping (DDP / FSDP2 / none)."""
    if train_args.activation_checkpointing:
        checkpoint_blocks(model)
    return fabric.setup_module(model)


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of storing them.

    The composable ``checkpoint`` keeps parameter names unchanged (``checkpoint_wrapper`` inserts
    ``_checkpoint_wrapped_module`` into every key, which breaks loading full state dicts).
    """
    from torch.distributed._composable import checkpoint

    for block in getattr(model, "module", model).transformer.h:
        checkpoint(block)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (the loop, the head and the loss stay eager).

    Per block rather than the whole model: one block's graph is compiled once and reused by every layer,
    so the cold start is ~15 s instead of over a minute, and the fused element-wise kernels (norms, RoPE,
    SwiGLU, dropout) save both time and activation memory (measured in benchmarks/train.py).
    """
    for block in getattr(model, "module", model).transformer.h:
        block.compile()


def validate(
    fabric: L.Fabric,
    model: torch.nn.Module,
    val_data: list[dict[str, Any]],
    micro_batch_size: int,
    max_batches: int,
    pad_multiple: int = 64,
) -> float:
    """Mean token loss over the first ``max_batches`` validation micro-batches (the same every time)."""
    return validation_metrics(fabric, model, val_data, micro_batch_size, max_batches, pad_multiple)["loss"]


@torch.no_grad()
def validation_metrics(
    fabric: L.Fabric,
    model: torch.nn.Module,
    val_data: list[dict[str, Any]],
    micro_batch_size: int,
    max_batches: int,
    pad_multiple: int = 64,
) -> dict[str, float]:
    """Mean token loss (``loss``) over the first ``max_batches`` validation micro-batches (the same every time);
    with a no-answer head also its mean cross-entropy (``na_loss``) and accuracy at p_na = 0.5 (``na_acc``)."""
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
        batch = collate(val_data[start : start + micro_batch_size], 0, max_length, pad_multiple)
        batch = {key: value.to(fabric.device) for key, value in batch.items()}
        loss_sum, na_logits = loss_sums(model, batch)
        if i < len(own):
            total += loss_sum
            tokens += (batch["labels"][:, 1:] != -100).sum()
            if na_logits is not None:
                labels = batch["unanswerable"]
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
    progress: dict[str, Any],
) -> dict[str, float]:
    """Validate at the current step: the loss, and with ``val_questions`` generation EM/F1; logged as
    ``val/*``, printed, followed by the sample generations, and stored in ``progress``.

    The global RNG is left as it was (`rng_kept`): validation only observes the run.
    """
    with rng_kept(fabric.device):
        metrics = validation_metrics(fabric, model, val_data, train_args.micro_batch_size, eval_args.max_batches,
                                     train_args.pad_multiple)  # fmt: skip
        if val_questions is not None:
            metrics.update(generation_metrics(fabric, model, tokenizer, val_questions, eval_args))
        numbers = {f"val/{name}": value for name, value in metrics.items() if isinstance(value, (int, float))}
        fabric.log_dict(numbers, step=progress["step"])
        fabric.print(f"\nstep {progress['step']}: {format_val(metrics)}")
        print_sample_generations(fabric, model, val_data, tokenizer, eval_args)
    progress["val_loss"], progress["val"] = metrics["loss"], metrics
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

    One decoding pass, as `lit_qa.evaluation.score_questions` does for the evaluate scripts: extractive greedy
    decoding of the best span plus the no-answer string's score, then every threshold is scored from it
    (`lit_qa.evaluation.best_na_threshold`). Tuned and scored on the same questions, F1 is optimistic; it
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
            scored = score_questions(model=module, tokenizer=tokenizer, questions=questions,
                                     prompt_style=val_questions.prompt_style, no_answer=val_questions.no_answer,
                                     batch_size=eval_args.f1_batch_size, max_new_tokens=eval_args.max_new_tokens,
                                     progress=False, na_threshold=1.0, extractive=True)  # fmt: skip
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


def best_criterion(eval_args: EvalArgs, val_questions: ValQuestions | None) -> str | None:
    """What ``best/`` is chosen by, e.g. "val f1 on 200 questions"; None when no ``best/`` is kept.

    A resumed run whose criterion differs (another metric or question count) chooses the best step anew.
    """
    metric = eval_args.tracked_metric()
    if metric == "f1" and val_questions is not None:  # the threshold is tuned on the same questions
        return f"val f1 at the tuned no-answer threshold on {len(val_questions.questions)} questions"
    if metric == "loss":
        return f"val loss on {eval_args.max_batches} batches"
    return None


def update_best(progress: dict[str, Any], metric: str | None, criterion: str | None) -> bool:
    """Record the current step as the best if its validation ``metric`` ("f1": higher is better, "loss":
    lower) beats the best so far, strictly (a tie keeps the earlier step); return whether it did."""
    if metric is None or criterion is None:
        return False
    value, best = progress["val"][metric], progress["best"]
    if best is not None and not (value > best["value"] if metric == "f1" else value < best["value"]):
        return False
    progress["best"] = {"step": progress["step"], "criterion": criterion, "metric": metric, "value": value,
                        "val": progress["val"]}  # fmt: skip
    return True


def save_best(
    fabric: L.Fabric,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    best: dict[str, Any],
    val_questions: ValQuestions | None = None,
) -> None:
    """Write what ``save_fn`` writes, plus ``best.json`` (the step, the criterion and its validation metrics) and,
    when that validation tuned one, the no-answer threshold (`save_na_threshold`), into ``out_dir/best/``,
    atomically like a step checkpoint, replacing the previous best."""

    def write(folder: Path) -> None:
        save_fn(folder)
        if fabric.global_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / BEST_FILE).write_text(json.dumps(best, indent=2) + "\n")
        save_na_threshold(fabric, folder, best, val_questions)

    write_folder(fabric, out_dir / BEST_DIR, write)


def save_final(
    fabric: L.Fabric,
    out_dir: Path,
    save_fn: Callable[[Path], None],
    progress: dict[str, Any],
    val_questions: ValQuestions | None,
    what: str,
) -> None:
    """After `fit`: write the trained weights to ``out_dir/final`` (with the last validation's no-answer
    threshold), and say where they and the best step's ``best/`` are. ``what`` names them, e.g. "LoRA adapter"."""
    save_fn(out_dir / "final")
    save_na_threshold(fabric, out_dir / "final", progress, val_questions)
    fabric.barrier()
    fabric.print(f"Saved the {what} to {out_dir / 'final'}")
    print_best(fabric, progress, out_dir)


def save_na_threshold(
    fabric: L.Fabric, folder: Path, validated: dict[str, Any], val_questions: ValQuestions | None
) -> None:
    """Write ``na_threshold.json`` into ``folder`` (rank 0), next to the weights, for ``evaluate/*.py --na_threshold
    auto``: the threshold tuned at the validation in ``validated`` (``progress`` or ``progress["best"]``: its
    ``step`` and ``val`` metrics). Nothing is written when that validation tuned none (no ``--eval.f1_questions``).
    """
    val = validated.get("val") or {}
    if fabric.global_rank != 0 or val_questions is None or "na_threshold" not in val:
        return
    record = {"threshold": val["na_threshold"], "tuned_on": f"{len(val_questions.questions)} validation questions "
              f"of {val_questions.source}", "val_f1": val["f1"], "extractive": True, "method": NA_METHODS[val.get("na_source", "span")],
              "source": val.get("na_source", "span"),
              "step": validated["step"], "prompt_style": val_questions.prompt_style,
              "no_answer": val_questions.no_answer}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / NA_THRESHOLD_FILE, record)


def remove_stale_best(fabric: L.Fabric, out_dir: Path) -> None:
    """A fresh start's history begins now: a ``best/`` left in ``out_dir`` (e.g. by a run killed before its
    first step checkpoint) belongs to another run."""
    if fabric.global_rank == 0:
        if (out_dir / BEST_DIR).exists():
            fabric.print(f"Removing {out_dir / BEST_DIR}: it is not from this run")
        for stale in out_dir.glob(f"{BEST_DIR}*"):
            if stale.name == BEST_DIR or stale.name.startswith((f"{BEST_DIR}.tmp", f"{BEST_DIR}.old")):
                shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()


def tokenizer_pad_id(tokenizer: Tokenizer) -> int:
    """Padding never reaches the loss (labels are -100 there), so any valid id works; prefer EOS."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def trainable_parameter_names(model: torch.nn.Module) -> set[str]:
    module = getattr(model, "module", model)
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def handle_non_finite(
    fabric: L.Fabric, train_args: TrainArgs, progress: dict[str, Any], out_dir: Path, loss: float, grad_norm: float
) -> None:
    """Stop with a clear message (the last good checkpoint stays) or skip the step, per ``nan_policy``."""
    what = f"loss {loss} / gradient norm {grad_norm} at step {progress['step'] + 1}"
    if train_args.nan_policy == "skip":
        fabric.print(f"\nwarning: non-finite {what}; skipping this optimizer step")
        return
    latest = latest_checkpoint(out_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
    raise NonFiniteLossError(f"non-finite {what}; stopping ({kept}; lower the learning rate or use --train.nan_policy skip)")


def loss_scaler(fabric: L.Fabric) -> torch.amp.GradScaler | None:
    """The GradScaler of ``--precision 16-mixed`` (fp16 gradients underflow without loss scaling), else None."""
    return getattr(fabric.strategy.precision, "scaler", None)


def optimizer_step(
    fabric: L.Fabric,
    optimizer: torch.optim.Optimizer,
    train_args: TrainArgs,
    progress: dict[str, Any],
    out_dir: Path,
    step_loss: torch.Tensor,
    grad_norm: torch.Tensor,
) -> None:
    """Take the optimizer step, unless the loss or the gradients are non-finite: then ``nan_policy`` decides.

    Under fp16 loss scaling, non-finite gradients at a finite loss are normally an overflow of the *scaled*
    gradients, which is the scaler's business: ``optimizer.step()`` goes through it, and it skips the update
    and halves the scale. Only once the scale is below `MIN_LOSS_SCALE` do they count as non-finite. A
    non-finite loss always does (the loss is computed before scaling).
    """
    scaler = loss_scaler(fabric)
    # One device-to-host sync per optimizer step, which also feeds the log.
    loss_finite = bool(torch.isfinite(step_loss))
    grads_finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
    overflow = loss_finite and not grads_finite and scaler is not None and scaler.get_scale() >= MIN_LOSS_SCALE
    if loss_finite and (grads_finite or overflow):
        optimizer.step()
        return
    handle_non_finite(fabric, train_args, progress, out_dir, float(step_loss), float(grad_norm))
    if scaler is not None:
        # Skipped without optimizer.step(): end the scaler's step (it unscaled these gradients) ourselves,
        # or the next step's unscaling fails.
        scaler.update()


def rng_states(fabric: L.Fabric) -> dict[str, Any]:
    """The global RNG states a checkpoint records: this process's CPU and CUDA ones and, with several processes,
    every rank's (``rank_rng``, row r = rank r's CPU state followed by its CUDA state if any): ranks start with
    the same seed, but each one's dropout draws as many numbers as its own micro-batches' shapes need."""
    states = {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if fabric.world_size > 1:  # a collective: every rank calls this
        own = torch.get_rng_state()
        if fabric.device.type == "cuda":
            own = torch.cat([own, torch.cuda.get_rng_state(fabric.device)])
        states["rank_rng"] = fabric.all_gather(own.to(fabric.device)).cpu()
    return states


def restore_rng_states(fabric: L.Fabric, states: dict[str, Any]) -> None:
    """Set this rank's global RNG from what `rng_states` saved; on another number of ranks every rank gets rank
    0's state (the run continues deterministically, though not as the saved one would have)."""
    rank_rng = states.get("rank_rng")
    if isinstance(rank_rng, torch.Tensor) and rank_rng.shape[0] == fabric.world_size:
        own, cpu_size = rank_rng[fabric.global_rank], torch.get_rng_state().numel()
        torch.set_rng_state(own[:cpu_size].clone())
        if fabric.device.type == "cuda" and own.numel() > cpu_size:
            torch.cuda.set_rng_state(own[cpu_size:].clone(), fabric.device)
        return
    torch.set_rng_state(states["rng"])
    if states.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng"])


def save_training_checkpoint(
    fabric: L.Fabric,
    step_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    trainable: set[str],
    save_fn: Callable[[Path], None],
) -> None:
    """Write the method's weights and the resume state into ``step_dir`` atomically (see `write_folder`).

    The resume state: the trained parameters, the optimizer, the scheduler, the progress counters, the RNG
    states and the precision plugin's state (the fp16 loss scale; ``fabric.save`` does not save it).
    """
    counters = {"progress": dict(progress), **rng_states(fabric), "precision": fabric.strategy.precision.state_dict()}
    module = getattr(model, "module", model)

    def write(folder: Path) -> None:
        save_fn(folder)
        if fabric.global_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        if is_sharded(module):
            # FSDP: every rank writes its own shard; nothing is gathered on one rank.
            save_sharded_state(folder, module, getattr(optimizer, "optimizer", optimizer),
                               {**counters, "scheduler": scheduler.state_dict()}, fabric.global_rank)  # fmt: skip
        else:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **counters}
            # Only what is trained: the frozen base model is already on disk in its checkpoint folder.
            fabric.save(folder / STATE_FILE, state, filter={"model": lambda key, _: key in trainable})

    write_folder(fabric, step_dir, write)


def write_folder(fabric: L.Fabric, folder: Path, write: Callable[[Path], None]) -> None:
    """Fill ``folder`` atomically: ``write`` (called on every rank) fills a temporary sibling, which is renamed to
    ``folder`` only when complete, so a run killed while saving never leaves a half-written ``folder``.

    Raises:
        LitQAError: If writing fails (disk full, quota, permissions); the previous ``folder`` is untouched.
    """
    tmp_dir = folder.with_name(folder.name + ".tmp")
    if fabric.global_rank == 0:
        # Left by a run killed while saving this folder (save_fn may have its own ".tmp-<pid>" folder inside).
        for stale in folder.parent.glob(f"{folder.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    try:
        write(tmp_dir)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp_dir, ignore_errors=True)
        latest = latest_checkpoint(folder.parent)
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise LitQAError(f"cannot write checkpoint {folder}: {reason}; the last complete checkpoint is "
                         f"{latest or 'none'} (free space, then continue with --resume auto)") from None  # fmt: skip
    fabric.barrier()
    if fabric.global_rank == 0:
        move_into_place(tmp_dir, folder)
    fabric.barrier()


def move_into_place(tmp_dir: Path, folder: Path) -> None:
    """Rename ``tmp_dir`` to ``folder``. An existing ``folder`` is renamed aside first and deleted afterwards:
    deleting a big folder (a full model in ``best/``) takes a while, two renames do not."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp_dir, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    fabric: L.Fabric,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    trainable: set[str],
) -> None:
    """Restore model (trained part), optimizer, scheduler, progress counters, RNG and loss scale from ``checkpoint``."""
    path = checkpoint / STATE_FILE
    module = getattr(model, "module", model)
    if is_sharded(module):
        if path.is_file():
            raise LitQAError(f"{checkpoint} was saved without FSDP; resume it with the strategy it was trained with")
        rest = load_sharded_state(checkpoint, module, getattr(optimizer, "optimizer", optimizer))
        scheduler.load_state_dict(rest["scheduler"])
    else:
        if not path.is_file():
            hint = " (it is an FSDP checkpoint: resume with --strategy fsdp)" if (checkpoint / SHARDED_STATE_DIR).is_dir() else ""
            raise LitQAError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing{hint}")
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        try:
            rest = fabric.load(path, state, strict=False, weights_only=True)
        except (RuntimeError, OSError, EOFError) as e:
            raise LitQAError(f"{path}: cannot load the training state ({str(e).splitlines()[0]})") from None
    if not isinstance(rest.get("progress"), dict) or not isinstance(rest.get("rng"), torch.Tensor):
        raise LitQAError(f"{path}: not a lit-qa training state (no progress counters or RNG state)")
    progress.update(rest["progress"])
    restore_rng_states(fabric, rest)
    if rest.get("precision"):  # the loss scale of a 16-mixed run; a scaler starting over would overflow again
        fabric.strategy.precision.load_state_dict(rest["precision"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete ``step-*`` folder with the highest step in ``out_dir`` (temporary folders are ignored)."""
    steps = [(int(m.group(1)), p) for p in Path(out_dir).glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def find_resume_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """Resolve ``--resume`` to a checkpoint folder, or None for a fresh start."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        latest = latest_checkpoint(out_dir)
        if latest is None and resume is True:
            raise LitQAError(f"--resume: no checkpoint (step-* folder) in {out_dir}")
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file() and not (path / SHARDED_STATE_DIR).is_dir():
        raise LitQAError(f"--resume {path}: not a training checkpoint folder ({STATE_FILE} or {SHARDED_STATE_DIR}/ missing)")
    return path


def save_hyperparameters(out_dir: Path, **sections: Any) -> None:
    """Write every setting of the run to ``out_dir/hyperparameters.yaml`` (dataclasses become mappings)."""
    import yaml

    values = {key: asdict(value) if hasattr(value, "__dataclass_fields__") else value for key, value in sections.items()}
    values = {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hyperparameters.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
