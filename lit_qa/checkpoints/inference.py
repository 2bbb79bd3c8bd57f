# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Loading a model for generation or evaluation: full precision, quantized by bitsandbytes after loading, or
from a GPTQ folder; a LoRA merged into its base first (`load_lora_for_inference`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import check_lora_dir, load_lora_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, merge_lora_weights
from lit_qa.models.model import GPT
from lit_qa.quantize.modes import check_quantize_args, quantize_model, warn_if_trained_quantized


def load_for_inference(
    checkpoint_dir: Path,
    device: str,
    dtype: torch.dtype | None,
    quantize: str | None = None,
    gptq_checkpoint: Path | None = None,
) -> tuple[GPT, Config]:
    """Load a model for generation or evaluation: full precision, quantized by bitsandbytes after loading, or
    a GPTQ checkpoint (``--quantize gptq.int4`` reads ``gptq_checkpoint``, not ``checkpoint_dir``).

    For bitsandbytes the full-precision weights are loaded on the CPU and each layer is quantized onto
    ``device``, so the unquantized model never sits on the GPU.
    """
    if quantize == "gptq.int4":
        from lit_qa.checkpoints.gptq import load_gptq_model  # the GPTQ code is needed for this mode only

        return load_gptq_model(gptq_checkpoint, device, dtype)
    if quantize is None:
        return load_model(checkpoint_dir, device=device, dtype=dtype)
    if quantize == "int4" and dtype != torch.bfloat16:
        print(f"note: --quantize int4 computes with the int4 kernel only with bf16 activations; in {dtype} its weights "
              "are dequantized once and kept dense (no speed-up, no memory saved)", file=sys.stderr)  # fmt: skip
    model, config = load_model(checkpoint_dir, device="cpu", dtype=dtype)
    return quantize_model(model, quantize, device=device), config


def check_lora_inference(lora_dir: Path, quantize: str | None, gptq_checkpoint: Path | None = None) -> None:
    """The checks before a LoRA is loaded for inference (`load_lora_for_inference`), so that they cost nothing: the
    folder's files, a ``quantize`` mode that applies to the merged model, and a warning when the LoRA was trained
    on a base quantized otherwise (QLoRA, `warn_if_trained_quantized`).

    Raises:
        LitQAError: If ``lora_dir`` is not a LoRA folder, or for gptq.int4 (GPTQ calibrates on the merged weights, so
            it is made of the merged folder) or another bad ``quantize`` / ``gptq_checkpoint``.
    """
    check_lora_dir(lora_dir)
    if quantize == "gptq.int4":
        raise LitQAError("a LoRA is not loaded with --quantize gptq.int4 (GPTQ calibrates on the merged weights): "
                         "merge with scripts/merge_lora.py, quantize the merged folder with scripts/quantize_gptq.py, "
                         "then run evaluate/base.py --quantize gptq.int4 --gptq_checkpoint <that output>")  # fmt: skip
    check_quantize_args(quantize, gptq_checkpoint)
    warn_if_trained_quantized(lora_dir, quantize)


def load_lora_for_inference(
    lora_dir: Path,
    base_checkpoint_dir: Path,
    device: str,
    dtype: torch.dtype | None,
    quantize: str | None = None,
    allow_different_base: bool = False,
) -> tuple[GPT, Config, LoRAConfig]:
    """Load a base model plus the LoRA in ``lora_dir`` and merge it into the weights (the same maths as running it
    unmerged, with no extra matmuls); with ``quantize`` (a bitsandbytes or weight-only mode), quantize the merged model.

    Merging into already quantized weights is not exact, so with ``quantize`` the model is loaded and merged on the
    CPU in full precision, then quantized layer by layer onto ``device``: quantize(W + BA), close to but not the
    quantize(W) + BA a QLoRA was trained as. Run `check_lora_inference` first.
    """
    load_device = "cpu" if quantize else device
    model, config, lora_config = load_lora_checkpoint(lora_dir, base_checkpoint_dir, load_device, dtype,
                                                      allow_different_base)  # fmt: skip
    merge_lora_weights(model)  # the sum is formed in float32 and rounded once to the weights' dtype
    if quantize:
        quantize_model(model, quantize, device=device)
    return model, config, lora_config
