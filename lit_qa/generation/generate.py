# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""KV-cached decoding: greedy or sampled (temperature, top-k, top-p), one prompt or a batch of any lengths.

In small steps, as gpt-fast has them; `generate` is their composition for plain use::

    with kv_cached(model, prompts, room) as layout:            # the batch laid out in a fresh KV cache
        logits, na_logits = prefill(model, layout, na_head)    # the prompts: first new token's logits (+ head's)
        scores = probe_logits(model, layout, logits, probe)    # optional: a fixed continuation scored on the way
        outputs = decode_n_tokens(model, layout, logits, max_new_tokens, ...)  # `decode_one_token` per step

A batch is padded so every row's last prompt token sits in the same cache slot; the model masks the padding
and gives each row's tokens their positions in that row, so a row decodes exactly as it would alone. Prompts
that share a long prefix (questions about one paragraph) have it prefilled once (`lit_qa.generation.prefixes`).

A fixed continuation (the probe, e.g. the no-answer string) costs one forward pass and no second prefill: right after
the prefill it is fed into the cache slots that follow every prompt::

    cache slots:  [pad pad prompt........][probe p0 p1 p2]     one forward call: logits after p0, p1, p2
                  [prompt................][answer a0 a1 ...]  decoding then writes the same slots again

Decoding starts from the prefill's logits and overwrites those slots one by one; a step at slot s only
attends to slots <= s (the mask), which it has written itself by then, so the probe leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lit_qa.errors import LitQAError
from lit_qa.generation.prefixes import PromptLayout, plan_layout
from lit_qa.models.model import GPT

