# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GPTQ over a whole model: calibration inputs run block by block, each block's linear layers quantized in
sequence (`lit_qa.quantize.gptq.gptq_quantize`) with a report per layer.

Only one transformer block and the calibration activations need to be on the accelerator, so a model of any
size can be quantized from CPU memory. The result is written by `lit_qa.checkpoints.gptq.save_gptq_checkpoint`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from lit_qa.errors import LitQAError
from lit_qa.models.model import GPT, build_rope_cache
from lit_qa.quantize.gptq import GPTQConfig, gptq_quantize, relative_error, round_to_nearest

# Linear layers quantized together: with true_sequential, each group sees inputs produced by the already
# quantized layers before it (o_proj's inputs come from quantized q/k/v), as AutoGPTQ does.
SEQUENTIAL_GROUPS = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


# ---------------------------------------------------------------------------------------------------------
# A whole model, block by block


@dataclass
class LayerReport:
    """What quantizing one linear layer did: output error of GPTQ and of round-to-nearest, and GPTQ's time."""

    name: str
    error: float
    rtn_error: float
    seconds: float


@torch.no_grad()
def gptq_quantize_model(
    model: GPT,
    calibration: list[torch.Tensor],
    config: GPTQConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[LayerReport]]:
    """Quantize every linear layer of the transformer blocks with GPTQ (embeddings, norms and head stay as they are).

    The blocks are processed in order. Each one is moved to ``device`` in float32, its layers' Hessians are
    collected from the calibration activations, its layers are quantized and their weights replaced by the
    dequantized ones, and the calibration activations are pushed through it (now quantized) as inputs for the
    next block. The model itself can stay on the CPU.

    Args:
        model: The model; its linear weights are overwritten with their dequantized values.
        calibration: 1-D token tensors, one per sample (any lengths up to the model's block_size).
        config: GPTQ settings.
        device: Where a block and the calibration activations live while they are worked on.
        progress: Show a progress bar over the blocks.

    Returns:
        The packed tensors of each quantized layer by module name (``transformer.h.0.attn.q_proj`` ...), on the
        CPU, and one `LayerReport` per layer.

    Raises:
        LitQAError: If the calibration set is empty or a layer's Hessian cannot be inverted.
    """
    if not calibration:
        raise LitQAError("no calibration samples")
    device = torch.device(device)
    mc = model.config
    cos, sin = build_rope_cache(max(len(s) for s in calibration), mc.head_size, mc.rope_base, mc.rope_scaling, device)
    wte = model.transformer.wte
    inputs = [wte(ids.to(wte.weight.device)[None]).to(device, torch.float32) for ids in calibration]  # (1, T, C) each
    groups = SEQUENTIAL_GROUPS if config.true_sequential else (sum(SEQUENTIAL_GROUPS, ()),)
    packed, reports = {}, []
    bar = tqdm(model.transformer.h, desc="GPTQ", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        home, dtype = block.norm_1.weight.device, block.norm_1.weight.dtype
        block.to(device, torch.float32)
        first = len(reports)
        for names in groups:
            layers = {f"transformer.h.{i}.{name}": block.get_submodule(name) for name in names}
            hessians = _collect_hessians(block, layers, inputs, cos, sin)
            for name, layer in layers.items():
                packed[name], report = _quantize_layer(name, layer, hessians.pop(name), config)
                reports.append(report)
        inputs = [block(x, cos[: x.size(1)], sin[: x.size(1)]) for x in inputs]
        block.to(home, dtype)
        bar.set_postfix(max_error=f"{max(r.error for r in reports[first:]):.4f}")
    return packed, reports


class _StopForward(Exception):
    """Raised by a hook once every layer of interest has seen its input."""


def _collect_hessians(
    block: nn.Module, layers: dict[str, nn.Linear], inputs: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Run the calibration activations through ``block`` and return 2/n X^T X of each layer's inputs."""
    device = inputs[0].device
    sums = {name: torch.zeros(layer.in_features, layer.in_features, device=device) for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)
    seen = set()

    def accumulate(name: str, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, module.in_features).float()  # (tokens, in)
        sums[name].addmm_(x.t(), x)
        counts[name] += x.size(0)
        seen.add(name)
        if len(seen) == len(layers):
            raise _StopForward  # the rest of the block is not needed: halves the time of true_sequential

    handles = [layer.register_forward_pre_hook(partial(accumulate, name)) for name, layer in layers.items()]
    try:
        for x in inputs:
            seen.clear()
            try:
                block(x, cos[: x.size(1)], sin[: x.size(1)])
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] * (2 / counts[name]) for name in layers}


def _quantize_layer(
    name: str, layer: nn.Linear, hessian: torch.Tensor, config: GPTQConfig
) -> tuple[dict[str, torch.Tensor], LayerReport]:
    weight = layer.weight.detach().float()
    start = time.perf_counter()
    try:
        quantized = gptq_quantize(weight, hessian, config)
    except torch.linalg.LinAlgError:
        raise LitQAError(
            f"{name}: the damped Hessian is not positive definite; use more calibration samples or a larger "
            "damp_percent"
        ) from None
    seconds = time.perf_counter() - start
    dense = quantized.dequantize()
    error = relative_error(weight, dense, hessian)
    rtn_error = relative_error(weight, round_to_nearest(weight, config).dequantize(), hessian)
    layer.weight.copy_(dense)
    packed = {key: value.cpu() for key, value in quantized.pack(config.bits).items()}
    return packed, LayerReport(name, error, rtn_error, seconds)


def packed_size(packed: dict[str, dict[str, torch.Tensor]]) -> tuple[int, int]:
    """Bytes of the packed tensors, and bytes the same weights take in float16."""
    size = sum(t.numel() * t.element_size() for tensors in packed.values() for t in tensors.values())
    fp16 = sum(2 * t["g_idx"].numel() * t["scales"].size(1) for t in packed.values())
    return size, fp16


def summarize(reports: list[LayerReport], worst: int = 5) -> str:
    """A text table of per-layer errors: mean/max over layers and per projection type, and the worst layers."""
    lines = [f"{'layers':24} {'GPTQ mean':>10} {'GPTQ max':>10} {'RTN mean':>10} {'seconds':>8}"]
    kinds = sorted({r.name.rsplit(".", 1)[-1] for r in reports})
    for kind, subset in [("all", reports)] + [(k, [r for r in reports if r.name.endswith("." + k)]) for k in kinds]:
        lines.append(
            f"{kind:24} {_mean(r.error for r in subset):10.5f} {max(r.error for r in subset):10.5f} "
            f"{_mean(r.rtn_error for r in subset):10.5f} {sum(r.seconds for r in subset):8.1f}"
        )
    lines.append(f"worst {worst} layers (relative output error, GPTQ vs round-to-nearest):")
    for r in sorted(reports, key=lambda r: r.error, reverse=True)[:worst]:
        lines.append(f"  {r.name:40} {r.error:.5f}  (RTN {r.rtn_error:.5f})")
    return "\n".join(lines)


def _mean(values: Any) -> float:
    values = list(values)
    return math.fsum(values) / len(values)
