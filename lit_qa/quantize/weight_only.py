# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Weight-only int8 and int4: fewer bytes per decoding step, for generation and evaluation.

Decoding one token reads every weight once, so its speed is set by the bytes moved, not by FLOPs (gpt-fast's
observation, https://github.com/pytorch-labs/gpt-fast, BSD-3). These modes store the block linears in fewer
bytes and compute with plain torch kernels, activations staying in the model's dtype:

- ``int8``: symmetric per-output-channel int8 (``w = scale[o] * q[o, i]``, q in -127..127), computed by
  ``torch.ops.aten._weight_int8pack_mm`` (CPU and CUDA, bf16/fp16/fp32 activations). Half the bytes of bf16.
- ``int4``: round-to-nearest groupwise int4 (`lit_qa.quantize.gptq.round_to_nearest`, groups of 64 input
  columns, an asymmetric zero point per group) in GPTQ's packed format, computed by `Int4Linear` (the int4
  kernel with bf16 activations; a quarter of the bytes). GPTQ (``--quantize gptq.int4``) fits the same format
  with error correction on calibration data; this mode needs none and runs at load time.

The model is quantized after loading and after a LoRA is merged (exact for LoRA); an adapter keeps its own
tensors in full precision around the quantized layers (`lit_qa.models.adapter`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_qa.errors import LitQAError
from lit_qa.quantize.bnb import block_linears, linear_weights
from lit_qa.quantize.gptq import GPTQConfig, round_to_nearest
from lit_qa.quantize.int4 import Int4Linear, move_buffers

WEIGHT_ONLY_MODES = ("int8", "int4")
# From this many input rows on (a long prefill), dequantizing for the call and a dense matmul beat the int8 kernel:
# 8.3 vs 24.4 ms for 2,640 rows of a 576 -> 1536 layer in bf16, even (4.8 ms each) at 512 rows (2-core AMD EPYC).
KERNEL_MAX_ROWS = 512
INT4_GROUP_SIZE = 64  # divides every LLaMA width (576 for SmolLM2, 4096, 5120, 8192) and the int4 kernel's groups


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one float scale per output channel (see the module docstring).

    ``qweight`` (out, in) int8 and ``scales`` (out,) float32 are persistent buffers; ``.to(dtype)`` leaves them as
    they are (the activations' dtype is applied per call), only the device changes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        """Quantize a (out, in) weight: each row scaled so its largest magnitude maps to 127, then rounded."""
        weight = weight.detach().float()
        layer = cls(weight.size(1), weight.size(0), bias=bias is not None).to(weight.device)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        layer.qweight.copy_(torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (out, in): ``scales[o] * qweight[o, i]``, computed in float32."""
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x.device.type in ("cpu", "cuda") and x2.size(0) < KERNEL_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))
        else:  # a long prefill (or another device): dequantized for this call, a dense matmul
            y = F.linear(x2, self.dense_weight(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        move_buffers(self, fn)
        return self


def int4_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP_SIZE
) -> Int4Linear:
    """A (out, in) weight quantized round-to-nearest to 4 bits in groups of ``group_size`` input columns."""
    quantized = round_to_nearest(weight.detach(), GPTQConfig(bits=4, group_size=group_size, sym=False))
    tensors = quantized.pack(4)
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16)
    return Int4Linear.from_packed(tensors, bits=4, group_size=group_size).to(weight.device)


def quantize_weight_only(model: nn.Module, mode: str) -> nn.Module:
    """Swap the block linears (attention and MLP, `lit_qa.quantize.bnb.BLOCK_LINEARS`) for ``mode``'s layers, in
    place, on the device they are on. Merged LoRA layers count as plain linears. The embedding and the output head
    stay as they are (tied in SmolLM2). Returns ``model``.

    Raises:
        LitQAError: On an unknown mode, an unmerged LoRA or an already quantized layer, or (int4) an input size
            the group size does not divide.
    """
    if mode not in WEIGHT_ONLY_MODES:
        raise LitQAError(f"weight-only quantization is one of {', '.join(WEIGHT_ONLY_MODES)}; got {mode!r}")
    for parent, child_name, layer, name in block_linears(model):
        weight, bias = linear_weights(layer, name)
        if mode == "int4" and layer.in_features % INT4_GROUP_SIZE:
            raise LitQAError(f"{name}: {layer.in_features} inputs are not a multiple of the int4 group size "
                             f"{INT4_GROUP_SIZE}")  # fmt: skip
        new = Int8Linear.from_weight(weight, bias) if mode == "int8" else int4_linear(weight, bias)
        setattr(parent, child_name, new)
    return model
