# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""A learned no-answer head: is this question answerable from this passage?

Every strong SQuAD 2.0 system since BERT decides answerability with a classifier on the model's hidden states,
trained together with the span objective. Here it reads the residual stream of a few middle layers at the last
prompt token (where the answer's first token is predicted), each layer's vector RMS-normalised and standardised
per feature (mean and spread over training prompts, fitted once before training), averaged, and mapped to one
logit by a linear layer (or a 2-layer MLP)::

    h = mean_l (rmsnorm(x_l[last prompt token]) - mean_l) / std_l     l in config.layers (a few middle layers)
    z = w . h + b                                                      logit of "unanswerable"; p_na = sigmoid(z)

Training adds ``loss_weight * BCE(z, is_unanswerable)`` (one term per sample) to the answer loss, and the
gradient flows back into whatever else trains (LoRA, adapter, every weight), so the layers below learn features
the head can use. The no-answer string stays a training target of its own: free greedy decoding
(``--na_threshold off``) and the span-vs-no-answer score still need it, and it costs a few tokens per sample.

The head is a submodule of the model (``model.na_head``), so DDP, FSDP2, the optimizer and exact resume treat it like
every other trainable weight. It is saved beside the method's weights as ``na_head.safetensors`` plus
``na_head_config.json`` and attached again at evaluation (`lit_qa.checkpoints.na_head.load_na_head`). Middle layers,
because the answerability probe (scripts/probe_answerability.py) found them the most informative on SmolLM2 (layer 17
of 30 was best, AUC 0.685 before any training).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_qa.errors import LitQAError
from lit_qa.models.config import read_method_config

PREFIX = "na_head."  # its parameters' names in the model's state dict


@dataclass
class NAHeadConfig:
    """Where the no-answer head reads and how it is trained; saved next to its weights.

    Attributes:
        layers: Transformer blocks (0-based) whose outputs at the last prompt token are averaged; None picks
            `default_layers` (three middle blocks, e.g. 15, 17, 19 of SmolLM2's 30).
        hidden_size: 0 for a linear head; > 0 for a 2-layer MLP with this many GELU units.
        loss_weight: Weight of the head's binary cross-entropy (mean over samples) next to the answer loss (mean
            over answer tokens).
        lr_scale: The head's learning rate is the run's times this: it starts from scratch, while the adapter
            nudges a pretrained model.
        standardize_samples: Before training, standardise each feature by its mean and spread over this many
            training prompts (`standardize_na_head`; one forward pass each); 0 skips it.
    """

    layers: list[int] | None = None
    hidden_size: int = 0
    loss_weight: float = 1.0
    lr_scale: float = 1.0
    standardize_samples: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.layers is not None and (not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers)):
            problems.append(f"na_head layers must be a non-empty list of block indices >= 0, got {self.layers}")
        if self.hidden_size < 0:
            problems.append(f"na_head hidden_size must be >= 0, got {self.hidden_size}")
        if self.loss_weight < 0:
            problems.append(f"na_head loss_weight must be >= 0, got {self.loss_weight}")
        if self.standardize_samples < 0 or self.standardize_samples == 1:
            problems.append(f"na_head standardize_samples must be 0 or >= 2, got {self.standardize_samples}")
        if self.lr_scale <= 0:
            problems.append(f"na_head lr_scale must be > 0, got {self.lr_scale}")
        if problems:
            raise LitQAError("; ".join(problems))

    def resolved(self, n_layer: int) -> NAHeadConfig:
        """This config with concrete layers for a model of ``n_layer`` blocks (what is saved)."""
        layers = sorted(set(self.layers)) if self.layers is not None else default_layers(n_layer)
        if layers[-1] >= n_layer:
            raise LitQAError(f"na_head layers {layers} must be below the model's {n_layer} blocks")
        return replace(self, layers=layers)

    @classmethod
    def from_file(cls, path: str | Path) -> NAHeadConfig:
        """Read a ``na_head_config.json``, failing with the file name on bad content."""
        return read_method_config(cls, path, "no-answer head")