# Maps a step's (B, vocab) logits before sampling, given the tokens chosen at the step before (None at the first).
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token for each row of ``logits`` (B, vocab).

    ``temperature`` 0 means greedy (argmax). Otherwise logits are divided by the temperature, cut to
    the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2019), then sampled.

    Returns:
        Token ids, shape (B,).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already reach top_p; the most likely one always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise `LitQAError` for out-of-range sampling flags."""
    if temperature < 0:
        raise LitQAError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise LitQAError(f"--top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise LitQAError(f"--top_p must be in (0, 1], got {top_p}")


def generate(
    model: GPT,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: set[int] | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> list[torch.Tensor]:
    """Continue each prompt by up to ``max_new_tokens`` tokens, stopping a row at its first stop token: `kv_cached`,
    `prefill` and `decode_n_tokens` for plain use (scripts, validation, tests).

    Args:
        model: The model; its KV cache is (re)allocated for this batch and cleared afterwards.
        prompts: 1-D token tensors, any lengths.
        max_new_tokens: Upper bound on generated tokens per row.
        temperature, top_k, top_p, generator: See `sample`.
        stop_ids, pad_id, logits_processor: See `decode_n_tokens`.

    Returns:
        For each prompt, the newly generated tokens (1-D, on the model's device).
    """
    check_sampling_args(temperature, top_k, top_p)
    with kv_cached(model, prompts, max_new_tokens, pad_id) as layout:
        logits, _ = prefill(model, layout)
        return decode_n_tokens(model, layout, logits, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, stop_ids=stop_ids, pad_id=pad_id, generator=generator,
                               logits_processor=logits_processor)  # fmt: skip


@contextmanager
def kv_cached(
    model: GPT,
    prompts: list[torch.Tensor],
    room: int,
    pad_id: int = 0,
    pad_multiple: int = 1,
    share_prefixes: bool = True,
) -> Iterator[PromptLayout]:
    """Lay ``prompts`` out in a fresh KV cache of the model for the ``with`` block's prefill and decoding, which run in
    inference mode; the cache is freed when the block ends, on an error too: it is sized for this batch only.

    Args:
        model: The model.
        prompts: 1-D token tensors, any lengths.
        room: Cache slots after the prompts: the new tokens, or a probe's (`probe_logits`) if more.
        pad_id: Token used for padding (never attended to).
        pad_multiple: Left-pad the batch to a multiple of this many tokens. On CPUs, bf16 kernels are re-built
            for every new shape, so a few fixed shapes beat minimal padding there.
        share_prefixes: Prefill a long prefix that several prompts share (e.g. a paragraph asked about by several
            questions) once for all of them (`lit_qa.generation.prefixes`), when that saves FLOPs. The same
            computation either way; False prefills every prompt whole.

    Yields:
        Where each prompt sits in the cache (`lit_qa.generation.prefixes.plan_layout`).
    """
    if not prompts or any(p.numel() == 0 for p in prompts):
        raise LitQAError("every prompt needs at least one token")
    with torch.inference_mode():
        device = model.transformer.wte.weight.device
        layout = plan_layout(prompts, pad_id, pad_multiple, room, model.max_seq_length, device, share_prefixes)
        model.set_kv_cache(layout.prefixes.size(0), layout.prompt_length + room)
        try:
            yield layout
        finally:
            model.clear_kv_cache()


def prefill(model: GPT, layout: PromptLayout, na_head: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the prompts as laid out in ``layout`` through the model, filling its KV cache: each shared prefix once,
    then each row's rest.

    Args:
        model: The model, with the cache of `kv_cached`.
        layout: The batch, from `kv_cached`.
        na_head: Also return the no-answer head's logits, read from this same forward pass as training reads them
            (the model needs a head, `lit_qa.models.na_head`).

    Returns:
        The (B, vocab) logits of each row's first new token, and with ``na_head`` the head's (B,) float32 logits at
        each prompt's last token (else None).
    """
    idx, start = layout.prefixes, 0
    if layout.suffixes is not None:
        model.hidden_states(idx, torch.arange(idx.size(1), device=idx.device), layout.group_positions)
        model.select_kv_cache_rows(layout.row_groups)
        idx, start = layout.suffixes, idx.size(1)
    input_pos = torch.arange(start, start + idx.size(1), device=idx.device)
    if not na_head:
        return model(idx, input_pos, layout.slot_positions, last_only=True)[:, -1], None  # (B, vocab)
    last = torch.full((idx.size(0),), idx.size(1) - 1, dtype=torch.long, device=idx.device)  # right-aligned prompts
    logits, na_logits = model(idx, input_pos, layout.slot_positions, last_only=True, na_positions=last)
    return logits[:, -1], na_logits


def probe_logits(model: GPT, layout: PromptLayout, logits: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Score a fixed continuation of every prompt (e.g. the no-answer string) right after `prefill`, in one forward
    pass through the cache slots that decoding writes again later, so it does not change what is decoded (module
    docstring); `kv_cached` must leave ``room`` for it.

    Args:
        model, layout: As for `prefill`, which has just run.
        logits: `prefill`'s (B, vocab) logits.
        probe: 1-D token ids, the same for every row, at least one.

    Returns:
        (B, P + 1, vocab) logits, P = ``probe.numel()``: position i holds the raw logits of the token after
        prompt + probe[:i], so it predicts ``probe[i]`` for i < P, and position P what follows the whole probe
        (e.g. EOS).
    """
    start, batch_size = layout.prompt_length, logits.size(0)
    if probe.numel() == 0 or start + probe.numel() > model.transformer.h[0].attn.kv_cache.k.size(2):
        raise LitQAError(f"a probe needs at least one token and room for its {probe.numel()} in the KV cache")
    positions = torch.arange(start, start + probe.numel(), device=logits.device)
    probe_idx = probe.to(logits.device).expand(batch_size, -1)  # (B, P)
    return torch.cat([logits[:, None], model(probe_idx, positions, layout.slot_positions)], dim=1)  # (B, P+1, vocab)


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """Feed each row's latest token (B,) into cache slot ``input_pos`` (1,); returns the next token's (B, vocab)
    logits."""
    return model(token[:, None], input_pos, layout.slot_positions)[:, -1]


def decode_n_tokens(
    model: GPT,
    layout: PromptLayout,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: set[int] | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    logits_processor: LogitsProcessor | None = None,
) -> list[torch.Tensor]:
    """Decode up to ``max_new_tokens`` tokens per row after `prefill`, stopping a row at its first stop token and the
    batch once every row has stopped.

    Args:
        model, layout: As for `prefill`, which has run (and maybe `probe_logits`).
        logits: `prefill`'s (B, vocab) logits, which give the first new token.
        max_new_tokens: Upper bound on new tokens per row; `kv_cached` must leave that much ``room``.
        temperature, top_k, top_p, generator: See `sample`.
        stop_ids: Token ids that end a row (EOS). The stop token is not included in the output.
        pad_id: Fed to a row after its stop token; whatever is chosen for it then is thrown away.
        logits_processor: The one per-step hook: maps the (B, vocab) logits of every step before sampling, given
            the tokens chosen at the step before ((B,); None at the first step). E.g.
            `lit_qa.generation.extractive.SpanDecoder.processor`, which keeps each answer a span of its context.

    Returns:
        For each row, the new tokens up to its stop token (1-D, on the model's device).
    """
    check_sampling_args(temperature, top_k, top_p)
    device, prompt_length = logits.device, layout.prompt_length
    stop = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=device)
    if logits_processor is not None:
        logits = logits_processor(logits, None)
    finished = torch.zeros(logits.size(0), dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        token = token.masked_fill(finished, pad_id)
        finished |= torch.isin(token, stop)
        tokens.append(token)
        # One host sync per step; it lets a batch stop as soon as every row is done.
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = decode_one_token(model, token, torch.tensor([prompt_length + step], device=device), layout)
        if logits_processor is not None:
            logits = logits_processor(logits, token)
    out = torch.stack(tokens, dim=1) if tokens else torch.empty((logits.size(0), 0), dtype=torch.long, device=device)
    return [_until_stop(row, stop) for row in out]


def _until_stop(tokens: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    hits = torch.isin(tokens, stop).nonzero()
    return tokens[: int(hits[0])] if len(hits) else tokens
