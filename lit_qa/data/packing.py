# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Paragraph packs: the questions of one paragraph as one training sequence, their shared prompt prefix once.

SQuAD asks about nine questions per paragraph, and every question's prompt repeats the instruction and the whole
paragraph: about 204 of a sample's 228 tokens in the demo data. Prepared samples record their ``paragraph`` (its
index in the training file; -1 when the prompt is the question's own, as for a windowed context). Consecutive
samples of one paragraph in a micro-batch become one packed row::

    samples:  [prompt prefix][question 1, answer 1]   [prompt prefix][question 2, answer 2]
    packed:   [prompt prefix][question 1, answer 1][question 2, answer 2]
    segments:  0 ........ 0   1 ................ 1   2 ................ 2

The prefix is the token-level common start of the samples' prompts (so nothing depends on how the tokenizer
splits text), and each question keeps at least its last prompt token in its segment, where its answer's first
token is predicted and the no-answer head reads. `lit_qa.models.segments` makes each segment attend to the prefix
and itself only, at the positions it has alone, so a packed batch computes what the unpacked samples would.

A packed row may hold `PACK_LENGTH_FACTOR` times the sample length limit (its positions never exceed a sample's:
they restart after the prefix); a longer pack is split into several. A row costs no more memory than its samples
unpacked, and the cap keeps the masked attention's cost, quadratic in the row's length, down on CPU. A sample
over the limit stays alone and is cropped, as unpacked. Labels are laid out like the tokens, so the loss and its shift by one need no change: a segment
starts with prompt tokens (label -100), so no position predicts across segments.
"""

from __future__ import annotations

from typing import Any

import torch

from lit_qa.data.dataset import IGNORE_INDEX, collate

PACK_LENGTH_FACTOR = 2


def prompt_length(sample: dict[str, Any]) -> int:
    """Tokens before the sample's first label (its prompt)."""
    has_label = sample["labels"] != IGNORE_INDEX
    return int(has_label.int().argmax()) if bool(has_label.any()) else len(has_label)


def shared_prefix_length(samples: list[dict[str, Any]]) -> int:
    """How many first tokens the samples' prompts all share, leaving every sample at least its last prompt token."""
    limit = min(prompt_length(sample) for sample in samples) - 1
    first = samples[0]["input_ids"][:limit]
    shared = max(limit, 0)
    for sample in samples[1:]:
        differ = (sample["input_ids"][:limit] != first).nonzero()
        if len(differ):
            shared = min(shared, int(differ[0]))
    return shared


def packed_length(samples: list[dict[str, Any]]) -> int:
    """Tokens of the samples as one pack: the shared prefix once, then each sample's own tokens."""
    prefix = shared_prefix_length(samples) if len(samples) > 1 else 0
    return prefix + sum(len(sample["input_ids"]) - prefix for sample in samples)


def plan_packs(samples: list[dict[str, Any]], max_length: int) -> list[list[int]]:
    """Group the samples (by index, in order) into rows: runs of consecutive samples of one paragraph share a row
    while it fits ``PACK_LENGTH_FACTOR * max_length``; a sample without a paragraph, or over ``max_length`` alone,
    gets a row of its own."""
    rows: list[list[int]] = []
    for i, sample in enumerate(samples):
        paragraph = sample.get("paragraph", -1)
        row = rows[-1] if rows else []
        joins = (
            paragraph >= 0
            and row
            and samples[row[0]].get("paragraph", -1) == paragraph
            and len(sample["input_ids"]) <= max_length
            and len(samples[row[0]]["input_ids"]) <= max_length
            and packed_length([samples[j] for j in row + [i]]) <= PACK_LENGTH_FACTOR * max_length
        )
        if joins:
            row.append(i)
        else:
            rows.append([i])
    return rows


