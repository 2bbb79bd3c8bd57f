# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""KV-cached decoding: greedy or sampled (temperature, top-k, top-p), one prompt or a batch of any lengths.

A batch is left-padded so every row's last prompt token sits in the same cache slot; the model masks
the padding and starts each row's RoPE positions at its first real token, so a row decodes exactly
as it would alone.

A fixed continuation (``probe``, e.g. the no-answer string) can be scored on the way, for one forward pass and
no second prefill: right after the prefill it is fed into the cache slots that follow every prompt::

    cache slots:  [pad pad prompt........][probe p0 p1 p2]     one forward call: logits after p0, p1, p2
                  [prompt................][answer a0 a1 ...]  decoding then writes the same slots again

Decoding starts from the prefill's logits and overwrites those slots one by one; a step at slot s only
attends to slots <= s (the mask), which it has written itself by then, so the probe leaves no trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_qa.errors import LitQAError
from lit_qa.models.model import GPT


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


@torch.inference_mode()
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
    pad_multiple: int = 1,
    first_step_processor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    logits_processor: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    probe: torch.Tensor | None = None,
    on_probe: Callable[[torch.Tensor], None] | None = None,
    on_na_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Continue each prompt by up to ``max_new_tokens`` tokens, stopping a row at its first stop token.

    Args:
        model: The model; its KV cache is (re)allocated for this batch and cleared afterwards.
        prompts: 1-D token tensors, any lengths.
        max_new_tokens: Upper bound on generated tokens per row.
        temperature, top_k, top_p: See `sample`.
        stop_ids: Token ids that end a row (EOS). The stop token is not included in the output.
        pad_id: Token used for left padding (never attended to).
        generator: Random generator for reproducible sampling.
        pad_multiple: Left-pad the batch to a multiple of this many tokens. On CPUs, bf16 kernels are re-built
            for every new shape, so a few fixed shapes beat minimal padding there.
        first_step_processor: Maps the (B, vocab) logits of the first new token before sampling, e.g. to
            decide between answering and abstaining on a probability rather than on a single token's rank.
        logits_processor: Maps the (B, vocab) logits of every step before sampling, given the tokens chosen
            at the step before ((B,); None at the first step, after ``first_step_processor``). A finished row is
            fed ``pad_id`` after its stop token, and whatever is chosen for it is thrown away. E.g.
            `lit_qa.generation.extractive.SpanDecoder.processor`, which keeps each answer a span of its context.
        probe: 1-D token ids, the same for every row, to score as a continuation of each prompt (see the module
            docstring); it does not change what is generated.
        on_probe: Called once with the probe's logits (B, P + 1, vocab), P = ``probe.numel()``: position i holds
            the raw logits of the token after prompt + probe[:i], so it predicts ``probe[i]`` for i < P, and
            position P what follows the whole probe (e.g. EOS).
        on_na_logits: Called once with the no-answer head's (B,) logits at each prompt's last token, read from the
            prefill itself (the model needs a head, `lit_qa.models.na_head`).

    Returns:
        For each prompt, the newly generated tokens (1-D, on the model's device).
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prompts or any(p.numel() == 0 for p in prompts):
        raise LitQAError("every prompt needs at least one token")
    if (probe is None) != (on_probe is None) or (probe is not None and probe.numel() == 0):
        raise LitQAError("a probe needs at least one token and an on_probe callback, and on_probe needs a probe")
    room = max(max_new_tokens, 0 if probe is None else probe.numel())  # cache slots after the prompt
    idx, pad_lengths = left_padded(model, prompts, pad_id, pad_multiple, room)
    batch_size, prompt_length = idx.shape
    stop = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=idx.device)
    model.set_kv_cache(batch_size, prompt_length + room)
    try:
        logits = prefill(model, idx, pad_lengths, probe, on_probe, on_na_logits)
        if first_step_processor is not None:
            logits = first_step_processor(logits)
        if logits_processor is not None:
            logits = logits_processor(logits, None)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=idx.device)
        tokens = []
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)
            finished |= torch.isin(token, stop)
            tokens.append(token)
            # One host sync per step; it lets a batch stop as soon as every row is done.
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            input_pos = torch.tensor([prompt_length + step], device=idx.device)
            logits = model(token[:, None], input_pos, pad_lengths)[:, -1]
            if logits_processor is not None:
                logits = logits_processor(logits, token)
    finally:
        model.clear_kv_cache()
    out = torch.stack(tokens, dim=1) if tokens else idx.new_empty((batch_size, 0))  # (B, new)
    return [_until_stop(row, stop) for row in out]


def left_padded(
    model: GPT, prompts: list[torch.Tensor], pad_id: int, pad_multiple: int, room: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts as one (B, T) batch on the model's device, left-padded with ``pad_id`` so that every prompt ends
    at the last position, T rounded up to a multiple of ``pad_multiple`` where ``room`` more positions still fit.

    Returns:
        The batch and each row's number of padding positions (None when no row is padded).
    """
    device = model.transformer.wte.weight.device
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    longest = int(lengths.max())
    rounded = -(-longest // pad_multiple) * pad_multiple
    prompt_length = max(longest, min(rounded, model.max_seq_length - room))  # rounding never overflows
    idx = torch.full((len(prompts), prompt_length), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, prompt_length - prompt.numel() :] = prompt.to(device)
    pad_lengths = prompt_length - lengths
    return idx, pad_lengths if bool(pad_lengths.any()) else None


def prefill(
    model: GPT,
    idx: torch.Tensor,
    pad_lengths: torch.Tensor | None,
    probe: torch.Tensor | None = None,
    on_probe: Callable[[torch.Tensor], None] | None = None,
    on_na_logits: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the left-padded prompts ``idx`` through the model, filling its KV cache, and return the (B, vocab) logits
    of the first new token; ``on_na_logits`` and ``on_probe`` get what `generate` describes."""
    batch_size, prompt_length = idx.shape
    input_pos = torch.arange(prompt_length, device=idx.device)
    if on_na_logits is None:
        logits = model(idx, input_pos, pad_lengths, last_only=True)[:, -1]  # (B, vocab)
    else:  # left-padded: every prompt ends at the last position
        last = torch.full((batch_size,), prompt_length - 1, dtype=torch.long, device=idx.device)
        logits, na_logits = model(idx, input_pos, pad_lengths, last_only=True, na_positions=last)
        logits = logits[:, -1]  # (B, vocab)
        on_na_logits(na_logits)
    if probe is not None:
        probe_pos = torch.arange(prompt_length, prompt_length + probe.numel(), device=idx.device)
        probe_idx = probe.to(idx.device).expand(batch_size, -1)  # (B, P)
        on_probe(torch.cat([logits[:, None], model(probe_idx, probe_pos, pad_lengths)], dim=1))  # (B, P+1, vocab)
    return logits


def _until_stop(tokens: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    hits = torch.isin(tokens, stop).nonzero()
    return tokens[: int(hits[0])] if len(hits) else tokens
