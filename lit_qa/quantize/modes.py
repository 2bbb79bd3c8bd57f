# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The ``--quantize`` modes: checking the flags (`check_quantize_args`, `check_qlora_args`), quantizing a loaded
model (`quantize_model`), measuring its weights (`weights_size_bytes`), and the record an adapter trained on a
quantized base keeps (`quantize_record`, `warn_if_trained_quantized`).

Loading a quantized model for inference is `lit_qa.checkpoints.inference.load_for_inference`.

Modes:

- ``bnb.int8``, ``bnb.nf4``, ``bnb.fp4``: bitsandbytes layers swapped in after loading (`lit_qa.quantize.bnb`).
  They run on CPU and CUDA, and serve as the frozen base of QLoRA (``finetune/lora.py --quantize bnb.nf4``).
  On CPU they save memory, not time.
- ``int8``, ``int4``: weight-only int8 (per channel) and round-to-nearest int4 (groups of 64) in plain torch kernels
  (`lit_qa.quantize.weight_only`), applied after loading: fewer bytes per decoding step, for generation and
  evaluation on CPU and CUDA. int4 computes with its kernel only for bf16 activations.
- ``gptq.int4``: a model quantized offline by ``scripts/quantize_gptq.py`` (`lit_qa.quantize.gptq`), loaded
  from ``--gptq_checkpoint`` instead of ``--checkpoint_dir``. Inference only.

A LoRA is evaluated quantized by merging it in full precision first and quantizing the merged model (the
exact quantizer the base would get). For a QLoRA adapter this is close to, not equal to, what it was trained
with (quantize(W + BA) instead of quantize(W) + BA). GPTQ needs calibration on the merged weights, so a LoRA
is first merged (``scripts/merge_lora.py``) and quantized (``scripts/quantize_gptq.py``), then evaluated with
``evaluate/base.py --quantize gptq.int4``.

bitsandbytes and the GPTQ code are imported only when their mode is used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from lit_qa.errors import LitQAError
from lit_qa.models.model import GPT
from lit_qa.quantize.bnb import BNB_MODES, bnb_statistics, import_bitsandbytes, quantize_bnb

QUANTIZE_CHOICES = ("bnb.int8", "bnb.nf4", "bnb.fp4", "int8", "int4", "gptq.int4")
# Written next to an adapter trained on a quantized base (QLoRA): {"mode": "bnb.nf4"}.
QUANTIZE_RECORD_FILE = "quantize.json"
WEIGHT_ONLY_MODES = ("int8", "int4")  # lit_qa.quantize.weight_only, imported only when one is used


