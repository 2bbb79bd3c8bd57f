# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The learning-rate schedule and the optimizer step, guarded against non-finite losses and gradients
(``--train.nan_policy``) and aware of fp16 loss scaling.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from lit_qa.errors import LitQAError
from lit_qa.training.args import TrainArgs
from lit_qa.training.progress import Progress
from lit_qa.training.resume import latest_checkpoint

# Below this loss scale, non-finite fp16 gradients are not an overflow of the scaling but of the gradients.
MIN_LOSS_SCALE = 1.0


class NonFiniteLossError(LitQAError):
    """The loss or the gradient norm became NaN or infinite."""


def lr_factor(step: int, train_args: TrainArgs, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then constant or cosine decay."""
    if step < train_args.warmup_steps:
        return (step + 1) / (train_args.warmup_steps + 1)
    if train_args.lr_schedule == "constant":
        return 1.0
    progress = (step - train_args.warmup_steps) / max(1, total_steps - train_args.warmup_steps)
    min_factor = train_args.min_lr / train_args.learning_rate
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def handle_non_finite(
    fabric: L.Fabric, train_args: TrainArgs, progress: Progress, out_dir: Path, loss: float, grad_norm: float
) -> None:
    """Stop with a clear message (the last good checkpoint stays) or skip the step, per ``nan_policy``."""
    what = f"loss {loss} / gradient norm {grad_norm} at step {progress.step + 1}"
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
    progress: Progress,
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