def collate_packed(
    samples: list[dict[str, Any]], pad_id: int, max_length: int, pad_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Like `lit_qa.data.dataset.collate`, with consecutive samples of one paragraph packed into one row.

    Returns:
        ``input_ids`` and ``labels`` (R, T) for R rows, T rounded up to ``pad_multiple`` (never past a row's budget,
        ``PACK_LENGTH_FACTOR * max_length``); ``segments`` (R, T) (`lit_qa.models.segments`) when some row holds more than one sample;
        ``unanswerable`` (N,) for the N samples in their order (which is the rows' order) when they are marked.
        Without a pack the batch is exactly `collate`'s.
    """
    rows = plan_packs(samples, max_length)
    if all(len(row) == 1 for row in rows):
        return collate(samples, pad_id, max_length, pad_multiple)
    laid_out = [_lay_out([samples[i] for i in row], max_length) for row in rows]
    longest = -(-max(len(ids) for ids, _, _ in laid_out) // pad_multiple) * pad_multiple
    longest = min(longest, PACK_LENGTH_FACTOR * max_length)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    segments = torch.full((len(rows), longest), -1, dtype=torch.long)  # (R, T)
    for row, (ids, row_labels, row_segments) in enumerate(laid_out):
        input_ids[row, : len(ids)], labels[row, : len(ids)], segments[row, : len(ids)] = ids, row_labels, row_segments
    batch = {"input_ids": input_ids, "labels": labels, "segments": segments}
    if all("unanswerable" in s for s in samples):
        batch["unanswerable"] = torch.tensor([float(s["unanswerable"]) for s in samples])  # (N,)
    return batch


def forward_passes(
    samples: list[dict[str, Any]],
    pad_id: int,
    max_length: int,
    pad_multiple: int = 1,
    pack: bool = True,
    row_passes: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The forward passes of one micro-batch: one batch of a row per sample (``pack`` False, `collate`), one batch of
    paragraph packs (`collate_packed`), or with ``row_passes`` one batch per packed row (`collate_packed_rows`)."""
    if not pack:
        return [collate(samples, pad_id, max_length, pad_multiple)]
    if row_passes:
        return collate_packed_rows(samples, pad_id, max_length, pad_multiple)
    return [collate_packed(samples, pad_id, max_length, pad_multiple)]


def collate_packed_rows(
    samples: list[dict[str, Any]], pad_id: int, max_length: int, pad_multiple: int = 1
) -> list[dict[str, torch.Tensor]]:
    """`collate_packed`, one batch per row, each padded only to its own length (for one forward pass per row)."""
    return [collate_packed([samples[i] for i in row], pad_id, max_length, pad_multiple)
            for row in plan_packs(samples, max_length)]  # fmt: skip


def _lay_out(samples: list[dict[str, Any]], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row's token ids, labels and segment ids (1-D): a lone sample (cropped to ``max_length``) is segment 1
    with no prefix; a pack is its shared prefix (segment 0), then segments 1, 2, ..."""
    if len(samples) == 1:
        ids = samples[0]["input_ids"][:max_length]
        return ids, samples[0]["labels"][:max_length], torch.ones_like(ids)
    prefix = shared_prefix_length(samples)
    ids = [samples[0]["input_ids"][:prefix]]
    labels = [samples[0]["labels"][:prefix]]
    segments = [torch.zeros(prefix, dtype=torch.long)]
    for k, sample in enumerate(samples, start=1):
        ids.append(sample["input_ids"][prefix:])
        labels.append(sample["labels"][prefix:])
        segments.append(torch.full((len(sample["input_ids"]) - prefix,), k, dtype=torch.long))
    return torch.cat(ids), torch.cat(labels), torch.cat(segments)


def packing_stats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What packing whole paragraphs saves on a prepared split (reported in ``stats.json``): ``packs`` (paragraphs
    with two or more samples), ``packed_samples``, ``questions_per_pack`` (mean), ``single_samples`` (the rest),
    ``tokens`` unpacked and ``packed_tokens`` (each pack's prefix once), and ``tokens_saved`` (share, 0-1).
    No length budget applies here; training splits a pack that is too long."""
    paragraphs: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        paragraphs.setdefault(sample.get("paragraph", -1), []).append(sample)
    singles = paragraphs.pop(-1, [])
    packs = [members for members in paragraphs.values() if len(members) > 1]
    singles += [members[0] for members in paragraphs.values() if len(members) == 1]
    tokens = sum(len(sample["input_ids"]) for sample in samples)
    packed = sum(len(sample["input_ids"]) for sample in singles) + sum(packed_length(members) for members in packs)
    packed_samples = sum(len(members) for members in packs)
    return {
        "packs": len(packs),
        "packed_samples": packed_samples,
        "questions_per_pack": round(packed_samples / len(packs), 2) if packs else 0.0,
        "single_samples": len(singles),
        "tokens": tokens,
        "packed_tokens": packed,
        "tokens_saved": round(1 - packed / tokens, 4) if tokens else 0.0,
    }
