# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""bitsandbytes quantization of the transformer blocks' linear layers, in place, on CPU or GPU.

Modes:

- ``bnb.int8``: LLM.int8 (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339), `bitsandbytes.nn.Linear8bitLt`.
  Weights are int8 with one absmax scale per output row; activation columns with a value above 6.0 (outlier
  features) are multiplied in 16-bit, the rest in int8.
- ``bnb.nf4`` / ``bnb.fp4``: 4-bit NormalFloat / FloatingPoint codes (QLoRA, Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314), `bitsandbytes.nn.Linear4bit`: one absmax per block of 64 weights, the
  absmaxes themselves quantized to 8 bits ("double quantization", §3). Compute in the model's dtype.

Only the block linears (``attn.q/k/v/o_proj``, ``mlp.gate/up/down_proj``) are quantized; the embedding, the
norms and ``lm_head`` stay as they are (the head is small next to the blocks, tied to the embedding in many
models, and the most sensitive layer). The quantized weight stays at the same state-dict key
(``...attn.q_proj.weight``, plus bitsandbytes' statistics next to it).

Fabric's ``BitsandbytesPrecision`` refuses CPUs, so the layers are swapped here instead, quantizing the loaded
weights directly (`quantize_bnb`). On the CPU, 4-bit needs ``in_features`` to be a multiple of 64 (every
LLaMA-family model's is; bitsandbytes 0.50's CPU kernels get other widths wrong). For QLoRA, quantize first,
then `lit_qa.models.lora.apply_lora`: the LoRA layer calls the quantized layer as its frozen base.

Merging a LoRA into a quantized weight is not exact (quantize(W + BA) != quantize(W) + BA), so the evaluation
scripts merge in full precision first and quantize the merged model; that is exactly what the base model gets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn as nn

from lit_qa.errors import LitQAError
from lit_qa.models.lora import LoRALinear

BNB_MODES = ("bnb.int8", "bnb.nf4", "bnb.fp4")
BLOCK_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
BLOCKSIZE = 64  # weights per 4-bit absmax block (QLoRA's setting)
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold on activation magnitudes (the paper's value)
# bitsandbytes' CPU inference layout for 4-bit weights tiles 32 output rows at a time.
_CPU_PACK_ROWS = 32

# Messages bitsandbytes logs that carry no information for our users: the optional CPU kernel package is
# missing (a slower fallback is used), and LLM.int8 casting activations to fp16 (what it always does), which
# it logs on every single matmul.
_QUIET = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes with its two noisy log messages filtered out (see ``_QUIET``)."""
    for logger_name, prefix in _QUIET.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    import bitsandbytes

    return bitsandbytes


def quantize_bnb(
    model: nn.Module, mode: str, for_training: bool = False, device: torch.device | str | None = None
) -> nn.Module:
    """Replace every block linear of ``model`` by its bitsandbytes counterpart, quantized from its weights.

    Args:
        model: A `lit_qa.models.model.GPT` with full-precision weights. Merged `lit_qa.models.lora.LoRALinear` layers
            are quantized like plain linears (their update is in the weight already).
        mode: "bnb.int8", "bnb.nf4" or "bnb.fp4".
        for_training: Keep every 4-bit layer in bitsandbytes' differentiable layout (QLoRA). On CPUs with
            AVX512-bf16, an eval-mode forward without gradients otherwise repacks the weight into an
            inference-only layout: ~5x faster decoding, but a later training forward through it returns no
            input gradient (silently), and saving a state dict repacks it lossily. Training toggles eval mode at
            every validation, so it must pass True.
        device: Quantize and place the new layers here (e.g. "cuda" for a model loaded on the CPU: the full
            weights never all sit on the GPU at once); None keeps each weight's device.

    Returns:
        ``model``, for chaining.

    Raises:
        LitQAError: On an unknown mode, a layer that is already quantized, an unmerged LoRA layer, or (4-bit on
            the CPU) a layer whose rows are not a multiple of 64 weights.
    """
    if mode not in BNB_MODES:
        raise LitQAError(f"unknown bitsandbytes mode {mode!r}; choose one of {', '.join(BNB_MODES)}")
    bnb = import_bitsandbytes()
    for parent, child_name, layer, name in block_linears(model):
        weight, bias = linear_weights(layer, name)
        weight = weight.detach().to(device) if device is not None else weight.detach()
        if mode != "bnb.int8" and weight.device.type == "cpu" and layer.in_features % BLOCKSIZE:
            # Measured with bitsandbytes 0.50.2: its CPU dequantization kernel gets such rows wrong (a
            # 2-3x larger error than the quantization itself), silently, in every forward and backward.
            raise LitQAError(f"{name} has rows of {layer.in_features} weights: bitsandbytes' CPU 4-bit kernels "
                             f"need a multiple of {BLOCKSIZE}; use bnb.int8 or a GPU")  # fmt: skip
        if mode == "bnb.int8":
            new = _linear8bit(bnb, layer, weight, bias)
        else:
            new = _linear4bit(bnb, layer, weight, bias, mode.removeprefix("bnb."), for_training)
        setattr(parent, child_name, new.train(layer.training))
    return model


def block_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """Every block's attention and MLP linear layers (`BLOCK_LINEARS`) as (parent module, attribute name, layer,
    name within the block), for swapping them in place."""
    for block in model.transformer.h:
        for name in BLOCK_LINEARS:
            parent_name, _, child_name = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            yield parent, child_name, getattr(parent, child_name), name


def linear_weights(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full-precision weight and bias of a plain or merged-LoRA linear layer; refuses anything else."""
    if isinstance(layer, LoRALinear) and not layer.merged:
        raise LitQAError(f"{name} has an unmerged LoRA: merge it first (merge_lora_weights), or quantize the base "
                         "before apply_lora for QLoRA")  # fmt: skip
    weight = getattr(layer, "weight", None)  # weight-only int8 / int4 layers have packed buffers instead
    if is_bnb_layer(layer) or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise LitQAError(f"{name} is already quantized ({type(layer).__name__}); quantize a full-precision model")
    return layer.weight, layer.bias


def _linear8bit(bnb: ModuleType, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    # Row-wise absmax int8 codes, quantized from fp16 as bitsandbytes' own Int8Params does.
    codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias is not None,
                              has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")  # fmt: skip
    new.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=row_scales)
    new.bias = None if bias is None else nn.Parameter(bias.detach().to(codes.device), requires_grad=False)
    # Linear4bit has this attribute; LoRA reads it to create its A/B tensors in the model's dtype.
    new.compute_dtype = weight.dtype
    return new


def _linear4bit(
    bnb: ModuleType,
    layer: nn.Module,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant_type: str,
    for_training: bool,
) -> nn.Module:
    codes, quant_state = bnb.functional.quantize_4bit(
        weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type=quant_type
    )
    new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias is not None, compute_dtype=weight.dtype,
                            compress_statistics=True, quant_type=quant_type, device="meta")  # fmt: skip
    new.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=quant_state, blocksize=BLOCKSIZE,
                                   compress_statistics=True, quant_type=quant_type, module=new,
                                   bnb_quantized=True)  # fmt: skip
    new.quant_state = quant_state
    new.bias = None if bias is None else nn.Parameter(bias.detach().to(codes.device), requires_grad=False)
    # The CPU inference layout (see `quantize_bnb`'s for_training) fails on shapes it cannot tile.
    if for_training or layer.out_features % _CPU_PACK_ROWS:
        new.support_avx512bf16_for_cpu = False
    return new


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer `quantize_bnb` puts in (checked by name: bitsandbytes may not be importable)."""
    cls = type(module)
    return cls.__name__ in ("Linear4bit", "Linear8bitLt") and cls.__module__.startswith("bitsandbytes")


def bnb_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a bitsandbytes layer keeps outside its parameters: the int8 row scales, or the 4-bit block
    absmaxes, code table and (double quantization) their own absmaxes and code table. Empty for other modules."""
    if not is_bnb_layer(module):
        return []
    if hasattr(module, "state"):  # Linear8bitLt: the scales move from the weight to `state` at the first forward
        scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
        return [scales] if scales is not None else []
    quant_state = module.weight.quant_state
    nested = getattr(quant_state, "state2", None) if quant_state.nested else None
    candidates = [quant_state.absmax, quant_state.code, quant_state.offset]
    if nested is not None:
        candidates += [nested.absmax, nested.code]
    return [t for t in candidates if isinstance(t, torch.Tensor)]
