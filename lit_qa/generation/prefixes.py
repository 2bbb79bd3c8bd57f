# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""A batch's prompts laid out in the KV cache, with a prefix that several prompts share prefilled only once.

SQuAD asks about ten questions per paragraph, and each question's prompt repeats the instruction and the whole
paragraph: most of its tokens. Prompts whose first `MIN_SHARED_PREFIX` tokens agree form a group; the group's
common prefix is run through the model once, its keys and values are copied to every member's cache row, and only
each member's own rest (its question) is prefilled per row. The result is the same computation as prefilling
every prompt whole, in fewer FLOPs.

The cache of B rows in G groups::

    slots [0, P)       each group's prefix, left-padded to the longest one (P)
    slots [P, P + S)   each row's suffix, right-aligned: the padding sits in the gap after the prefix
    slots P + S ...    the answer (and the no-answer probe), one slot per decoding step

``slot_positions`` gives every slot's RoPE position in its row (-1 for padding), so each row sees exactly its own
prompt at positions 0, 1, ...: `lit_qa.models.model.GPT.forward`. A plain left-padded batch is the case of one
group per row whose prefix is the whole prompt (S = 0); it is used whenever sharing would not save FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_qa.models.model import left_padding_positions

# Prompts must agree on this many first tokens to share a prefix: more than any prompt template's fixed
# instruction, so that in practice only questions about the same paragraph are grouped.
MIN_SHARED_PREFIX = 64


@dataclass
class PromptLayout:
    """Where a batch's prompts sit in the KV cache (module docstring).

    Attributes:
        prefixes: (G, P) each group's prefix, left-padded; with ``row_groups`` None, the whole prompts (G = B).
        suffixes: (B, S) each row's rest, right-aligned; None when the prompts are not split (S = 0).
        row_groups: (B,) the group of each row; None when every row is its own group.
        slot_positions: (B, cache_length) RoPE position of each slot (-1: padding); None when nothing is padded.
        group_positions: (G, cache_length) the same for the prefix prefill, before rows are copied from groups.
    """

    prefixes: torch.Tensor
    suffixes: torch.Tensor | None
    row_groups: torch.Tensor | None
    slot_positions: torch.Tensor | None
    group_positions: torch.Tensor | None

    @property
    def prompt_length(self) -> int:
        """Slots the prompts take: the first new token goes into this slot."""
        return self.prefixes.size(1) + (0 if self.suffixes is None else self.suffixes.size(1))


def plan_layout(
    prompts: list[torch.Tensor],
    pad_id: int,
    pad_multiple: int,
    room: int,
    max_seq_length: int,
    device: torch.device,
    share_prefixes: bool = True,
) -> PromptLayout:
    """Lay out ``prompts`` in the cache, sharing prefixes where that saves prefill FLOPs and fits.

    Args:
        prompts: 1-D token tensors, each at least one token.
        pad_id: Token used for padding (never attended to).
        pad_multiple: Round the (prefix) prefill length up to a multiple of this, where ``room`` still fits.
        room: Cache slots needed after the prompts (new tokens, probe).
        max_seq_length: The model's limit on prompt plus new tokens.
        device: Where the tensors go.
        share_prefixes: Allow shared prefixes; False always gives the plain left-padded batch.
    """
    plain = _plain_layout(prompts, pad_id, pad_multiple, room, max_seq_length, device)
    groups = _groups(prompts) if share_prefixes else []
    if not any(len(members) > 1 for members in groups):
        return plain
    prefix_lengths = [_common_prefix_length([prompts[row] for row in members]) for members in groups]
    prefix_length = max(prefix_lengths)
    suffix_length = max(len(prompts[row]) - prefix_lengths[g] for g, members in enumerate(groups) for row in members)
    fits = prefix_length + suffix_length + room <= max_seq_length
    prefill_tokens = len(groups) * prefix_length + len(prompts) * suffix_length
    if not fits or prefill_tokens >= plain.prefixes.numel():
        return plain
    prefix_length = _rounded(prefix_length, pad_multiple, max_seq_length - room - suffix_length)
    prefixes = torch.full((len(groups), prefix_length), pad_id, dtype=torch.long)
    suffixes = torch.full((len(prompts), suffix_length), pad_id, dtype=torch.long)
    row_groups = torch.empty(len(prompts), dtype=torch.long)
    for g, members in enumerate(groups):
        shared = prefix_lengths[g]
        prefixes[g, prefix_length - shared :] = prompts[members[0]][:shared]
        for row in members:
            rest = prompts[row][shared:]
            suffixes[row, suffix_length - rest.numel() :] = rest
            row_groups[row] = g
    cache_length = prefix_length + suffix_length + room
    group_pad = prefix_length - torch.tensor(prefix_lengths)  # (G,) left padding of each prefix
    gap = suffix_length - torch.tensor([len(p) for p in prompts]) + torch.tensor(prefix_lengths)[row_groups]  # (B,)
    return PromptLayout(
        prefixes=prefixes.to(device),
        suffixes=suffixes.to(device),
        row_groups=row_groups.to(device),
        slot_positions=_positions(group_pad[row_groups], gap, prefix_length, cache_length).to(device),
        group_positions=_positions(group_pad, torch.zeros_like(group_pad), prefix_length, cache_length).to(device),
    )


