# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The training loss: summed next-token cross-entropy over the answer tokens, and the no-answer head's logits
from the same forward pass. A batch with ``segments`` holds packed rows (`lit_qa.data.packing`): several questions per
row, each with its own answer tokens and its own last prompt token for the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_qa.models.na_head import answer_start_mask


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
    labels (``unanswerable``), the head's (N,) logits at each question's last prompt token (one per row unpacked);
    both from one forward pass. Without a head the second is None."""
    if getattr(getattr(model, "module", model), "na_head", None) is None or "unanswerable" not in batch:
        return token_loss_sum(model, batch, loss_positions_only), None
    return _token_loss_sum(model, batch, loss_positions_only, answer_start_mask(batch["labels"]))


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
    out = model(input_ids, output_mask=output_mask, na_positions=na_positions, segments=batch.get("segments"))
    logits, na_logits = out if na_positions is not None else (out, None)
    if not loss_positions_only:
        logits = logits[:, :-1]  # (B, T-1, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum"), na_logits  # fmt: skip
    return F.cross_entropy(logits.float(), targets[targets != -100], reduction="sum"), na_logits  # (N, vocab) logits
