# Copyright lit-qa authors. Licensed under the Apache License 2.0.
r"""Low-Rank Adaptation (LoRA) for `lit_qa.models.model.GPT`: inject, train and merge adapters.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W and learns a
low-rank update B @ A next to it. Only A and B are trained and saved, a few MB instead of GBs.
Diagram adapted from lit-llama's ``lit_llama/lora.py`` (Apache 2.0)::

                 ┌───────────────────┐
                 ┆         h         ┆      h = W x + (alpha / r) * B A dropout(x)
                 └───────────────────┘
                           ▲
                           |
                           +
                        /     \
    ┌─────────────────┐    ╭───────────────╮     Initialization:
    ┆                 ┆     \      B      /      B = 0 (so training starts from the base model)
    ┆   pretrained    ┆      \   out*r   /       A = Kaiming-uniform
    ┆    weights      ┆       ╰─────────╯
    ┆                 ┆       |    r    |        r = rank, e.g. 8
    ┆  W (out x in)   ┆       | ◀─────▶ |
    ┆     frozen      ┆       ╭─────────╮
    └─────────────────┘      /     A     \
              ▲             /    r*in     \
               \           ╰───────────────╯
                \                ▲
                 \              /
                  ┌───────────────────┐
                  ┆         x         ┆
                  └───────────────────┘

Typical use::

    model, config = load_model(checkpoint_dir)
    apply_lora(model, LoRAConfig(r=8, alpha=16, query=True, value=True))
    mark_only_lora_as_trainable(model)
    ...  # train
    save_lora_checkpoint(out_dir, model, lora_config, checkpoint_dir)

Saving and loading LoRA folders is `lit_qa.checkpoints.lora`; ``scripts/merge_lora.py`` folds the adapter into a
full checkpoint folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_qa.errors import LitQAError
from lit_qa.models.config import read_method_config
from lit_qa.models.model import GPT

# LoRAConfig flag -> the linear layers it targets inside each block (names as in lit_qa.models.model).
BLOCK_TARGETS = {
    "query": ("attn.q_proj",),
    "key": ("attn.k_proj",),
    "value": ("attn.v_proj",),
    "projection": ("attn.o_proj",),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


@dataclass
class LoRAConfig:
    """Rank, scaling and target layers of a LoRA adapter; saved next to the adapter weights.

    Attributes:
        r: Rank of the update B @ A. The paper finds r = 4..8 enough for attention weights (§7.2).
        alpha: The update is scaled by alpha / r, so changing r does not require retuning the learning rate (§4.1).
        dropout: Dropout on the input of the LoRA path only (the frozen path sees x unchanged).
        query: Adapt the attention query projection ``attn.q_proj``.
        key: Adapt the key projection ``attn.k_proj``.
        value: Adapt the value projection ``attn.v_proj``.
        projection: Adapt the attention output projection ``attn.o_proj``.
        mlp: Adapt the three MLP layers ``mlp.gate_proj``, ``mlp.up_proj`` and ``mlp.down_proj``.
        head: Adapt the output head ``lm_head``. With tied embeddings only the output path changes; the
            input embedding stays as it is.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"LoRA rank must be >= 1, got r={self.r}")
        if self.alpha <= 0:
            problems.append(f"LoRA alpha must be > 0, got alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"LoRA dropout must be in [0, 1), got dropout={self.dropout}")
        if not any(getattr(self, flag) for flag in (*BLOCK_TARGETS, "head")):
            problems.append("LoRA needs at least one target: set query, key, value, projection, mlp or head")
        if problems:
            raise LitQAError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def target_names(self, n_layer: int) -> list[str]:
        """Full names of the linear layers to adapt, e.g. ``transformer.h.0.attn.q_proj``."""
        names = [
            f"transformer.h.{i}.{layer}"
            for i in range(n_layer)
            for flag, layers in BLOCK_TARGETS.items()
            if getattr(self, flag)
            for layer in layers
        ]
        return names + ["lm_head"] if self.head else names

    @classmethod
    def from_file(cls, path: str | Path) -> LoRAConfig:
        """Read a ``lora_config.json``, failing with the file name on bad content."""
        return read_method_config(cls, path, "LoRA")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685, §4.1).

    ``h = W x + (alpha / r) * B A dropout(x)``, with A (r, in) Kaiming-uniform and B (out, r) zero, so a
    fresh adapter leaves the model's output unchanged. The base weight is registered on this module as
    ``weight`` (the very Parameter of the replaced `nn.Linear`), so the base checkpoint's key names and
    weight tying stay as they are: ``attn.q_proj.weight``, not litgpt's ``attn.q_proj.linear.weight``.

    Merging is explicit (`merge`), never a side effect of ``train()``/``eval()``: lit-llama merged on
    ``eval()`` and unmerged on ``train()``, and W + BA - BA drifted away from W over many evaluations.

    QLoRA: when ``base`` is quantized (its weight is not floating point, e.g. `bitsandbytes.nn.Linear4bit` from
    `lit_qa.quantize.bnb`), it is kept as the submodule ``base_layer`` and called in `forward`; A and B take its
    ``compute_dtype``. Their keys stay ``...q_proj.lora_A``. Such a layer cannot be merged (`merge` raises).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        """Wrap ``base``'s weight (and bias); the LoRA tensors are created on its device and in its dtype.

        Args:
            base: The linear layer to adapt. Its parameters are shared, not copied. A quantized layer is kept whole.
            r: Rank of the update.
            alpha: Scale numerator: the update is multiplied by alpha / r.
            dropout: Dropout probability on the LoRA path's input.
        """
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.scaling = r, alpha / r
        device = base.weight.device
        if base.weight.is_floating_point():
            self.base_layer = None
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
            dtype = base.weight.dtype
        else:
            # QLoRA (Dettmers et al. 2023): the weight holds quantized codes (`lit_qa.quantize.bnb`) that only the
            # layer's own forward computes with, so the frozen base stays a submodule and is called as it is.
            self.base_layer = base
            dtype = base.compute_dtype
        # On the meta device these are shape-only placeholders, initialised after `to_empty`.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise A and B only; the frozen weight always comes from the base checkpoint.

        Named like `nn.Linear.reset_parameters` so that FSDP's meta-device materialisation calls it.
        """
        # nn.Linear's own init for A (as the reference implementation, microsoft/LoRA, does); B = 0 makes
        # the initial update zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.merged:
            return out
        # (..., in) @ (in, r) @ (r, out): never materialises the (out, in) product B @ A.
        return out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B @ A, shape (out, in), computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into ``weight`` in place, once; later calls do nothing.

        The sum is formed in float32 and rounded once to the weight's dtype. With a tied head, untie
        first (`merge_lora_weights` does) or the input embedding changes too.
        """
        if self.merged:
            return
        if self.base_layer is not None:
            raise LitQAError("cannot merge LoRA into a quantized base: quantize(W + BA) != quantize(W) + BA; "
                             "merge into the full-precision base (scripts/merge_lora.py) and quantize the result")
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, merged={self.merged}"