def _plain_layout(
    prompts: list[torch.Tensor], pad_id: int, pad_multiple: int, room: int, max_seq_length: int, device: torch.device
) -> PromptLayout:
    """Every prompt whole, left-padded so that all end at the last position."""
    lengths = torch.tensor([p.numel() for p in prompts])
    prompt_length = _rounded(int(lengths.max()), pad_multiple, max_seq_length - room)
    idx = torch.full((len(prompts), prompt_length), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, prompt_length - prompt.numel() :] = prompt
    pad = prompt_length - lengths
    positions = left_padding_positions(pad, prompt_length + room).to(device) if bool(pad.any()) else None
    return PromptLayout(idx.to(device), None, None, positions, None)


def _groups(prompts: list[torch.Tensor]) -> list[list[int]]:
    """Rows grouped by their first `MIN_SHARED_PREFIX` tokens (a shorter prompt is a group of its own)."""
    by_start: dict[tuple[int, ...], list[int]] = {}
    groups = []
    for row, prompt in enumerate(prompts):
        if prompt.numel() <= MIN_SHARED_PREFIX:
            groups.append([row])
            continue
        start = tuple(prompt[:MIN_SHARED_PREFIX].tolist())
        if start not in by_start:
            by_start[start] = []
            groups.append(by_start[start])
        by_start[start].append(row)
    return groups


def _common_prefix_length(prompts: list[torch.Tensor]) -> int:
    """Tokens the prompts share from the start, leaving each at least one token of its own (whose logits predict
    the first new token)."""
    shortest = min(p.numel() for p in prompts)
    first = prompts[0][: shortest - 1]
    agree = torch.ones(first.numel(), dtype=torch.bool)
    for prompt in prompts[1:]:
        agree &= prompt[: first.numel()] == first
    return int(agree.cumprod(0).sum())


def _rounded(length: int, multiple: int, limit: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, but not beyond ``limit`` (nor below ``length``)."""
    return max(length, min(-(-length // multiple) * multiple, limit))


def _positions(left_pad: torch.Tensor, gap: torch.Tensor, prefix_length: int, cache_length: int) -> torch.Tensor:
    """(B, cache_length) RoPE positions of the slots of rows with ``left_pad`` (B,) padding slots first and ``gap``
    (B,) padding slots right after the prefix, -1 on padding."""
    slots = torch.arange(cache_length)[None, :]  # (1, L)
    after_prefix = slots >= prefix_length
    positions = slots - left_pad[:, None] - torch.where(after_prefix, gap[:, None], 0)  # (B, L)
    padding = (slots < left_pad[:, None]) | (after_prefix & (slots < prefix_length + gap[:, None]))
    return positions.masked_fill(padding, -1)
