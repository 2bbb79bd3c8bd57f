# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Packed rows: several questions on one paragraph in one sequence, the shared prompt prefix computed once.

A row of a packed training batch (`lit_qa.data.packing`) holds a prefix that all its questions share (instruction
and paragraph), then each question's own tokens (question, answer, EOS) as a segment, then padding. ``segments``
(B, T) labels every token: 0 for the prefix, k >= 1 for segment k, -1 for padding::

    tokens:    [instruction + paragraph][question 1 + answer][question 2 + answer] pad pad
    segments:   0  0  0 ...          0   1  1  1  1  1  1     2  2  2  2  2        -1  -1
    positions:  0  1  2 ...        P-1   P P+1 ...            P P+1 ...             (unused)

A token attends causally to the prefix and to its own segment only, and a segment's RoPE positions continue from
the prefix's end, so every question sees exactly the keys, values and positions it would see alone: its loss, its
no-answer logit and its gradients are those of the unpacked sample (up to float rounding), for a fraction of the
FLOPs. A row with a single question is one segment with an empty prefix, i.e. plain causal attention.

How the mask is applied, measured (benchmarks/packing.py): on CPU, SDPA with the mask (query heads folded per key
head, `lit_qa.models.model.grouped_query_attention`) was the fastest of the alternatives in bf16, and splitting the
attention per segment saved little in fp32; on CUDA, FlexAttention's block masks skip the masked blocks entirely.
"""

from __future__ import annotations

import functools

import torch


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) RoPE position of every token: its index in the prefix, or the prefix length plus its index in its
    segment. Padding gets positions too (never read by a real token)."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    prefix_length = (segments == 0).sum(dim=1, keepdim=True)  # (B, 1)
    starts = torch.ones_like(segments, dtype=torch.bool)  # where a new segment (or the padding) begins
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    segment_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    return torch.where(segments == 0, index, prefix_length + index - segment_start)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) attention mask: query i sees key j <= i of the prefix or of its own segment.

    A padding query sees the prefix and the padding before it (its own slot included), so no softmax row is empty.
    """
    T = segments.size(1)
    index = torch.arange(T, device=segments.device)
    causal = index[None, :] <= index[:, None]  # (T, T)
    keys, queries = segments[:, None, :], segments[:, :, None]  # (B, 1, T), (B, T, 1)
    return (causal & ((keys == 0) | (keys == queries))).unsqueeze(1)  # (B, 1, T, T)


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention trains on CUDA only (its CPU backward is not implemented in torch 2.13)."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def segment_block_mask(segments: torch.Tensor):  # -> torch.nn.attention.flex_attention.BlockMask
    """The `segment_mask` rule as a FlexAttention ``BlockMask``: fully masked 128 x 128 blocks (a segment's queries
    against the other segments' keys) are skipped, not computed and thrown away."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q_index, kv_index):
        key, query = segments[b, kv_index], segments[b, q_index]
        return (kv_index <= q_index) & ((key == 0) | (key == query))

    B, T = segments.shape
    return create_block_mask(rule, B, None, T, T, device=segments.device)


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is a FlexAttention ``BlockMask`` (made by `segment_block_mask`)."""
    return type(mask).__name__ == "BlockMask"


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled it materialises the whole score matrix. Shapes are left
    to torch's automatic dynamism: packed rows change length every step, and a recompilation per length would soon
    hit the recompile limit (after which torch would run the uncompiled version)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