def default_layers(n_layer: int) -> list[int]:
    """Three blocks around 57% of the depth (where the probe found SmolLM2's best, block 17 of 30), spaced by
    about a fifteenth of the depth: 15, 17, 19 for 30 blocks; 16, 18, 20 for 32; fewer for tiny models."""
    center, step = round(n_layer * 17 / 30), max(1, n_layer // 15)
    return sorted({min(n_layer - 1, max(0, center + k * step)) for k in (-1, 0, 1)})


class NoAnswerHead(nn.Module):
    """Maps the chosen layers' hidden states at one position per row to the logit of "unanswerable"."""

    def __init__(self, n_embd: int, config: NAHeadConfig) -> None:
        super().__init__()
        if config.layers is None:
            raise ValueError("NoAnswerHead needs concrete layers: pass config.resolved(n_layer)")
        self.config = config
        self.layers = tuple(config.layers)
        # Per-layer, per-feature mean and spread of the normalised states (`fit_standardization`): the residual
        # stream has a few huge dimensions, and without this a linear head under Adam barely sees the rest.
        self.register_buffer("mean", torch.zeros(len(self.layers), n_embd))
        self.register_buffer("std", torch.ones(len(self.layers), n_embd))
        if config.hidden_size:
            self.proj = nn.Sequential(nn.Linear(n_embd, config.hidden_size), nn.GELU(),
                                      nn.Linear(config.hidden_size, 1))  # fmt: skip
        else:
            self.proj = nn.Linear(n_embd, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Starts at p_na = 0.5 for every question, so the first steps do not push the adapter around.
        for module in self.proj.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def features(self, states: list[torch.Tensor]) -> torch.Tensor:
        """(L, B, n_embd) float32: each layer's state RMS-normalised (residual streams grow with depth)."""
        return torch.stack([F.rms_norm(s.float(), (s.size(-1),)) for s in states])

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        """``states``: one (B, n_embd) tensor per layer in `layers`; returns (B,) float32 logits."""
        z = (self.features(states) - self.mean.float()[:, None]) / self.std.float()[:, None]  # (L, B, n_embd)
        weight = next(self.proj.parameters())
        return self.proj(z.mean(dim=0).to(weight.dtype))[:, 0].float()

    @torch.no_grad()
    def fit_standardization(self, states: list[torch.Tensor]) -> None:
        """Set `mean` and `std` from the states (one (N, n_embd) tensor per layer) of N training prompts, as the
        probe standardises its features; called once before training, so the same data gives the same head."""
        features = self.features(states)  # (L, N, n_embd)
        self.mean.copy_(features.mean(dim=1))
        self.std.copy_(features.std(dim=1).clamp(min=0.1))


def attach_na_head(model: nn.Module, config: NAHeadConfig) -> NoAnswerHead:
    """Give ``model`` (a `lit_qa.models.model.GPT`) a freshly initialised, trainable no-answer head; call it after
    marking what the method trains (which freezes everything else). Returns the head."""
    head = NoAnswerHead(model.config.n_embd, config.resolved(model.config.n_layer))
    weight = model.transformer.wte.weight
    model.na_head = head.to(device=weight.device if weight.device.type != "meta" else "cpu")
    head.requires_grad_(True)
    return head


def na_head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head's tensors by state-dict name (``na_head.proj.weight`` ...); empty without a head."""
    return {key: value for key, value in model.state_dict().items() if key.startswith(PREFIX)}


def na_loss_sum(logits: torch.Tensor, unanswerable: torch.Tensor) -> torch.Tensor:
    """Summed binary cross-entropy of (B,) head logits against (B,) 0/1 labels (1 = unanswerable)."""
    return F.binary_cross_entropy_with_logits(logits.float(), unanswerable.float(), reduction="sum")


def last_prompt_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last prompt token in a right-padded (B, T) batch: the position just before the first
    label that is not -100 (the answer's first token). A row without any label gets its last position."""
    has_label = labels != -100
    first = has_label.int().argmax(dim=1)  # (B,) first answer token; 0 for a row without labels
    first = torch.where(has_label.any(dim=1), first, torch.full_like(first, labels.size(1)))
    return (first - 1).clamp(min=0)


def answer_start_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): the last prompt token of every question in a (B, T) batch, i.e. each position whose label is
    -100 while the next one's is not. One per row in a plain batch (`last_prompt_positions`), one per segment in a
    packed one (`lit_qa.data.packing`); in row-major order, the order of the questions."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = (labels[:, :-1] == -100) & (labels[:, 1:] != -100)
    return mask
