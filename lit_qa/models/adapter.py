# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LLaMA-Adapter v1 and v2 for `lit_qa.models.model.GPT`: inject and train adapters (their folders:
`lit_qa.checkpoints.adapter`).

LLaMA-Adapter (Zhang et al. 2023, https://arxiv.org/abs/2303.16199) freezes the model and learns, in each of
the top layers, a short "adaption prompt": ``prompt_length`` embeddings that the layer's own key and value
projections turn into extra keys and values. Every query attends to them in a softmax of its own, and the
result enters the layer scaled by a zero-initialised gate per head, so training starts from the base model
exactly and the prompt's influence grows only as far as it helps (§3.2, "zero-init attention")::

    q, k, v = RoPE(q_proj(x)), RoPE(k_proj(x)), v_proj(x)       # the layer as it was
    k_p, v_p = k_proj(adapter_wte), v_proj(adapter_wte)          # the prompt: no RoPE, it has no position
    y = softmax(q k^T / sqrt(hs) + causal mask) v                # the layer as it was
      + adapter_gate * softmax(q k_p^T / sqrt(hs)) v_p           # every query sees the whole prompt
    out = o_proj(y)                                              # adapter_gate (one per head) starts at 0

LLaMA-Adapter V2 (Gao et al. 2023, https://arxiv.org/abs/2304.15010, §3.1 "bias tuning") also unfreezes the
RMSNorm weights and gives every linear layer (attention, MLP and output head) a trainable scale and bias,
``y = adapter_scale * (W x + adapter_bias)``, initialised to ones and zeros.

The design follows lit-llama's ``lit_llama/adapter.py``/``adapter_v2.py`` and litgpt's ``litgpt/adapter.py``/
``adapter_v2.py`` (Apache 2.0): the gate is applied without tanh, adapted layers are ``start_layer`` and up.
Unlike litgpt, the base weights keep their names (``transformer.h.5.attn.q_proj.weight``), so a base checkpoint
loads as it is and an adapter folder holds only ``...attn.adapter_wte``, ``...attn.adapter_gate`` and, for v2,
the ``adapter_bias``/``adapter_scale`` vectors and the norm weights.

Typical use::

    model, config = load_model(checkpoint_dir)
    apply_adapter(model, AdapterConfig(version=2))
    mark_only_adapter_as_trainable(model)
    ...  # train
    save_adapter_checkpoint(out_dir, model, adapter_config, checkpoint_dir)

An adapter cannot be merged into the weights (the prompt is an attention input), so evaluation runs the
model with the adapter modules in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config, read_method_config
from lit_qa.models.model import GPT, CausalSelfAttention

# The last name of every tensor an adapter adds, and (v2) the parent modules whose weights it unfreezes.
ADAPTER_TENSORS = ("adapter_wte", "adapter_gate", "adapter_bias", "adapter_scale")
NORMS = ("norm_1", "norm_2", "ln_f")
KIND = "LLaMA-Adapter"  # in messages


@dataclass
class AdapterConfig:
    """Which LLaMA-Adapter and where; saved next to the adapter weights.

    Attributes:
        version: 1 trains the adaption prompts and their gates only; 2 also trains a scale and a bias on every
            linear layer and the RMSNorm weights.
        prompt_length: Embeddings in each layer's adaption prompt (the paper uses 10).
        start_layer: First adapted layer; layers ``start_layer`` to ``n_layer - 1`` get a prompt. lit-llama
            uses 2 (of 32); the paper adapts only top layers, "with higher-level semantics".
    """

    version: Literal[1, 2] = 1
    prompt_length: int = 10
    start_layer: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one `LitQAError` listing every invalid value."""
        problems = []
        if self.version not in (1, 2):
            problems.append(f"adapter version must be 1 or 2, got version={self.version}")
        if self.prompt_length < 1:
            problems.append(f"adapter prompt_length must be >= 1, got prompt_length={self.prompt_length}")
        if self.start_layer < 0:
            problems.append(f"adapter start_layer must be >= 0, got start_layer={self.start_layer}")
        if problems:
            raise LitQAError("; ".join(problems))

    @classmethod
    def from_file(cls, path: str | Path) -> AdapterConfig:
        """Read an ``adapter_config.json``, failing with the file name on bad content."""
        return read_method_config(cls, path, KIND)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


class AdapterAttention(CausalSelfAttention):
    """Causal self-attention plus a gated attention over a learned prompt (LLaMA-Adapter, arXiv 2303.16199, §3.2).

    Takes over the q/k/v/o projections of the layer it replaces (the same modules, so the same Parameters and
    state-dict names) and adds ``adapter_wte`` (prompt_length, n_embd) and ``adapter_gate`` (n_head,).
    """

    def __init__(
        self, base: CausalSelfAttention, config: Config, prompt_length: int, like: torch.Tensor | None = None
    ) -> None:
        """Adopt ``base``'s projections; the adapter tensors are created on the device and in the dtype of ``like``
        (default: the query projection's weight; pass the embedding when the projections are quantized).

        Args:
            base: The attention layer to adapt. Its projections are shared, not copied.
            config: The model's config.
            prompt_length: Number of prompt embeddings.
            like: A floating-point tensor whose device and dtype the adapter tensors take.
        """
        # Built on meta, the parent's fresh projections cost neither memory nor initialisation; they are
        # replaced by the base's own right away.
        with torch.device("meta"):
            super().__init__(config)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.kv_cache = base.kv_cache
        w = base.q_proj.weight if like is None else like
        self.adapter_wte = nn.Parameter(torch.empty(prompt_length, config.n_embd, device=w.device, dtype=w.dtype))
        self.adapter_gate = nn.Parameter(torch.empty(config.n_head, device=w.device, dtype=w.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise the prompt and the gate only; named so that FSDP's meta-device materialisation calls it.

        The prompt is N(0, 1), `nn.Embedding`'s default that lit-llama's and the reference code's prompts get:
        the scale of the normalised hidden states that k_proj and v_proj see. The gate starts at zero, so a
        fresh adapter leaves the output unchanged.
        """
        nn.init.normal_(self.adapter_wte)
        nn.init.zeros_(self.adapter_gate)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        y = super().attend(q, k, v, mask)  # (B, nh, T, hs)
        B, aT = q.size(0), self.adapter_wte.size(0)
        # Recomputed at every call (a few rows through two projections): a cached copy could go stale
        # between optimizer steps.
        ak = self.k_proj(self.adapter_wte).view(1, aT, self.n_query_groups, self.head_size).transpose(1, 2)
        av = self.v_proj(self.adapter_wte).view(1, aT, self.n_query_groups, self.head_size).transpose(1, 2)
        repeats = self.n_head // self.n_query_groups
        ak = ak.repeat_interleave(repeats, dim=1).expand(B, -1, -1, -1)  # (B, nh, aT, hs)
        av = av.repeat_interleave(repeats, dim=1).expand(B, -1, -1, -1)  # (B, nh, aT, hs)
        # Every query sees the whole prompt, padding rows of a batch included: no causal or padding mask, and
        # a softmax of its own, so the prompt never takes attention away from the real tokens.
        ay = F.scaled_dot_product_attention(q, ak, av)  # (B, nh, T, hs)
        gate = self.adapter_gate.view(1, self.n_head, 1, 1)
        # In y's dtype, so the layers after see what the base model's would; a zero gate adds exactly zero.
        return y + (gate * ay).to(y.dtype)

    def extra_repr(self) -> str:
        return f"prompt_length={self.adapter_wte.size(0)}"


class AdapterV2Linear(nn.Module):
    """A frozen linear layer with a trainable scale and bias (LLaMA-Adapter V2, arXiv 2304.15010, §3.1).

    ``y = adapter_scale * (W x + adapter_bias)`` with the scale at one and the bias at zero, so a fresh layer
    computes exactly what the base did. As in `lit_qa.models.lora.LoRALinear`, the base weight is registered on this
    module under its own name (the very Parameter, so a tied head keeps sharing the embedding).
    """

    def __init__(self, base: nn.Module, like: torch.Tensor | None = None) -> None:
        """Wrap ``base``: a linear layer whose parameters are shared, or a quantized one (bitsandbytes, GPTQ
        `lit_qa.quantize.int4.Int4Linear`), kept whole as the submodule ``base_layer`` and called as it is.
        The scale and bias take ``like``'s device and dtype (default: the base weight's)."""
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if is_quantized(base):
            self.base_layer = base
        else:
            self.base_layer = None
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
        w = base.weight if like is None else like
        self.adapter_bias = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        self.adapter_scale = nn.Parameter(torch.empty(self.out_features, device=w.device, dtype=w.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Scale 1, bias 0: the identity on the frozen layer's output. The weight comes from the base checkpoint."""
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        # Under mixed precision the scale and bias are float32: compute in it, hand on the layer's dtype.
        return (self.adapter_scale * (out + self.adapter_bias)).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def apply_adapter(model: GPT, adapter_config: AdapterConfig) -> GPT:
    """Add LLaMA-Adapter layers to ``model`` in place: `AdapterAttention` in layers ``start_layer`` and up, and
    for version 2 an `AdapterV2Linear` in place of every linear layer (all blocks and the output head).

    The base Parameters are shared, so loaded weights, weight tying and the state-dict names stay.

    Args:
        model: The model to adapt.
        adapter_config: Version, prompt length and first adapted layer.

    Returns:
        ``model``, for chaining.

    Raises:
        LitQAError: If ``start_layer`` leaves no layer to adapt, or the model already has adapters.
    """
    n_layer = model.config.n_layer
    if adapter_config.start_layer >= n_layer:
        raise LitQAError(
            f"adapter start_layer={adapter_config.start_layer} leaves no layer to adapt: "
            f"{model.config.name or 'the model'} has layers 0..{n_layer - 1}"
        )
    if adapter_version(model):
        raise LitQAError("the model already has adapters; apply_adapter was called twice")
    # The adapter tensors follow the embedding's device and dtype, which stay full precision in quantized models.
    like = model.transformer.wte.weight
    for block in model.transformer.h[adapter_config.start_layer :]:
        # New modules start in training mode; keep the model's mode.
        attn = AdapterAttention(block.attn, model.config, adapter_config.prompt_length, like)
        block.attn = attn.train(block.attn.training)
    if adapter_config.version == 2:
        linears = [name for name, module in model.named_modules() if is_linear(module)]
        for name in linears:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, child_name)
            setattr(parent, child_name, AdapterV2Linear(layer, like).train(layer.training))
    return model


def is_linear(module: nn.Module) -> bool:
    """A linear layer, full precision or quantized: bitsandbytes layers subclass nn.Linear; GPTQ's
    `lit_qa.quantize.int4.Int4Linear` does not, and is known by its packed ``qweight`` (models/ sits below
    quantize/ and does not import it)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "qweight", None), torch.Tensor)


def is_quantized(layer: nn.Module) -> bool:
    """Whether a linear layer's weight holds codes only its own forward can compute with (bitsandbytes int8/4-bit,
    or GPTQ's packed buffers, which have no ``weight`` at all)."""
    weight = getattr(layer, "weight", None)
    return not isinstance(weight, torch.Tensor) or not weight.is_floating_point()


def adapter_version(model: nn.Module) -> int:
    """2 if ``model`` has LLaMA-Adapter V2 layers, 1 if only v1 prompts, 0 if no adapter."""
    modules = list(model.modules())
    if any(isinstance(m, AdapterV2Linear) for m in modules):
        return 2
    return 1 if any(isinstance(m, AdapterAttention) for m in modules) else 0


def adapter_filter(key: str, version: int = 1) -> bool:
    """Whether a parameter or state-dict name belongs to what an adapter of ``version`` trains: the prompts,
    gates, scales and biases, and for version 2 also the RMSNorm weights."""
    parts = key.split(".")
    if parts[-1] in ADAPTER_TENSORS:
        return True
    return version == 2 and len(parts) >= 2 and parts[-2] in NORMS


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    """Freeze everything but what the model's adapter trains (`adapter_filter`), including a tied embedding."""
    version = adapter_version(model)
    for name, param in model.named_parameters():
        param.requires_grad = adapter_filter(name, version)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors the model's adapter trains, by state-dict name; what an adapter checkpoint holds."""
    version = adapter_version(model)
    return {key: value for key, value in model.state_dict().items() if adapter_filter(key, version)}
