# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GPTQ weight quantization (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) in plain PyTorch.

GPTQ quantizes a linear layer's weight W (out, in) one input column at a time and, after each column,
spreads that column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H = 2/n X^T X of the layer's inputs X. It minimises the output error ||W X - Q X||^2 rather than the weight
error, which is why it needs calibration inputs::

    for each block of 128 columns:                    H^-1 = upper Cholesky factor of (H + damp I)^-1
        for each column i in the block:
            at a group start: scales/zeros from the group's current (error-updated) weights
            q_i   = quantize(w_i)
            err_i = (w_i - q_i) / H^-1[i, i]
            w_j  -= err_i * H^-1[i, j]   for the rest of the block       (lazy batch update ...)
        W[:, after block] -= Err @ H^-1[block, after block]              (... applied once per block)

The algorithm follows the reference implementation (https://github.com/IST-DASLab/gptq, Apache 2.0) and
AutoGPTQ's ``GPTQ.fasterquant`` and ``Quantizer`` (https://github.com/AutoGPTQ/AutoGPTQ, MIT): dead input
columns, damping by ``damp_percent`` of the mean diagonal, act_order (columns in order of decreasing
H[i, i], with ``g_idx`` giving each column's group in the original order), symmetric zero = 2**(bits-1).
Two small differences: a group's scale is computed from its error-updated weights also when it starts in the
middle of a 128-column block (the reference reads a stale copy there), and scales are rounded to float16
before use, so what GPTQ optimises is exactly what the checkpoint stores.

This file is the algorithm on one layer (`gptq_quantize`, and `round_to_nearest` for comparison). The model walk
with calibration data and per-layer reports is `lit_qa.quantize.gptq_model`; the packed format is
`lit_qa.quantize.int4`, and GPTQ folders on disk (lit-qa's and Hugging Face's) are `lit_qa.checkpoints.gptq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lit_qa.errors import LitQAError
from lit_qa.quantize.int4 import SUPPORTED_BITS, dequantize, pack, unpack

__all__ = ["GPTQConfig", "QuantizedWeight", "gptq_quantize", "round_to_nearest", "relative_error", "pack", "unpack",
           "dequantize"]  # fmt: skip

GROUP_SIZES = (32, 64, 128, -1)
BLOCK_SIZE = 128  # columns per lazy batch update; only speed depends on it


@dataclass
class GPTQConfig:
    """GPTQ settings; `to_quantize_config` writes them under AutoGPTQ's names.

    Attributes:
        bits: Bits per weight, 4 or 8.
        group_size: Input columns sharing one scale and zero point: 32, 64, 128, or -1 for one group per row.
            The last group of a row is shorter when it does not divide the input size (as in AutoGPTQ).
        sym: Symmetric quantization (zero point fixed at 2**(bits-1)); False fits a zero point per group.
        act_order: Quantize columns in order of decreasing activation energy (AutoGPTQ's ``desc_act``).
        damp_percent: Fraction of the Hessian's mean diagonal added to its diagonal for numerical stability.
        true_sequential: Quantize q/k/v, then o, then gate/up, then down, each with inputs that come through
            the already quantized layers. False quantizes all seven with the block's unquantized activations
            (2 instead of 5 passes over the calibration data per block).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.bits not in SUPPORTED_BITS:
            problems.append(f"bits={self.bits} is not supported (choose {' or '.join(map(str, SUPPORTED_BITS))})")
        if self.group_size not in GROUP_SIZES:
            problems.append(f"group_size={self.group_size} is not supported (choose one of {GROUP_SIZES})")
        if not 0 < self.damp_percent < 1:
            problems.append(f"damp_percent={self.damp_percent} must be between 0 and 1")
        if problems:
            raise LitQAError("invalid GPTQ settings: " + "; ".join(problems))

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def to_quantize_config(self, model_name_or_path: str | None = None) -> dict[str, Any]:
        """The ``quantize_config.json`` content AutoGPTQ (``BaseQuantizeConfig.to_dict``) writes."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.act_order,
            "static_groups": False,
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "model_name_or_path": model_name_or_path,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }


# ---------------------------------------------------------------------------------------------------------
# One layer: GPTQ and round-to-nearest


@dataclass
class QuantizedWeight:
    """A quantized (out, in) weight, unpacked.

    Attributes:
        q: Integer weights (out, in), uint8.
        scales: (n_groups, out) float32 holding float16-representable values.
        zeros: Integer zero points (n_groups, out), int32.
        g_idx: Group of each input column (in,), int32.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.g_idx, dtype)

    def pack(self, bits: int) -> dict[str, torch.Tensor]:
        return pack(self.q, self.scales, self.zeros, self.g_idx, bits)


def find_params(w: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point (rows,) covering the min/max of ``w`` (rows, cols), as AutoGPTQ's Quantizer.

    The range always includes 0. Symmetric: the range is [-max|w|, max|w|] and zero = 2**(bits-1). Asymmetric:
    zero = round(-min / scale), kept >= 1 because the v1 checkpoint format stores zero - 1 in ``bits`` bits.
    """
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if config.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)
    # Round to what the checkpoint stores, so the error GPTQ corrects is the real one.
    scale = ((xmax - xmin) / config.maxq).clamp(min=2**-24).half().float()
    if config.sym:
        zero = torch.full_like(scale, (config.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, config.maxq)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def round_to_nearest(weight: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Round-to-nearest baseline with the same groups, scales and zero points as GPTQ but no error correction."""
    W = weight.float()
    out_features, in_features = W.shape
    group_size = config.group_size if config.group_size != -1 else in_features
    q, scales, zeros = torch.empty_like(W, dtype=torch.uint8), [], []
    for start in range(0, in_features, group_size):
        group = W[:, start : start + group_size]
        scale, zero = find_params(group, config)
        q[:, start : start + group_size] = _quantize(group, scale[:, None], zero[:, None], config.maxq)
        scales.append(scale)
        zeros.append(zero)
    g_idx = torch.arange(in_features, dtype=torch.int32, device=W.device) // group_size
    return QuantizedWeight(q, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Quantize one weight matrix with GPTQ.

    Args:
        weight: The layer weight (out, in).
        hessian: 2/n X^T X (in, in) of the layer's n calibration input rows X (n, in).
        config: Bits, group size, symmetry, act_order and damping.

    Returns:
        The quantized weight; ``g_idx`` refers to the original column order also with ``act_order``.

    Raises:
        torch.linalg.LinAlgError: If the damped Hessian is not positive definite (too few calibration samples
            for the layer's width, or too little damping).
    """
    W = weight.float().clone()
    H = hessian.float().clone()
    out_features, in_features = W.shape
    group_size = config.group_size if config.group_size != -1 else in_features
    # Inputs that were always zero carry no information: any weight is as good, so make them 0.
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if config.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(config.damp_percent * H.diagonal().mean())
    # Row i of this upper factor holds the inverse-Hessian coefficients GPTQ needs once columns < i are fixed.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W, dtype=torch.uint8)
    scales, zeros = [], []
    for i1 in range(0, in_features, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                # At a block start W is up to date; inside a block the updated columns live in W1.
                # (Group sizes 32/64/128 divide BLOCK_SIZE, so a group starting inside a block ends in it.)
                current = W[:, col : col + group_size] if i == 0 else W1[:, i : i + group_size]
                scale, zero = find_params(current, config)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = _quantize(w, scale, zero, config.maxq)
            Q[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = torch.arange(in_features, dtype=torch.int32, device=W.device) // group_size
    if perm is not None:
        # Groups were formed in the permuted order; record each original column's group (AutoGPTQ's g_idx).
        invperm = torch.argsort(perm)
        Q, g_idx = Q[:, invperm], g_idx[invperm]
    return QuantizedWeight(Q, torch.stack(scales), torch.stack(zeros).to(torch.int32), g_idx)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||^2 / ||W X||^2 over the calibration inputs, computed from H = 2/n X^T X (the 2/n cancels)."""
    W, D, H = weight.float(), weight.float() - approx.float(), hessian.float()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp(min=1e-30))
