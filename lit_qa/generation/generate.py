# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""KV-cached decoding: greedy or sampled (temperature, top-k, top-p), one prompt or a batch of any lengths.

A batch is padded so every row's last prompt token sits in the same cache slot; the model masks the padding
and gives each row's tokens their positions in that row, so a row decodes exactly as it would alone. Prompts
that share a long prefix (questions about one paragraph) have it prefilled once (`lit_qa.generation.prefixes`).

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
from lit_qa.generation.prefixes import PromptLayout, plan_layout
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
    share_prefixes: bool = True,
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
        share_prefixes: Prefill a long prefix that several prompts share (e.g. a paragraph asked about by several
            questions) once for all of them (`lit_qa.generation.prefixes`), when that saves FLOPs. The same
            computation either way; False prefills every prompt whole.

    Returns:
        For each prompt, the newly generated tokens (1-D, on the model's device).
    """
    check_sampling_args(temperature, top_k, top_p)
    if not prompts or any(p.numel() == 0 for p in prompts):
        raise LitQAError("every prompt needs at least one token")
    if (probe is None) != (on_probe is None) or (probe is not None and probe.numel() == 0):
        raise LitQAError("a probe needs at least one token and an on_probe callback, and on_probe needs a probe")
    room = max(max_new_tokens, 0 if probe is None else probe.numel())  # cache slots after the prompt
    device = model.transformer.wte.weight.device
    layout = plan_layout(prompts, pad_id, pad_multiple, room, model.max_seq_length, device, share_prefixes)
    batch_size, prompt_length = len(prompts), layout.prompt_length
    stop = torch.tensor(sorted(stop_ids or ()), dtype=torch.long, device=device)
    model.set_kv_cache(layout.prefixes.size(0), prompt_length + room)
    try:
        logits = prefill(model, layout, probe, on_probe, on_na_logits)
        if first_step_processor is not None:
            logits = first_step_processor(logits)
        if logits_processor is not None:
            logits = logits_processor(logits, None)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        tokens = []
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)
            finished |= torch.isin(token, stop)
            tokens.append(token)
            # One host sync per step; it lets a batch stop as soon as every row is done.
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            input_pos = torch.tensor([prompt_length + step], device=device)
            logits = model(token[:, None], input_pos, layout.slot_positions)[:, -1]
            if logits_processor is not None:
                logits = logits_processor(logits, token)
    finally:
        model.clear_kv_cache()
    out = torch.stack(tokens, dim=1) if tokens else torch.empty((batch_size, 0), dtype=torch.long, device=device)
    return [_until_stop(row, stop) for row in out]


def prefill(
    model: GPT,
    layout: PromptLayout,
    probe: torch.Tensor | None = None,
    on_probe: Callable[[torch.Tensor], None] | None = None,
    on_na_logits: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the prompts as laid out in ``layout`` through the model, filling its KV cache (shared prefixes first, then
    each row's rest), and return the (B, vocab) logits of the first new token; ``on_na_logits`` and ``on_probe``
    get what `generate` describes."""
    idx, start = layout.prefixes, 0
    if layout.suffixes is not None:
        model.hidden_states(idx, torch.arange(idx.size(1), device=idx.device), layout.group_positions)
        model.select_kv_cache_rows(layout.row_groups)
        idx, start = layout.suffixes, idx.size(1)
    batch_size, end = idx.size(0), start + idx.size(1)
    input_pos = torch.arange(start, end, device=idx.device)
    if on_na_logits is None:
        logits = model(idx, input_pos, layout.slot_positions, last_only=True)[:, -1]  # (B, vocab)
    else:  # right-aligned: every prompt ends at the last position
        last = torch.full((batch_size,), idx.size(1) - 1, dtype=torch.long, device=idx.device)
        logits, na_logits = model(idx, input_pos, layout.slot_positions, last_only=True, na_positions=last)
        logits = logits[:, -1]  # (B, vocab)
        on_na_logits(na_logits)
    if probe is not None:
        probe_pos = torch.arange(end, end + probe.numel(), device=idx.device)
        probe_idx = probe.to(idx.device).expand(batch_size, -1)  # (B, P)
        probe_logits = model(probe_idx, probe_pos, layout.slot_positions)  # (B, P, vocab)
        on_probe(torch.cat([logits[:, None], probe_logits], dim=1))  # (B, P+1, vocab)
    return logits


def _until_stop(tokens: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    hits = torch.isin(tokens, stop).nonzero()
    return tokens[: int(hits[0])] if len(hits) else tokens
