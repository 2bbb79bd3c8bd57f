# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The one training loop every fine-tuning script uses: plain functions, no Trainer class, no callbacks.

The scripts in ``finetune/`` differ only in what they make trainable and what they save; all of them call
`fit`. To customise the loop, copy `fit` into your script and change it there.

Determinism and exact resume: the order of micro-batches is a pure function of (seed, epoch), and a
checkpoint records the optimizer, the scheduler, the position in that order and the RNG state. A run
stopped after step k and resumed ends with exactly the weights of a run that never stopped.

SIGTERM or SIGINT (Ctrl-C) stops the run cleanly: the current optimizer step finishes, a checkpoint is
saved and the process exits (status 0 after SIGTERM, 130 after SIGINT) with a line saying how to resume.
A second signal stops at once; checkpoints are written atomically, so that never leaves a broken one.

Gradient accumulation is exact too: each micro-batch's summed token loss is divided by the number of
loss tokens in the whole global batch (known in advance, since every rank computes the same order), so
k accumulated micro-batches give the gradient of one batch k times bigger.
"""

from __future__ import annotations

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
from dataclasses import asdict
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
from lit_qa.generate import generate
from lit_qa.tokenizer import Tokenizer

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class NonFiniteLossError(LitQAError):
    """The loss or the gradient norm became NaN or infinite."""


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
        out_dir: Run folder; checkpoints go to ``out_dir/step-000200/`` and so on.
        save_fn: Writes what the method trains (e.g. the LoRA weights and their config) into a folder.
            Called on every rank; it must write on rank 0 only.
        tokenizer: Decodes the sample generations printed at each validation.
        resume: False to start fresh; True or "auto" to continue from the latest checkpoint in ``out_dir``
            ("auto" starts fresh if there is none); a path to continue from that checkpoint folder.
        seed: Seed of the data order (the model's dropout uses the global torch RNG).

    Returns:
        The final progress counters (step, epoch, tokens seen, last validation loss, ...).

    Raises:
        TrainingStopped: After a SIGTERM or SIGINT, once the current step is done and saved.
        NonFiniteLossError: On a NaN or infinite loss or gradient, with ``nan_policy="stop"``.
        LitQAError: On bad settings or data, or when a checkpoint cannot be written (e.g. a full disk).
    """
    world_size = fabric.world_size
    train_args.validate(world_size)
    eval_args.validate()
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
    if train_args.compile:
        compile_blocks(model)
    progress = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0, "val_loss": None}

    checkpoint = find_resume_checkpoint(out_dir, resume)
    if checkpoint is not None:
        load_training_state(fabric, checkpoint, model, optimizer, scheduler, progress, trainable)
        fabric.print(f"Resumed from {checkpoint} at step {progress['step']}")
    else:
        # Fail fast: a short validation exercises the model and the data before any training time is spent.
        batches = eval_args.max_batches if eval_args.initial_validation else 2
        val_loss = validate(fabric, model, val_data, train_args.micro_batch_size, batches, train_args.pad_multiple)
        if eval_args.initial_validation:
            progress["val_loss"] = val_loss
            fabric.print(f"step 0: val loss {val_loss:.4f}")

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
            for i, indices in enumerate(micro_batches):
                samples = [train_data[j] for j in indices]
                batch = collate(samples, pad_id, max_length, train_args.pad_multiple)
                batch = {key: value.to(fabric.device) for key, value in batch.items()}
                with fabric.no_backward_sync(model, enabled=i < len(micro_batches) - 1):
                    # Sum of token losses / tokens of the global batch, times world_size because DDP averages ranks.
                    loss = token_loss_sum(model, batch, train_args.loss_positions_only) * world_size / loss_tokens
                    fabric.backward(loss)
                step_loss += loss.detach()
                window_tokens += int(batch["input_ids"].numel())
            grad_norm = fabric.clip_gradients(
                model, optimizer, max_norm=train_args.max_grad_norm or float("inf"), error_if_nonfinite=False
            )
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            step_loss = fabric.all_reduce(step_loss, reduce_op="mean")
            # One device-to-host sync per optimizer step, which also feeds the log below.
            if bool(torch.isfinite(step_loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm))):
                optimizer.step()
            else:
                handle_non_finite(fabric, train_args, progress, out_dir, float(step_loss), float(grad_norm))
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
                fabric.log_dict(metrics, step=step)
                progress_bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                         tok_s=f"{metrics['train/tokens_per_sec']:.0f}")  # fmt: skip
                progress["tokens"] += window_tokens * world_size
                window_start, window_tokens = time.perf_counter(), 0

            stop = stop_reason(fabric, signals, deadline)
            if stop == "time":
                minutes = train_args.max_time_minutes
                fabric.print(f"\nTime budget of {minutes} minutes reached at step {step}/{total_steps}")
            # Save first: whatever validation does, this step's work is on disk.
            if step % train_args.save_interval == 0 or step == total_steps or stop:
                save_training_checkpoint(fabric, out_dir / f"step-{step:06d}", model, optimizer, scheduler, progress,
                                         trainable, save_fn)  # fmt: skip
            # After a signal the user is waiting for the process to end: no validation then.
            if (step % eval_args.interval == 0 or step == total_steps or stop == "time") and stop in (None, "time"):
                progress["val_loss"] = validate(
                    fabric, model, val_data, train_args.micro_batch_size, eval_args.max_batches, train_args.pad_multiple
                )
                fabric.log_dict({"val/loss": progress["val_loss"]}, step=step)
                fabric.print(f"\nstep {step}: val loss {progress['val_loss']:.4f}")
                print_sample_generations(fabric, model, val_data, tokenizer, eval_args)
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
    input_ids, labels = batch["input_ids"], batch["labels"]
    targets = labels[:, 1:]  # the token each position predicts
    if not loss_positions_only:
        logits = model(input_ids)[:, :-1]  # (B, T-1, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    output_mask = torch.zeros_like(labels, dtype=torch.bool)
    output_mask[:, :-1] = targets != -100
    logits = model(input_ids, output_mask=output_mask)  # (N, vocab)
    return F.cross_entropy(logits.float(), targets[targets != -100], reduction="sum")


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


