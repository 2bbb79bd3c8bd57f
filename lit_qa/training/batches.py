# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The order of training samples: global batches, micro-batches and each rank's share.

The order is a pure function of (seed, epoch) and the global batch size (and, packed, of ``pack_questions``), never
of the micro-batch size or the number of devices, so changing either leaves the optimisation unchanged, and a
resumed run continues it exactly.

Packed training (``--train.pack true``, `lit_qa.data.packing`) orders the samples so that questions of one paragraph
sit next to each other: each paragraph's samples are shuffled and cut into runs of at most ``pack_questions``
(0: the whole paragraph), and the runs are shuffled. A micro-batch then packs each run it holds into one sequence.
Small runs mix more paragraphs into each step; whole paragraphs share the most tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_qa.training.args import TrainArgs


def epoch_global_batches(
    lengths: list[int],
    global_batch_size: int,
    seed: int,
    epoch: int,
    paragraphs: list[int] | None = None,
    pack_questions: int = 0,
) -> list[list[int]]:
    """The global batches (lists of sample indices) of one epoch: a pure function of its arguments.

    A step's samples depend only on the seed, the epoch and the global batch size, never on the micro-batch
    size or the number of devices, so changing either leaves the optimisation unchanged. A last partial
    batch is dropped. With ``paragraphs`` (each sample's paragraph, -1 for none) the order keeps runs of one
    paragraph's samples together (`paragraph_runs`).
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if paragraphs is None:
        order = torch.randperm(len(lengths), generator=generator).tolist()
    else:
        runs = paragraph_runs(paragraphs, pack_questions, generator)
        order = [i for r in torch.randperm(len(runs), generator=generator).tolist() for i in runs[r]]
    return [order[start : start + global_batch_size] for start in range(0, len(order) - global_batch_size + 1,
                                                                         global_batch_size)]  # fmt: skip


def paragraph_runs(paragraphs: list[int], pack_questions: int, generator: torch.Generator) -> list[list[int]]:
    """Each paragraph's samples in a random order, cut into runs of at most ``pack_questions`` (0: one run per
    paragraph); a sample without a paragraph (-1) is a run of its own. Runs come in order of first appearance."""
    members: dict[int, list[int]] = {}
    runs = []
    for i, paragraph in enumerate(paragraphs):
        if paragraph < 0:
            runs.append([i])
        else:
            if paragraph not in members:
                members[paragraph] = []
                runs.append(members[paragraph])  # filled below, in place
            members[paragraph].append(i)
    cut = []
    for run in runs:
        shuffled = [run[j] for j in torch.randperm(len(run), generator=generator).tolist()]
        size = pack_questions or len(shuffled)
        cut += [shuffled[start : start + size] for start in range(0, len(shuffled), size)]
    return cut


def split_global_batch(
    indices: list[int], lengths: list[int], micro_batch_size: int, group_by_length: bool
) -> list[list[int]]:
    """Cut one global batch into micro-batches; with ``group_by_length`` similar lengths share a micro-batch,
    so little padding is computed (packed training keeps the order instead, which holds a paragraph's runs)."""
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
    paragraphs: list[int] | None = None,
) -> list[tuple[list[list[int]], int]]:
    """For each optimizer step of the epoch: this rank's micro-batches and the global batch's loss-token count.

    Every rank computes the same epoch order, takes every world_size-th micro-batch of each step (so long
    and short ones spread evenly over ranks), and knows the loss-token count of the whole global batch
    without communicating. ``paragraphs``: train packed (see the module docstring).
    """
    steps = []
    packed = paragraphs is not None
    for indices in epoch_global_batches(lengths, train_args.global_batch_size, seed, epoch, paragraphs,
                                        train_args.pack_questions):  # fmt: skip
        micro_batches = split_global_batch(indices, lengths, train_args.micro_batch_size,
                                           train_args.group_by_length and not packed)  # fmt: skip
        steps.append((micro_batches[rank::world_size], sum(loss_token_counts[i] for i in indices)))
    return steps


def count_loss_tokens(sample: dict[str, Any], max_seq_length: int | None = None) -> int:
    """Positions of ``sample`` that carry loss: those whose next token has a label (after cropping)."""
    return int((sample["labels"][1:max_seq_length] != -100).sum())
