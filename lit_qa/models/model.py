# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The LLaMA architecture in plain PyTorch: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameter names follow Hugging Face's `LlamaForCausalLM` one-to-one below the block level
(`attn.q_proj`, `mlp.gate_proj`, ...), so checkpoint conversion is a rename table and LoRA targets
are plain module names. Queries and keys use Hugging Face's "rotate half" RoPE layout.

Training calls ``model(idx)``, or ``model(idx, segments=...)`` for packed rows (several questions on one paragraph
in a row, their shared prefix computed once: `lit_qa.models.segments`). Incremental decoding first calls
``model.set_kv_cache(batch_size, max_length)`` and then passes ``input_pos`` (the cache slots being written) and, for
batches with padding, ``slot_positions``: each cache slot's RoPE position in its row, -1 for a padding slot
(`left_padding_positions` for plain left padding; `lit_qa.generation.prefixes` lays out prompts that share a prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.segments import (
    compiled_flex_attention,
    flex_attention_available,
    is_block_mask,
    segment_block_mask,
    segment_mask,
    segment_positions,
)

# `enable_gqa` (torch >= 2.5) lets the fused kernels read shared key/value heads without copying them.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class GPT(nn.Module):
    """A LLaMA-family decoder-only transformer."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=RMSNorm(config.n_embd, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        self.max_seq_length = config.block_size
        # A `lit_qa.models.na_head.NoAnswerHead` once attached (`attach_na_head`); a submodule, so it trains and saves
        # like every other weight.
        self.na_head: nn.Module | None = None

    @property
    def max_seq_length(self) -> int:
        """Longest sequence the RoPE cache covers; lower it to save memory for long-context models."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if not 0 < value <= self.config.block_size:
            raise LitQAError(f"max_seq_length={value} must be in 1..{self.config.block_size} (the model's block_size)")
        self._max_seq_length = value
        self.reset_rope_cache()

    def reset_rope_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)build the cos/sin buffers, e.g. after the model was created on the meta device."""
        device = device if device is not None else self.transformer.wte.weight.device
        cos, sin = build_rope_cache(
            self._max_seq_length, self.config.head_size, self.config.rope_base, self.config.rope_scaling, device
        )
        # Non-persistent: derived from the config, so never saved in checkpoints.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        # The usual GPT/LLaMA initialisation; only random test models depend on it.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_kv_cache(self, batch_size: int, max_length: int | None = None) -> None:
        """Allocate a KV cache in every block for ``batch_size`` rows of up to ``max_length`` tokens."""
        max_length = max_length or self.max_seq_length
        if max_length > self.max_seq_length:
            raise LitQAError(
                f"prompt plus new tokens ({max_length}) exceed the model's max_seq_length ({self.max_seq_length})"
            )
        weight = self.transformer.wte.weight
        shape = (batch_size, self.config.n_query_groups, max_length, self.config.head_size)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(shape, device=weight.device, dtype=weight.dtype)

    def select_kv_cache_rows(self, rows: torch.Tensor) -> None:
        """Make row i of every block's KV cache a copy of its row ``rows[i]`` (e.g. one prefilled prefix per
        question, `lit_qa.generation.prefixes`); the cache then has ``len(rows)`` rows."""
        for block in self.transformer.h:
            block.attn.kv_cache.select_rows(rows)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        slot_positions: torch.Tensor | None = None,
        last_only: bool = False,
        output_mask: torch.Tensor | None = None,
        na_positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Compute next-token logits (and, with ``na_positions``, the no-answer head's logits).

        Args:
            idx: Token ids, shape (B, T).
            input_pos: KV-cache slots of the T tokens, shape (T,); None for a plain causal pass (training).
            slot_positions: (B, cache_length) RoPE position of every KV-cache slot in its row, -1 where the
                slot holds padding, when decoding a padded batch with the cache. Padding is masked out and each
                real token gets its position in its own row, so every row computes exactly what it would alone.
            last_only: Return logits of the last position only (prefill needs nothing else, and the
                vocabulary projection is a large share of a small model's FLOPs).
            output_mask: Boolean (B, T): return logits only where it is True, as (N, vocab) in row-major
                order. Fine-tuning uses it to project only the positions that carry loss (the answer tokens).
            na_positions: (B,) position of each row's last prompt token: also run the no-answer head there
                (the model needs one, see `lit_qa.models.na_head`). The head reads the same forward pass, so it costs
                no extra pass over the prompt. Or a boolean (B, T) mask of such positions, several per packed row,
                for N questions in row-major order.
            segments: (B, T) segment of every token of a packed batch, without a KV cache: 0 for a prefix shared by
                the row's questions, k >= 1 for question k's own tokens, -1 for padding (`lit_qa.models.segments`).
                Each token then attends to the prefix and its own segment only, at the positions it has alone.

        Returns:
            Logits of shape (B, T, padded_vocab_size); (B, 1, padded_vocab_size) with ``last_only``;
            (N, padded_vocab_size) with ``output_mask``. With ``na_positions``: those logits and the head's
            (B,) (or (N,) for a mask) float32 logits of "unanswerable".
        """
        if na_positions is not None and self.na_head is None:
            raise LitQAError("na_positions was given but the model has no no-answer head (lit_qa.models.na_head)")
        x, kept = self._forward_blocks(idx, input_pos, slot_positions, na_positions, segments)
        if last_only:
            x = x[:, -1:]
        elif output_mask is not None:
            x = x[output_mask]  # (N, n_embd)
        logits = self.lm_head(x)
        if na_positions is None:
            return logits
        return logits, self.na_head(kept)

    def hidden_states(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, slot_positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final normalised hidden states (B, T, n_embd), before the output head."""
        return self._forward_blocks(idx, input_pos, slot_positions)[0]

    def _forward_blocks(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        slot_positions: torch.Tensor | None = None,
        na_positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final normalised hidden states (B, T, n_embd), and with ``na_positions`` the outputs of the no-answer
        head's layers at those positions, one (B, n_embd) (or (N, n_embd) for a mask) tensor each."""
        B, T = idx.shape
        if input_pos is None and segments is not None:
            positions = segment_positions(segments)  # (B, T); a packed row may be longer than its positions go
            if int(positions.max()) >= self.max_seq_length:
                raise LitQAError(f"a packed question reaches position {int(positions.max())}, beyond "
                                 f"max_seq_length={self.max_seq_length}")  # fmt: skip
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (B, 1, T, hs)
            use_flex = flex_attention_available(idx.device)
            mask = segment_block_mask(segments) if use_flex else segment_mask(segments)
        elif input_pos is None:
            if T > self.max_seq_length:
                raise LitQAError(f"sequence of {T} tokens exceeds max_seq_length={self.max_seq_length}")
            cos, sin = self.cos[:T], self.sin[:T]  # (T, hs)
            mask = None  # causal, handled inside scaled_dot_product_attention
        else:
            # A padding query (position -1) gets position 0: masked everywhere but its own slot, it is never read.
            positions = input_pos if slot_positions is None else slot_positions[:, input_pos].clamp(min=0)
            cos, sin = self.cos[positions], self.sin[positions]  # (T, hs) or (B, T, hs)
            if cos.dim() == 3:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs), broadcast over heads
            cache_length = self.transformer.h[0].attn.kv_cache.k.size(2)
            mask = build_cache_mask(input_pos, slot_positions, cache_length)
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        keep = set(self.na_head.layers) if na_positions is not None else set()
        if na_positions is not None and na_positions.dtype != torch.bool:
            na_positions = (torch.arange(B, device=idx.device), na_positions)
        kept = []
        for i, block in enumerate(self.transformer.h):
            x = block(x, cos, sin, mask, input_pos)
            if i in keep:
                kept.append(x[na_positions])  # (B, n_embd), or (N, n_embd) for a mask
        return self.transformer.ln_f(x), kept


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = LLaMAMLP(config)

    def forward(self, x: torch.Tensor, *attention_args: torch.Tensor | None) -> torch.Tensor:
        """``attention_args`` go to the attention as they are: `CausalSelfAttention.forward`'s after ``x``."""
        x = x + self.attn(self.norm_1(x), *attention_args)
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        hs = config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.n_head * hs, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_query_groups * hs, bias=False)
        self.o_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=False)
        self.n_head, self.n_query_groups, self.head_size = config.n_head, config.n_query_groups, hs
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)  # (B, ng, T, hs)
        v = self.v_proj(x).view(B, T, self.n_query_groups, self.head_size).transpose(1, 2)  # (B, ng, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set: call model.set_kv_cache() first")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, ng, L, hs)
        y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh * hs)
        return self.o_proj(y)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of (B, nh, T, hs) queries over (B, ng, L, hs) keys/values; causal when ``mask`` is None.

        A method of its own so that `lit_qa.models.adapter.AdapterAttention` can add its prefix attention here.
        """
        # Written out, this is softmax(q @ k.T / sqrt(hs) + causal/padding mask) @ v, where each key/value
        # head serves n_head // n_query_groups consecutive query heads.
        if is_block_mask(mask):  # packed segments on CUDA (lit_qa.models.segments)
            return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)  # (B, nh, T, hs)
        if mask is None and _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, nh, T, hs)
        if mask is None:
            repeats = self.n_head // self.n_query_groups
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)  # (B, nh, T, hs)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return grouped_query_attention(q, k, v, mask)  # (B, nh, T, hs)


class LLaMAMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467).

    Normalises in float32 whatever the input dtype, as the reference LLaMA code does, because the
    mean of squares loses too much precision in bf16.
    """

    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache(nn.Module):
    """Keys and values of past tokens for one attention layer.

    Example: with a cache of shape (2, ng, 16, hs), prefill writes slots 0..9 with
    ``update(torch.arange(10), k, v)``, then each decoding step writes one slot, ``update(torch.tensor([10]), ...)``.
    The full cache is returned every time; the attention mask hides slots that were not written yet.
    """

    def __init__(self, shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, ng, T, hs) at slots ``input_pos`` (T,) and return the whole cache."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v

    def select_rows(self, rows: torch.Tensor) -> None:
        """Replace the cache by its rows ``rows`` (B',), in that order (a row may be repeated)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of (B, nh, T, hs) queries over (B, ng, L, hs) keys/values without copying them.

    The query heads that share a key/value head are folded into the query-length axis, so a decoding
    step attends over the cache as it is. Repeating k/v per query head instead copies the whole cache
    every step, which made batched CPU decoding several times slower.
    """
    B, nh, T, hs = q.shape
    ng = k.size(1)
    q = q.reshape(B, ng, (nh // ng) * T, hs)  # (B, ng, r*T, hs): row j*T + t is head j of the group at step t
    if mask.dtype == torch.bool:
        # As an additive mask in the queries' dtype: the same result to the bit, and CPU attention over a long
        # prefill ~30% faster than with the boolean one (24 vs 34 ms for 8 x 400 queries in bf16).
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    mask = mask.repeat(1, 1, nh // ng, 1)  # (B or 1, 1, r*T, L)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, ng, r*T, hs)
    return y.view(B, nh, T, hs)


def build_cache_mask(input_pos: torch.Tensor, slot_positions: torch.Tensor | None, cache_length: int) -> torch.Tensor:
    """Boolean attention mask (B or 1, 1, T, cache_length) for queries at slots ``input_pos``.

    A query may see cache slots at or before its own, except padding (``slot_positions`` -1). A padding query
    keeps its own slot so that its softmax row is never empty (an all-masked row would produce NaN).
    """
    slots = torch.arange(cache_length, device=input_pos.device)
    mask = slots[None, None, :] <= input_pos[None, :, None]  # (1, T, L)
    if slot_positions is not None:
        real = (slot_positions >= 0)[:, None, :]  # (B, 1, L)
        own_slot = slots[None, None, :] == input_pos[None, :, None]  # (1, T, L)
        mask = (mask & real) | own_slot  # (B, T, L)
    return mask.unsqueeze(1)  # (B, 1, T, L)


def left_padding_positions(pad_lengths: torch.Tensor, cache_length: int) -> torch.Tensor:
    """`GPT.forward`'s ``slot_positions`` (B, cache_length) for rows starting with ``pad_lengths`` (B,) pad tokens."""
    slots = torch.arange(cache_length, device=pad_lengths.device)
    positions = slots[None, :] - pad_lengths[:, None]  # (B, L)
    return positions.masked_fill(positions < 0, -1)


def build_rope_cache(
    seq_len: int,
    head_size: int,
    base: float = 10000.0,
    rope_scaling: dict[str, float] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of the rotary embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    Returns two (seq_len, head_size) float32 tensors in the "rotate half" layout: the frequency for
    dimension pair i sits at columns i and i + head_size/2. ``rope_scaling`` applies Llama-3.1's
    frequency-dependent scaling (https://github.com/meta-llama/llama-models, Llama 3.1 `apply_scaling`).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, device=device).float() / head_size))  # (hs/2,)
    if rope_scaling is not None:
        inv_freq = apply_llama3_rope_scaling(inv_freq, **rope_scaling)
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (T, hs/2)
    freqs = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return freqs.cos(), freqs.sin()


def apply_llama3_rope_scaling(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_seq_len: float,
) -> torch.Tensor:
    """Slow down low frequencies by ``factor``, keep high ones, interpolate in between (Llama 3.1)."""
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles ("rotate half" layout)."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, nh, T, hs)
    return (x * cos + rotated * sin).to(x.dtype)
