# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Loading a model for generation or evaluation: full precision, quantized by bitsandbytes after loading, or
from a GPTQ folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lit_qa.checkpoints.folder import load_model
from lit_qa.models.config import Config
from lit_qa.models.model import GPT
from lit_qa.quantize.modes import quantize_model


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
