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

The model is quantized block by block (`quantize_model`): only one transformer block and the calibration
activations need to be on the accelerator, so a model of any size can be quantized from CPU memory.

Checkpoints are written in AutoGPTQ's packed format (`lit_qa.quantize.int4`), with lit-qa tensor names
(`save_gptq_checkpoint`) or Hugging Face names that AutoGPTQ/GPTQModel/transformers read (`export_hf_gptq`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lit_qa.checkpoint import EMBEDDING_KEY, TIED_KEY, write_folder_atomically
from lit_qa.config import CONFIG_FILE, Config
from lit_qa.convert_hf import (
    HF_CONFIG_FILE,
    _read_shard,
    _weight_files,
    config_from_hf,
    config_to_hf,
    hf_to_lit_key,
    lit_to_hf_key,
    tokenizer_files,
)
from lit_qa.errors import LitQAError
from lit_qa.model import GPT, build_rope_cache
from lit_qa.quantize.int4 import SUPPORTED_BITS, Int4Linear, dequantize, pack, unpack

__all__ = [
    "GPTQConfig", "QuantizedWeight", "LayerReport", "gptq_quantize", "round_to_nearest", "relative_error",
    "quantize_model", "gptq_state_dict", "save_gptq_checkpoint", "load_gptq_state", "load_gptq_model",
    "load_hf_gptq", "export_hf_gptq", "import_hf_gptq", "pack", "unpack", "dequantize",
]  # fmt: skip

GPTQ_WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
PACKED_NAMES = ("qweight", "qzeros", "scales", "g_idx")
GROUP_SIZES = (32, 64, 128, -1)
BLOCK_SIZE = 128  # columns per lazy batch update; only speed depends on it
# Linear layers quantized together: with true_sequential, each group sees inputs produced by the already
# quantized layers before it (o_proj's inputs come from quantized q/k/v), as AutoGPTQ does.
SEQUENTIAL_GROUPS = (
    ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    ("attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


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
def quantize_model(
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


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folders in lit-qa naming


def gptq_state_dict(model: GPT, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a GPTQ checkpoint: packed ``<layer>.qweight`` etc. for quantized layers, everything else as is.

    The tied output head (``lm_head.weight`` when the embeddings are tied) is left out, as in `save_checkpoint`.
    """
    state = {
        key: value
        for key, value in model.state_dict().items()
        if key.removesuffix(".weight") not in packed and not (key == TIED_KEY and model.config.tie_embeddings)
    }
    for name, tensors in packed.items():
        state.update({f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()})
    return state


def save_gptq_checkpoint(
    out_dir: str | Path,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    quantize_config: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a GPTQ checkpoint folder with lit-qa tensor names, all or nothing.

    The folder holds ``model.safetensors`` (`gptq_state_dict`), ``lit_config.json``, ``quantize_config.json``
    (AutoGPTQ's fields) and the ``extra_files`` (tokenizer). `load_gptq_model` reads it; `export_hf_gptq`
    turns it into a folder AutoGPTQ, GPTQModel and transformers load.

    Args:
        out_dir: Folder to create.
        config: The model config.
        state_dict: The tensors, e.g. from `gptq_state_dict`.
        quantize_config: E.g. ``GPTQConfig.to_quantize_config(base_checkpoint_dir)``.
        extra_files: Files to copy in, as ``{name in the folder: source path}``.
        overwrite: Replace a non-empty ``out_dir``.

    Raises:
        LitQAError: If ``out_dir`` is not empty and ``overwrite`` is False.
    """
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / GPTQ_WEIGHTS_FILE, metadata={"format": "pt"})
        config.save(tmp / CONFIG_FILE)
        (tmp / QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def load_gptq_state(gptq_dir: str | Path) -> tuple[Config, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a folder written by `save_gptq_checkpoint`: (model config, quantize config, tensors on the CPU).

    Raises:
        LitQAError: If the folder or one of its three files is missing or unreadable, or the quantize config
            describes a format lit-qa cannot read.
    """
    path = Path(gptq_dir)
    if not path.is_dir():
        raise LitQAError(f"GPTQ checkpoint folder {path} does not exist")
    missing = [name for name in (CONFIG_FILE, QUANTIZE_CONFIG_FILE, GPTQ_WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise LitQAError(f"{path} is not a GPTQ checkpoint: missing {', '.join(missing)} (it has: {present})")
    config = Config.from_checkpoint(path)
    quantize_config = _read_json(path / QUANTIZE_CONFIG_FILE)
    check_quantize_config(quantize_config, path / QUANTIZE_CONFIG_FILE)
    return config, quantize_config, _read_safetensors(path / GPTQ_WEIGHTS_FILE)


def check_quantize_config(values: Any, source: str | Path) -> tuple[int, int]:
    """Check a GPTQ quantization config (ours, AutoGPTQ's or transformers') describes a readable format.

    Returns:
        ``(bits, group_size)``.

    Raises:
        LitQAError: For another method (AWQ ...), another packing (marlin, GPTQModel's gptq_v2), or bits other than 4/8.
    """
    if not isinstance(values, dict):
        raise LitQAError(f"{source}: expected a JSON object with the quantization settings")
    method = str(values.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise LitQAError(f"{source}: quant_method {method!r} is not supported (only 'gptq')")
    # AutoGPTQ assumes "gptq" when the field is missing; is_marlin_format is its older marker for marlin.
    fmt = str(values.get("checkpoint_format", "gptq")).lower()
    if fmt != "gptq" or values.get("is_marlin_format"):
        fmt = fmt if fmt != "gptq" else "marlin"
        raise LitQAError(f"{source}: checkpoint_format {fmt!r} is not supported (only 'gptq', the v1 packing)")
    bits, group_size = values.get("bits"), values.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise LitQAError(f"{source}: bits={bits} is not supported (only {' or '.join(map(str, SUPPORTED_BITS))})")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise LitQAError(f"{source}: group_size={group_size!r} must be -1 or a positive integer")
    return bits, group_size


def load_gptq_model(
    gptq_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config]:
    """Build a `GPT` whose quantized linear layers are `Int4Linear` modules from a GPTQ checkpoint folder.

    Reads a folder written by `save_gptq_checkpoint`, or a Hugging Face GPTQ folder (``config.json`` with a
    ``quantization_config``, as AutoGPTQ/GPTQModel/transformers write them; see `load_hf_gptq`).

    Args:
        gptq_dir: The folder.
        device: Where the model should live.
        dtype: dtype of the activations and the unquantized weights (None keeps the saved dtype). On CPU,
            ``torch.bfloat16`` uses torch's int4 kernel; other dtypes keep a dequantized copy of each weight.

    Returns:
        The model (in eval mode) and its config.

    Raises:
        LitQAError: One line naming the folder and the problem: missing files, missing or unexpected tensors,
            wrong shapes, an unsupported format or bit width.
    """
    path = Path(gptq_dir)
    is_hf = (path / HF_CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file()
    config, quantize_config, state = load_hf_gptq(path) if is_hf else load_gptq_state(path)
    model = check_gptq_state(config, quantize_config, state, path)
    if config.tie_embeddings:
        state[TIED_KEY] = state[EMBEDDING_KEY]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_rope_cache(device=torch.device("cpu"))  # the RoPE buffers were created on meta
    model.to(device=device, dtype=dtype)
    model.reset_rope_cache(device=torch.device(device))
    activation_dtype = model.transformer.wte.weight.dtype
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.prepare(activation_dtype)  # once here, not in the first forward
    return model.eval(), config


def check_gptq_state(
    config: Config, quantize_config: dict[str, Any], state: dict[str, torch.Tensor], source: str | Path
) -> GPT:
    """Check GPTQ tensors against the model they claim to be, and return that model (`Int4Linear` layers) on meta.

    A layer counts as quantized when its ``qweight`` is present; any linear layer may be (GPTQModel can quantize
    the head too).

    Raises:
        LitQAError: One line listing missing and unexpected tensors, wrong shapes and g_idx out of range, or an
            unsupported quantization config.
    """
    bits, group_size = check_quantize_config(quantize_config, source)
    quantized = sorted(key.removesuffix(".qweight") for key in state if key.endswith(".qweight"))
    model = _build_quantized_model(config, quantized, bits, group_size, source)
    _check_shapes(state, model, config, source)
    return model


def _build_quantized_model(config: Config, quantized: list[str], bits: int, group_size: int, source: str | Path) -> GPT:
    """A GPT on the meta device with `Int4Linear` in place of each layer named in ``quantized``."""
    with torch.device("meta"):
        model = GPT(config)
        for name in quantized:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise LitQAError(f"{source}: {name}.qweight does not belong to a linear layer of the model")
            if name == "lm_head" and config.tie_embeddings:
                raise LitQAError(f"{source}: the output head is quantized but tied to the (unquantized) embeddings")
            try:
                has_bias = linear.bias is not None
                layer = Int4Linear(linear.in_features, linear.out_features, bits, group_size, bias=has_bias)
            except ValueError as e:
                raise LitQAError(f"{source}: {name}: {e}") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def _check_shapes(state: dict[str, torch.Tensor], model: GPT, config: Config, source: str | Path) -> None:
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop(TIED_KEY)
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing tensors {_short_list(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected tensors {_short_list(unexpected)}")
    for key in sorted(state.keys() & expected.keys()):
        if state[key].shape != expected[key]:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key])}")
        elif key.endswith(".g_idx") and len(state[key]):
            n_groups = expected[key.removesuffix("g_idx") + "scales"][0]
            if int(state[key].min()) < 0 or int(state[key].max()) >= n_groups:
                problems.append(f"{key} refers to groups outside 0..{n_groups - 1}")
    if problems:
        raise LitQAError(f"{source} does not match its config ({config.name or 'unnamed'}): " + "; ".join(problems))


def _short_list(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LitQAError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LitQAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Hugging Face / AutoGPTQ naming
#
# Only names change. lit-qa's q_proj/k_proj rows are already in Hugging Face's "rotate half" RoPE layout
# (lit_qa/convert_hf.py copies them unchanged), so no row permutation, and hence no permutation of qweight
# columns, scales or qzeros, is needed in either direction.


def _lit_to_hf_gptq_key(key: str) -> str:
    base, _, suffix = key.rpartition(".")
    if suffix in PACKED_NAMES or (suffix == "bias" and base):
        return lit_to_hf_key(f"{base}.weight").removesuffix(".weight") + f".{suffix}"
    return lit_to_hf_key(key)


def _hf_to_lit_gptq_key(key: str) -> str:
    base, _, suffix = key.rpartition(".")
    if suffix in PACKED_NAMES or suffix == "bias":
        return hf_to_lit_key(f"{base}.weight").removesuffix(".weight") + f".{suffix}"
    return hf_to_lit_key(key)


def export_hf_gptq(gptq_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a lit-qa GPTQ folder with Hugging Face names, the layout AutoGPTQ, GPTQModel and transformers load.

    The folder gets ``model.safetensors`` (``model.layers.0.self_attn.q_proj.qweight`` ...), ``config.json``
    with a ``quantization_config``, ``quantize_config.json`` and the tokenizer files. Tensors are not changed.

    Raises:
        LitQAError: If the source is not a readable GPTQ folder, or ``out_dir`` is not empty without ``overwrite``.
    """
    config, quantize_config, state = load_gptq_state(gptq_dir)
    check_gptq_state(config, quantize_config, state, gptq_dir)
    hf_state = {_lit_to_hf_gptq_key(key): value.contiguous() for key, value in state.items()}
    # float16 is what GPTQ kernels compute in (the scales are float16); unquantized tensors keep their dtype.
    hf_config = config_to_hf(config, torch.float16, Path(gptq_dir))
    hf_config["quantization_config"] = quantize_config
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(hf_state, tmp / GPTQ_WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name, source in tokenizer_files(gptq_dir).items():
            shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def load_hf_gptq(hf_dir: str | Path, name: str | None = None) -> tuple[Config, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a Hugging Face GPTQ folder (AutoGPTQ, GPTQModel, transformers) with lit-qa tensor names.

    The quantization settings come from ``config.json``'s ``quantization_config``, else ``quantize_config.json``.

    Returns:
        The model config, the quantization config (as found) and the tensors (on the CPU).

    Raises:
        LitQAError: If the folder is not a LLaMA model quantized with GPTQ in the v1 ("gptq") format.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / HF_CONFIG_FILE
    if not config_path.is_file():
        raise LitQAError(f"{config_path} not found; is {hf_dir} a Hugging Face model folder?")
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise LitQAError(f"{config_path}: expected a JSON object")
    config = config_from_hf(hf_config, name or hf_dir.name, config_path)
    quantize_config, source = hf_config.get("quantization_config"), config_path
    if quantize_config is None and (hf_dir / QUANTIZE_CONFIG_FILE).is_file():
        quantize_config, source = _read_json(hf_dir / QUANTIZE_CONFIG_FILE), hf_dir / QUANTIZE_CONFIG_FILE
    if quantize_config is None:
        raise LitQAError(
            f"{hf_dir} is not a quantized model: no quantization_config in config.json and no quantize_config.json"
        )
    check_quantize_config(quantize_config, source)
    state = {}
    for path in _weight_files(hf_dir):
        for key, tensor in _read_shard(path):
            if key.endswith(".rotary_emb.inv_freq") or (config.tie_embeddings and key == TIED_KEY):
                continue
            state[_hf_to_lit_gptq_key(key)] = tensor
    return config, quantize_config, state


def import_hf_gptq(hf_dir: str | Path, out_dir: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Turn a Hugging Face GPTQ folder into a lit-qa GPTQ folder (names change, tensors do not).

    Args:
        hf_dir: The Hugging Face folder (see `load_hf_gptq`).
        out_dir: Folder to write.
        name: Name for the `Config`; defaults to ``hf_dir``'s name.
        overwrite: Replace a non-empty ``out_dir``.

    Raises:
        LitQAError: If the source is unreadable or does not fit its config, or ``out_dir`` is not empty without
            ``overwrite``.
    """
    config, quantize_config, state = load_hf_gptq(hf_dir, name)
    check_gptq_state(config, quantize_config, state, hf_dir)
    return save_gptq_checkpoint(out_dir, config, state, quantize_config, tokenizer_files(hf_dir), overwrite)


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