@torch.no_grad()
def validate(
    fabric: L.Fabric,
    model: torch.nn.Module,
    val_data: list[dict[str, Any]],
    micro_batch_size: int,
    max_batches: int,
    pad_multiple: int = 64,
) -> float:
    """Mean token loss over the first ``max_batches`` validation micro-batches (the same every time)."""
    model.eval()
    total, tokens = torch.zeros((), device=fabric.device), torch.zeros((), device=fabric.device)
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
        loss_sum = token_loss_sum(model, batch)
        if i < len(own):
            total += loss_sum
            tokens += (batch["labels"][:, 1:] != -100).sum()
    model.train()
    total, tokens = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(tokens, reduce_op="sum")
    if tokens == 0:
        raise LitQAError("the validation split has no answer tokens to compute a loss on")
    return float(total / tokens)


def print_sample_generations(
    fabric: L.Fabric, model: torch.nn.Module, val_data: list[dict[str, Any]], tokenizer: Tokenizer, eval_args: EvalArgs
) -> None:
    """Greedy-decode a few validation prompts and print them next to their targets."""
    if eval_args.num_samples == 0 or not val_data:
        return
    module = getattr(model, "module", model)
    fits = [s for s in val_data if int((s["labels"] == -100).sum()) + eval_args.max_new_tokens <= module.max_seq_length]
    samples = fits[:: max(1, len(fits) // eval_args.num_samples)][: eval_args.num_samples]  # spread out
    module.eval()
    prompts = [sample["input_ids"][sample["labels"] == -100] for sample in samples]
    outputs = generate(module, prompts, eval_args.max_new_tokens, stop_ids=tokenizer.eos_ids)
    module.train()
    for sample, output in zip(samples, outputs):
        target = sample["labels"][sample["labels"] != -100]
        expected = tokenizer.decode(target[~torch.isin(target, torch.tensor(sorted(tokenizer.eos_ids)))])
        fabric.print(f"  [{sample.get('id', '?')}] generated {tokenizer.decode(output)!r}, expected {expected!r}")


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
    """Write the method's weights and the resume state into ``step_dir`` atomically.

    Everything goes to a temporary sibling folder first and is renamed when complete, so a run killed while
    saving never leaves a half-written ``step-*`` folder that resume would pick up.
    """
    tmp_dir = step_dir.with_name(step_dir.name + ".tmp")
    if fabric.global_rank == 0:
        # Left by a run killed while saving this step (save_fn may have its own ".tmp-<pid>" folder inside).
        for stale in step_dir.parent.glob(f"{step_dir.name}.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    try:
        save_fn(tmp_dir)
        if fabric.global_rank == 0:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        counters = {
            "progress": dict(progress),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        module = getattr(model, "module", model)
        if is_sharded(module):
            # FSDP: every rank writes its own shard; nothing is gathered on one rank.
            counters["scheduler"] = scheduler.state_dict()
            save_sharded_state(tmp_dir, module, getattr(optimizer, "optimizer", optimizer), counters,
                               fabric.global_rank)  # fmt: skip
        else:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **counters}
            # Only what is trained: the frozen base model is already on disk in its checkpoint folder.
            fabric.save(tmp_dir / STATE_FILE, state, filter={"model": lambda key, _: key in trainable})
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp_dir, ignore_errors=True)
        latest = latest_checkpoint(step_dir.parent)
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise LitQAError(f"cannot write checkpoint {step_dir}: {reason}; the last complete checkpoint is "
                         f"{latest or 'none'} (free space, then continue with --resume auto)") from None  # fmt: skip
    fabric.barrier()
    if fabric.global_rank == 0:
        if step_dir.exists():
            shutil.rmtree(step_dir)
        os.replace(tmp_dir, step_dir)
    fabric.barrier()


def load_training_state(
    fabric: L.Fabric,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    trainable: set[str],
) -> None:
    """Restore model (trained part), optimizer, scheduler, progress counters and RNG from ``checkpoint``."""
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
    torch.set_rng_state(rest["rng"])
    if rest.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rest["cuda_rng"])


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