def check_quantize_args(mode: str | None, gptq_checkpoint: str | Path | None = None) -> None:
    """Validate ``--quantize`` and ``--gptq_checkpoint`` before anything is loaded.

    Raises:
        LitQAError: On an unknown mode, gptq.int4 without an existing ``--gptq_checkpoint`` folder (or that flag
            without gptq.int4), or a bnb mode when bitsandbytes does not import.
    """
    if mode is not None and mode not in QUANTIZE_CHOICES:
        raise LitQAError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}; got {mode!r}")
    if mode == "gptq.int4":
        if gptq_checkpoint is None:
            raise LitQAError("--quantize gptq.int4 needs --gptq_checkpoint (a folder from scripts/quantize_gptq.py)")
        if not Path(gptq_checkpoint).is_dir():
            raise LitQAError(f"--gptq_checkpoint {gptq_checkpoint}: folder not found")
    elif gptq_checkpoint is not None:
        raise LitQAError("--gptq_checkpoint is only used with --quantize gptq.int4")
    if mode in BNB_MODES:
        try:
            import_bitsandbytes()
        except (ImportError, OSError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LitQAError(f"--quantize {mode} needs bitsandbytes, which does not import ({reason})") from None


def check_qlora_args(mode: str | None, fabric: object) -> None:
    """Validate ``finetune/lora.py --quantize``: a bitsandbytes mode, and no FSDP (checked on the Fabric built,
    so a strategy chosen by ``fabric run`` counts too).

    Raises:
        LitQAError: On gptq.int4 or an unknown mode, under FSDP, or when bitsandbytes does not import.
    """
    if mode is None:
        return
    from lightning.fabric.strategies import ModelParallelStrategy

    if mode not in BNB_MODES:
        raise LitQAError(f"QLoRA needs --quantize {' / '.join(BNB_MODES)}; got {mode!r} (gptq.int4 is inference only)")
    if isinstance(fabric.strategy, ModelParallelStrategy):
        raise LitQAError("--quantize does not work with --strategy fsdp (FSDP cannot shard bitsandbytes' packed "
                         "weights); use --strategy ddp or one device")  # fmt: skip
    check_quantize_args(mode)


def quantize_model(
    model: GPT, mode: str, for_training: bool = False, device: torch.device | str | None = None
) -> GPT:
    """Quantize ``model``'s block linears in place with a bitsandbytes mode (`lit_qa.quantize.bnb.quantize_bnb`) or
    a weight-only one (`lit_qa.quantize.weight_only.quantize_weight_only`, inference only).

    Args:
        model: A full-precision model (merge a LoRA into it first).
        mode: "bnb.int8", "bnb.nf4", "bnb.fp4", "int8" or "int4". gptq.int4 models are loaded, not converted:
            `lit_qa.checkpoints.inference.load_for_inference`.
        for_training: The model will be trained (QLoRA): keep the layers differentiable after eval-mode passes.
        device: Quantize each layer onto this device and move the rest of the model there too; None keeps it.

    Returns:
        ``model``, for chaining.

    Raises:
        LitQAError: On an unknown mode (or int8/int4 for training), or a model that is already quantized.
    """
    if mode in WEIGHT_ONLY_MODES and not for_training:
        from lit_qa.quantize.weight_only import quantize_weight_only

        # Quantized where the weights are (the CPU for load_for_inference), then moved: as for bitsandbytes, the
        # full-precision model never sits on the GPU.
        model = quantize_weight_only(model, mode)
        return model.to(device) if device is not None else model
    if mode not in BNB_MODES:
        raise LitQAError(f"quantize_model handles {', '.join(BNB_MODES + WEIGHT_ONLY_MODES)} (int8/int4 for "
                         f"inference only); got {mode!r}")  # fmt: skip
    quantize_bnb(model, mode, for_training=for_training, device=device)
    return model.to(device) if device is not None else model


def weights_size_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take in memory, for comparing quantization modes.

    Counts parameters (a tied one once) and persistent buffers at their storage size (a uint8 holding two
    4-bit codes counts one byte), plus the statistics bitsandbytes keeps outside parameters (row scales, block
    absmaxes, code tables). Caches that are not weights (RoPE, KV) are non-persistent buffers: not counted.
    """
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                tensors[id(buffer)] = buffer
        tensors.update((id(t), t) for t in bnb_statistics(module))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_record(mode: str | None) -> dict[str, dict[str, str]]:
    """The extra file for an adapter folder trained on a quantized base: ``{"quantize.json": {"mode": ...}}``,
    or nothing for a full-precision base. Pass it in ``save_lora_checkpoint(..., extra=...)``."""
    return {QUANTIZE_RECORD_FILE: {"mode": mode}} if mode else {}


def warn_if_trained_quantized(trained_dir: Path, mode: str | None) -> None:
    """Print a warning when an adapter trained on a quantized base (QLoRA) is evaluated with another ``--quantize``."""
    path = Path(trained_dir) / QUANTIZE_RECORD_FILE
    trained = json.loads(path.read_text()).get("mode") if path.is_file() else None
    if trained is not None and trained != mode:
        print(f"warning: {trained_dir} was trained on a {trained} base (QLoRA) but is evaluated with "
              f"--quantize {mode}; pass --quantize {trained} to evaluate it as trained", file=sys.stderr)  # fmt: skip