def apply_lora(model: GPT, lora_config: LoRAConfig) -> GPT:
    """Replace the targeted `nn.Linear` layers of ``model`` by `LoRALinear` in place.

    The new layers share the old weight Parameters, so loaded weights, tying and the state-dict names
    stay. On the meta device the LoRA tensors are created on meta as well; after ``model.to_empty(...)``
    call `reset_lora_parameters` (FSDP materialisation calls `LoRALinear.reset_parameters` itself).

    Args:
        model: The model to adapt.
        lora_config: Rank, scaling and targets.

    Returns:
        ``model``, for chaining.

    Raises:
        LitQAError: If a target already is a `LoRALinear` (LoRA applied twice).
    """
    for name in lora_config.target_names(model.config.n_layer):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        if isinstance(layer, LoRALinear):
            raise LitQAError(f"{name} already has LoRA; apply_lora was called twice")
        lora_layer = LoRALinear(layer, lora_config.r, lora_config.alpha, lora_config.dropout)
        # New modules start in training mode; an eval-mode model must not start applying LoRA dropout.
        setattr(parent, child_name, lora_layer.train(layer.training))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def reset_lora_parameters(model: nn.Module) -> None:
    """Initialise every LoRA A/B afresh, e.g. after ``model.to_empty(device=...)`` on a meta-built model."""
    for layer in lora_layers(model):
        layer.reset_parameters()


def lora_filter(key: str, value: Any = None) -> bool:
    """Whether a state-dict entry belongs to a LoRA adapter (``...lora_A`` or ``...lora_B``)."""
    return key.rpartition(".")[2] in ("lora_A", "lora_B")


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA A/B tensors (``requires_grad``), including a tied embedding."""
    for name, param in model.named_parameters():
        param.requires_grad = lora_filter(name)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors of ``model`` by state-dict name; what an adapter checkpoint holds."""
    return {key: value for key, value in model.state_dict().items() if lora_filter(key, value)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (a tied embedding counted once), or of its trainable ones only."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def merge_lora_weights(model: GPT) -> bool:
    """Merge every `LoRALinear` of ``model`` into its weight; calling it again does nothing.

    A LoRA on a tied head would also change the input embedding when merged in place, so the head first
    gets a weight of its own and ``model.config`` is replaced by a copy with ``tie_embeddings=False``.
    A config object the caller holds is not changed: save ``model.config`` (or set the flag yourself).

    Returns:
        Whether the head was untied.
    """
    untied = False
    head = model.lm_head
    if isinstance(head, LoRALinear) and not head.merged and head.weight is model.transformer.wte.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config = replace(model.config, tie_embeddings=False)
        untied = True
    for layer in lora_layers(model):
        layer.merge()
    return untied
