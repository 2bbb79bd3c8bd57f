# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The GPTQ packed weight format and `Int4Linear`, the layer that computes with it.

The format is AutoGPTQ's / GPTQModel's ``checkpoint_format: "gptq"`` (the "v1" zero-point convention), so
checkpoints move between them and lit-qa without conversion. For a linear layer with weight (out, in),
``bits`` 4 (or 8), ``per = 32 // bits`` values per int32 and ``n_groups = ceil(in / group_size)``::

    qweight  int32   (in // per, out)       row r holds inputs r*per .. r*per+per-1, input r*per+j in bits j*bits..
    qzeros   int32   (n_groups, out // per) zero points minus one, packed the same way along the output dim
    scales   float16 (n_groups, out)
    g_idx    int32   (in,)                  the group of each input column (not monotonic with act_order)

    weight[o, i] = scales[g, o] * (q[o, i] - zeros[g, o])   with g = g_idx[i]

The "zero minus one" storage is what AutoGPTQ's ``QuantLinear.pack`` writes and every v1 reader adds back
(``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py``, MIT license). A zero point of 0 is therefore not
representable; the quantizer in `lit_qa.quantize.gptq` never produces one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_BITS = (4, 8)
# (packed weight, scales_and_zeros, kernel group size, input column permutation or None)
_KernelWeight = tuple[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"]
# Group sizes the tinygemm int4 kernels accept, largest first.
_KERNEL_GROUP_SIZES = (256, 128, 64, 32)
# From this many input rows on (a long prefill), dequantizing the weight and a dense matmul beat the int4 kernel:
# 8.7 vs 16.1 ms for 2,640 rows of a 576 -> 1536 layer in bf16, 7.9 vs 3.0 ms for 512 (2-core AMD EPYC).
KERNEL_MAX_ROWS = 1024


def pack(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int = 4
) -> dict[str, torch.Tensor]:
    """Pack integer weights and their quantization parameters into the GPTQ format.

    Args:
        q: Integer weights (out, in), values in 0 .. 2**bits - 1.
        scales: Scales (n_groups, out); stored as float16.
        zeros: Integer zero points (n_groups, out), values in 1 .. 2**bits.
        g_idx: The group of each input column (in,).
        bits: 4 or 8.

    Returns:
        ``{"qweight", "qzeros", "scales", "g_idx"}`` as described in the module docstring.

    Raises:
        ValueError: For unsupported bits, values out of range, or sizes that cannot be packed.
    """
    _check_bits(bits)
    maxq = 2**bits - 1
    per = 32 // bits
    out_features, in_features = q.shape
    if in_features % per or out_features % per:
        raise ValueError(f"a ({out_features}, {in_features}) weight cannot be packed {per} values per int32")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > maxq):
        raise ValueError(f"integer weights must lie in 0..{maxq}")
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > maxq + 1):
        raise ValueError(f"zero points must lie in 1..{maxq + 1} (the format stores zero - 1 in {bits} bits)")
    return {
        "qweight": _pack_rows(q.t(), bits),  # (in // per, out)
        "qzeros": _pack_rows((zeros.to(torch.int64) - 1).t(), bits).t().contiguous(),  # (n_groups, out // per)
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of `pack`.

    Returns:
        ``(q, scales, zeros, g_idx)``: q (out, in) as uint8, scales (n_groups, out) float16, zeros (n_groups, out)
        int32 (the real zero points, i.e. stored value + 1), g_idx (in,) int32.
    """
    _check_bits(bits)
    q = _unpack_rows(qweight, bits).t().to(torch.uint8)  # (out, in)
    zeros = _unpack_rows(qzeros.t(), bits).t() + 1  # (n_groups, out)
    return q.contiguous(), scales, zeros.contiguous(), g_idx


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weight (out, in) from unpacked GPTQ values: ``scales[g] * (q - zeros[g])`` with ``g = g_idx[i]``.

    Computed in float32 and cast to ``dtype`` at the end, so the result does not depend on the target dtype's
    rounding of the intermediate terms.
    """
    g = g_idx.long()
    zeros = zeros.float()[g].t()  # (out, in)
    scales = scales.float()[g].t()  # (out, in)
    return ((q.float() - zeros) * scales).to(dtype)


def move_buffers(module: nn.Module, fn) -> None:  # noqa: ANN001 - what nn.Module._apply is given
    """Move ``module``'s buffers where ``fn`` sends tensors, each in its own dtype: packed layers keep their integer
    codes and scales as stored through ``.to(dtype)``. The device is found by applying ``fn`` to an empty integer
    tensor (dtype casts skip integers)."""
    device = fn(torch.empty(0, dtype=torch.int32, device=module.qweight.device)).device
    for name, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[name] = buffer.to(device)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {SUPPORTED_BITS}")


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (R, C) small integers into (R // per, C) int32, value j of each run of ``per`` rows at bit j * bits."""
    per = 32 // bits
    rows, cols = values.shape
    grouped = values.to(torch.int64).reshape(rows // per, per, cols)
    shifts = torch.arange(0, 32, bits, device=values.device).view(1, per, 1)
    packed = (grouped << shifts).sum(dim=1)  # (R // per, C), in [0, 2**32)
    # Reinterpret as signed int32, as AutoGPTQ's numpy ``astype(np.int32)`` of the uint32 words does.
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: (R // per, C) int32 to (R, C) int32."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32).view(1, per, 1)
    # The arithmetic shift drags the sign bit along; the mask keeps only the value's own bits.
    values = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)  # (R // per, per, C)
    return values.reshape(-1, packed.size(-1))


class Int4Linear(nn.Module):
    """A linear layer whose weight is stored in the GPTQ format (see the module docstring).

    The packed tensors are persistent buffers with AutoGPTQ's names, so ``state_dict()`` is the checkpoint
    format. The first forward for an activation dtype converts them once into what the matmul needs:

    * CPU, bf16 activations, 4 bits: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm layout), if the
      output size is a multiple of 16 and the groups are contiguous after sorting the input columns by group
      (always true for GPTQ's act_order; the input is then permuted the same way each call). The kernel is made
      for decoding: ~2x faster than a bf16 dense matmul for one token, but slower for a long prompt: from
      `KERNEL_MAX_ROWS` input rows on, the weight is dequantized for that call and multiplied densely instead.
    * CUDA, bf16 activations, 4 bits: ``torch.ops.aten._weight_int4pack_mm`` with the same conditions (output a
      multiple of 8, input a multiple of 32). This path is written after torchao/gpt-fast but has NOT been run:
      lit-qa's test machines have no GPU.
    * Anything else (fp32/fp16 activations, 8 bits, odd shapes): the weight is dequantized to the activation
      dtype once and cached (``cache_dense``, default True) and ``F.linear`` runs on it, exactly equal to a
      matmul with `dequantize`'s result. Without the cache every call dequantizes again: less memory, but
      single-token decoding then spends its time unpacking.

    The tinygemm kernels compute ``(q - 8) * scale + zero_float``; a GPTQ group maps onto that exactly with
    ``zero_float = scale * (8 - zero)``, up to bf16 rounding of scale and zero.

    ``.to(dtype)`` leaves the buffers' dtypes alone: the float16 scales are part of the format, and a cast to
    bf16 would lose three bits of every scale. Only the device changes.
    """

    def __init__(
        self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = False
    ) -> None:
        super().__init__()
        _check_bits(bits)
        per = 32 // bits
        if in_features % per or out_features % per:
            raise ValueError(f"a ({out_features}, {in_features}) weight cannot be packed {per} values per int32")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if group_size != -1 else in_features
        n_groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features // per, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // self.group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.use_kernel = True  # False forces the dense path (tests, benchmarks)
        self.cache_dense = True
        self._prepared_for: tuple[torch.device, torch.dtype] | None = None
        self._kernel: _KernelWeight | None = None
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], bits: int = 4, group_size: int = 128) -> Int4Linear:
        """A layer holding the tensors `pack` returned (plus an optional ``bias``)."""
        in_features, out_features = tensors["g_idx"].numel(), tensors["scales"].size(1)
        layer = cls(in_features, out_features, bits, group_size, bias="bias" in tensors)
        layer.load_state_dict(tensors)
        return layer

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, bits={self.bits}, group_size={self.group_size}"

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (out, in) in ``dtype``, equal to `dequantize` of the unpacked values."""
        # Same arithmetic as `dequantize`, but in the packed (in, out) layout: rows are gathered by group
        # and nothing is strided, which makes it about 3x faster.
        q = _unpack_rows(self.qweight, self.bits).float()  # (in, out)
        zeros = _unpack_rows(self.qzeros.t(), self.bits).t() + 1  # (n_groups, out)
        g = self.g_idx.long()
        weight = (q - zeros.float().index_select(0, g)) * self.scales.float().index_select(0, g)  # (in, out)
        return weight.to(dtype).t().contiguous()

    def prepare(self, dtype: torch.dtype) -> None:
        """Convert the packed weight once for activations of ``dtype``.

        `forward` calls it when the activation dtype or the device changed; calling it beforehand (as
        `lit_qa.checkpoints.gptq.load_gptq_model` does) keeps that work out of the first forward.
        """
        self._prepared_for = (self.qweight.device, dtype)
        self._kernel = self._dense = None
        if self.use_kernel:
            self._kernel = self._tinygemm_weight(dtype)
        if self._kernel is None and self.cache_dense:
            self._dense = self.dense_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_for != (self.qweight.device, x.dtype):
            self.prepare(x.dtype)
        if self._kernel is not None and x.numel() < KERNEL_MAX_ROWS * self.in_features:
            y = self._tinygemm_matmul(x)
        elif self._kernel is not None:  # a long prefill: dequantized on the fly, nothing kept
            y = F.linear(x, self.dense_weight(x.dtype))
        else:
            y = F.linear(x, self._dense if self._dense is not None else self.dense_weight(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        move_buffers(self, fn)
        self._prepared_for = None  # runtime weights were built for the old device
        self._kernel = self._dense = None
        return self

    def _tinygemm_weight(self, dtype: torch.dtype) -> _KernelWeight | None:
        """(packed weight, scales_and_zeros, kernel group size, input permutation), or None where no kernel applies."""
        device = self.qweight.device
        N, K = self.out_features, self.in_features
        if self.bits != 4 or dtype != torch.bfloat16 or device.type not in ("cpu", "cuda"):
            return None
        if N % (16 if device.type == "cpu" else 8):
            return None
        # A GPTQ group of 128 over 576 inputs (SmolLM2) is run as kernel groups of 64 sharing their scales.
        kernel_group = next((g for g in _KERNEL_GROUP_SIZES if self.group_size % g == 0 and K % g == 0), None)
        inner_k_tiles = next((t for t in (8, 4, 2) if K % (t * 16) == 0), None)
        if kernel_group is None or (device.type == "cuda" and inner_k_tiles is None):
            return None
        # The kernel needs each group's columns side by side; with act_order, sorting by group arranges that.
        g_idx = self.g_idx.long()
        contiguous = torch.arange(K, device=device) // self.group_size
        perm = None
        if not torch.equal(g_idx, contiguous):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], contiguous):
                return None  # groups of uneven sizes (e.g. hand-made g_idx): use the dense path
        q, scales, zeros, _ = unpack(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        if perm is not None:
            q = q[:, perm]
        repeat, n_kernel_groups = self.group_size // kernel_group, K // kernel_group
        scales = scales.float().repeat_interleave(repeat, dim=0)[:n_kernel_groups]  # (K // kernel_group, N)
        zeros = zeros.float().repeat_interleave(repeat, dim=0)[:n_kernel_groups]
        # tinygemm: w = (q - 8) * scale + zero_float
        # GPTQ:     w = scale * (q - zero) = scale * (q - 8) + scale * (8 - zero)
        scales_and_zeros = torch.stack([scales, scales * (8 - zeros)], dim=-1).to(torch.bfloat16).contiguous()
        q = q.to(torch.int32)
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # same layout for any tiling value
        else:
            # The CUDA op takes two 4-bit values per byte (torch >= 2.5), as torchao's int4 weight-only does.
            two_per_byte = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K // 2)
            packed = torch.ops.aten._convert_weight_to_int4pack(two_per_byte, inner_k_tiles)
        return packed, scales_and_zeros, kernel_group, perm

    def _tinygemm_matmul(self, x: torch.Tensor) -> torch.Tensor:
        packed, scales_and_zeros, kernel_group, perm = self._kernel
        x2 = x.reshape(-1, self.in_features)  # (B*T, in)
        if perm is not None:
            x2 = x2.index_select(1, perm)
        x2 = x2.contiguous()
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, kernel_group, scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, kernel_group, scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)
