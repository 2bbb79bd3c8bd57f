# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Hyperparameters of the shared training loop, as dataclasses that jsonargparse turns into nested flags.

``--train.learning_rate 3e-4 --eval.interval 50`` on the command line, or a ``train:`` / ``eval:``
section in a ``--config run.yaml`` file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lit_qa.errors import LitQAError


@dataclass
class TrainArgs:
    """How to train.

    Attributes:
        global_batch_size: Samples (questions) per optimizer step, summed over every device and accumulation step.
        micro_batch_size: Samples per forward/backward pass on one device (packed, in fewer and longer rows).
        epochs: Passes over the training data; ignored when ``max_steps`` is set.
        max_steps: Optimizer steps to run (overrides ``epochs``).
        learning_rate: Peak learning rate of AdamW.
        min_lr: Learning rate at the end of the cosine schedule.
        lr_schedule: "cosine" (decay to ``min_lr`` after warm-up) or "constant" (after warm-up).
        warmup_steps: Optimizer steps of linear warm-up from 0 to ``learning_rate``.
        weight_decay: AdamW weight decay.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        max_grad_norm: Clip the gradient norm to this value; 0 disables clipping.
        group_by_length: Put samples of similar length in the same micro-batch, which cuts padding (unpacked only).
        pack: Pack the questions of one paragraph in a micro-batch into one sequence, their shared prompt prefix
            computed once (`lit_qa.data.packing`): the same losses and gradients in several times fewer FLOPs.
            Needs data prepared with paragraph ids (since packing exists); older data trains unpacked, with a note.
        pack_questions: Packed, at most this many questions of one paragraph sit next to each other in the data
            order, and so in one pack; 0 keeps whole paragraphs together (the most sharing, the fewest
            paragraphs per step).
        save_interval: Write a checkpoint every this many optimizer steps (and always at the end).
        log_interval: Log loss, learning rate, gradient norm, throughput and memory every this many steps.
        max_seq_length: Crop samples to this many tokens; None keeps the longest prepared sample.
        pad_multiple: Pad each micro-batch's length up to a multiple of this, so the kernels see a few shapes
            (on CPU, bf16 kernels are re-built for every new shape: 55 vs 630 tokens/s measured here).
        nan_policy: What a non-finite loss or gradient does: "stop" the run (keeping the last good
            checkpoint) or "skip" that optimizer step.
        max_time_minutes: Stop (after validating and saving a checkpoint) once training has run this long;
            the learning-rate schedule still spans the full run, so ``--resume auto`` can finish it later.
        loss_positions_only: Run the output head only at positions that carry loss (the answer tokens),
            not at every position; the same loss, less compute and memory.
        activation_checkpointing: Recompute each block's activations in the backward pass instead of keeping
            them: much less memory for about a third more compute (any strategy, FSDP included).
        compile: ``torch.compile`` each transformer block (about 15 s of compilation per new sequence-length
            pattern; pays off for runs of more than a few minutes: see benchmarks/README.md).
    """

    global_batch_size: int = 128
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 3e-4
    min_lr: float = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0
    group_by_length: bool = True
    pack: bool = True
    pack_questions: int = 0
    save_interval: int = 200
    log_interval: int = 1
    max_seq_length: int | None = None
    pad_multiple: int = 64
    nan_policy: Literal["stop", "skip"] = "stop"
    max_time_minutes: float | None = None
    loss_positions_only: bool = True
    activation_checkpointing: bool = False
    compile: bool = False

    def validate(self, world_size: int) -> None:
        """Raise one `LitQAError` listing every out-of-range value."""
        problems = []
        positive = ("global_batch_size", "micro_batch_size", "save_interval", "log_interval", "pad_multiple")
        problems += [f"--train.{name} must be >= 1, got {getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if self.learning_rate <= 0:
            problems.append(f"--train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            problems.append(f"--train.min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            problems.append("--train.warmup_steps, weight_decay and max_grad_norm must be >= 0")
        if self.pack_questions < 0:
            problems.append(f"--train.pack_questions must be >= 0 (0: whole paragraphs), got {self.pack_questions}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"--train.max_steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            problems.append(f"--train.epochs must be > 0, got {self.epochs}")
        if self.max_time_minutes is not None and self.max_time_minutes <= 0:
            problems.append(f"--train.max_time_minutes must be > 0, got {self.max_time_minutes}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            problems.append(f"--train.max_seq_length must be >= 2, got {self.max_seq_length}")
        if world_size < 1:
            problems.append(f"--devices x --num_nodes must be >= 1, got {world_size}")
        per_step = self.micro_batch_size * world_size
        if per_step > 0 and self.global_batch_size % per_step:
            problems.append(
                f"--train.global_batch_size={self.global_batch_size} must be a multiple of micro_batch_size x devices"
                f" = {self.micro_batch_size} x {world_size}"
            )
        if problems:
            raise LitQAError("; ".join(problems))

    def gradient_accumulation_iters(self, world_size: int) -> int:
        """Micro-batches each device runs per optimizer step."""
        self.validate(world_size)
        return self.global_batch_size // (self.micro_batch_size * world_size)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the whole run: ``max_steps``, or ``epochs`` worth of steps (at least 1)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class EvalArgs:
    """How to validate during training.

    Attributes:
        interval: Validate every this many optimizer steps (and at the end).
        max_batches: Validation micro-batches per validation (the same ones every time).
        num_samples: Validation questions whose generated answers are printed to the log.
        max_new_tokens: Token budget of those sample generations and of the ``f1_questions`` answers.
        initial_validation: Run the full validation before the first step too (a short check always runs).
        f1_questions: Also answer this many fixed questions of the validation split (``val-v2.0.json`` in the
            data folder) by greedy generation at each validation, and log their EM and F1 (official SQuAD
            2.0 metric); 0 turns it off, and with it its cost.
        f1_batch_size: Questions decoded together for ``f1_questions``.
        best_metric: What ``out_dir/best/`` keeps the best step by: "f1" (of ``f1_questions``), "loss" (the
            validation loss), "none" (no ``best/``), or "auto": "f1" when ``f1_questions`` > 0, else "none".
    """

    interval: int = 50
    max_batches: int = 50
    num_samples: int = 3
    max_new_tokens: int = 32
    initial_validation: bool = False
    f1_questions: int = 0
    f1_batch_size: int = 8
    best_metric: Literal["auto", "f1", "loss", "none"] = "auto"

    def validate(self) -> None:
        """Raise one `LitQAError` listing every out-of-range value."""
        positive = ("interval", "max_batches", "f1_batch_size")
        problems = [f"--eval.{name} must be >= 1" for name in positive if getattr(self, name) < 1]
        if self.num_samples < 0 or self.max_new_tokens < 1:
            problems.append("--eval.num_samples must be >= 0 and --eval.max_new_tokens >= 1")
        if self.f1_questions < 0:
            problems.append(f"--eval.f1_questions must be >= 0, got {self.f1_questions}")
        if self.best_metric not in ("auto", "f1", "loss", "none"):
            problems.append(f"--eval.best_metric must be auto, f1, loss or none, got {self.best_metric!r}")
        elif self.best_metric == "f1" and self.f1_questions == 0:
            problems.append("--eval.best_metric f1 needs --eval.f1_questions > 0")
        if problems:
            raise LitQAError("; ".join(problems))

    def tracked_metric(self) -> str | None:
        """The validation metric ``best/`` is chosen by ("f1" or "loss"), or None when no ``best/`` is kept."""
        if self.best_metric == "auto":
            return "f1" if self.f1_questions > 0 else None
        return None if self.best_metric == "none" else self.best_metric
