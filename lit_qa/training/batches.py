# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The order of training samples: global batches, micro-batches and each rank's share.

The order is a pure function of (seed, epoch) and the global batch size, never of the micro-batch size or the
number of devices, so changing either leaves the optimisation unchanged, and a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_qa.training.args import TrainArgs


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
