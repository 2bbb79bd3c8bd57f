# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LLaMA-Adapter folders: ``lit_adapter.safetensors``, ``adapter_config.json`` and ``base_checkpoint.json``.

Loaded quantized, only the base's linear layers are quantized (`lit_qa.checkpoints.inference`) and the adapter
stays in full precision. The layers are in `lit_qa.models.adapter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lit_qa.checkpoints.finetuned import (
    BASE_RECORD_FILE,
    check_finetuned_dir,
    load_trained_tensors,
    read_base_record,
    resolve_base,
    save_finetuned_dir,
)
from lit_qa.checkpoints.folder import load_model
from lit_qa.errors import LitQAError
from lit_qa.models.adapter import KIND, AdapterConfig, adapter_state_dict, apply_adapter
from lit_qa.models.config import Config
from lit_qa.models.model import GPT

ADAPTER_WEIGHTS_FILE = "lit_adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, BASE_RECORD_FILE)


def save_adapter_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    adapter_config: AdapterConfig,
    base_checkpoint_dir: str | Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an adapter folder (`lit_qa.checkpoints.finetuned.save_finetuned_dir`): what `adapter_state_dict` holds as
    ``lit_adapter.safetensors``, ``adapter_config`` as ``adapter_config.json``, and ``base_checkpoint.json``.

    Call it on rank 0 only. Under FSDP, gather the shards on every rank first and pass them as ``tensors``:
    ``lit_qa.training.distributed.full_state_dict(adapter_state_dict(model))``.

    Args:
        out_dir: Folder to create.
        model: A model with the adapter applied.
        adapter_config: The config it was applied with.
        base_checkpoint_dir: The base checkpoint folder; its path, config and weights fingerprint are recorded.
        extra: More files, ``{file name: content}``: a `Path` is copied, anything else written as JSON.
        overwrite: Replace a non-empty ``out_dir``.
        tensors: The tensors to write instead of ``adapter_state_dict(model)``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If ``model`` has no adapter, or `save_finetuned_dir` refuses (no base checkpoint, a reserved
            ``extra`` name, a non-empty ``out_dir`` without ``overwrite``).
    """
    tensors = adapter_state_dict(model) if tensors is None else tensors
    if not tensors:
        raise LitQAError("the model has no adapter to save; call apply_adapter first")
    return save_finetuned_dir(
        out_dir, tensors, ADAPTER_WEIGHTS_FILE, adapter_config, ADAPTER_CONFIG_FILE, base_checkpoint_dir, extra,
        overwrite,
    )  # fmt: skip


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """Make sure a folder holds an adapter written by `save_adapter_checkpoint`.

    Raises:
        LitQAError: If the folder is missing or lacks one of its files; the message lists what it has.
    """
    return check_finetuned_dir(adapter_dir, ADAPTER_FILES, KIND)


def read_adapter_base_record(adapter_dir: str | Path) -> dict[str, Any]:
    """The contents of an adapter's ``base_checkpoint.json``: ``path``, ``lit_config`` and ``fingerprint``."""
    return read_base_record(check_adapter_dir(adapter_dir))


def load_adapter_checkpoint(
    adapter_dir: str | Path,
    base_checkpoint_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_different_base: bool = False,
    quantize: str | None = None,
    gptq_checkpoint: str | Path | None = None,
) -> tuple[GPT, Config, AdapterConfig]:
    """Load a base checkpoint with an adapter (v1 or v2, as its config says) on top, after checking they belong
    together.

    Quantized (``quantize``), only the base's linear layers are quantized and the adapter stays in the model's
    dtype: the adapter computes on the quantized layers' outputs (v2 scales and shifts them), so this is exactly
    the model one would serve; unlike LoRA there is nothing to merge first.

    Args:
        adapter_dir: A folder written by `save_adapter_checkpoint`.
        base_checkpoint_dir: The base checkpoint folder; None uses the path recorded in ``base_checkpoint.json``.
        device: Where the model should live.
        dtype: Cast the base weights (and the adapter tensors with them); None keeps the base's dtype.
        allow_different_base: Load even if the base weights are not those the adapter was trained on. The
            architecture must still match.
        quantize: "bnb.int8", "bnb.nf4", "bnb.fp4" (quantize the base after loading) or "gptq.int4" (load the base
            from ``gptq_checkpoint``, which scripts/quantize_gptq.py made from the same base); None: full precision.
        gptq_checkpoint: The GPTQ folder of the base, for ``quantize="gptq.int4"``.

    Returns:
        The model (in eval mode), its config and the `AdapterConfig`.

    Raises:
        LitQAError: If a file is missing or malformed, the base has another architecture or (unless
            ``allow_different_base``) other weights, or an adapter tensor is missing, unexpected or misshapen.
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    adapter_config = AdapterConfig.from_file(adapter_dir / ADAPTER_CONFIG_FILE)
    base = resolve_base(adapter_dir, base_checkpoint_dir, allow_different_base, KIND)
    if quantize is None:
        model, config = load_model(base, device=device, dtype=dtype)
    else:
        from lit_qa.checkpoints.inference import load_for_inference  # bitsandbytes / GPTQ code only when asked for

        model, config = load_for_inference(Path(base), str(device), dtype, quantize, gptq_checkpoint)
    apply_adapter(model, adapter_config)
    load_trained_tensors(
        model, adapter_dir / ADAPTER_WEIGHTS_FILE, adapter_state_dict(model), ADAPTER_CONFIG_FILE, KIND
    )
    return model.eval(), config, adapter_config
