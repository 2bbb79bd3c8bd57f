# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LoRA folders: ``lit_lora.safetensors`` (only the A/B tensors), ``lora_config.json`` (r, alpha, targets: what
is needed to rebuild the layers) and ``base_checkpoint.json`` (which base model the adapter belongs to).

``scripts/merge_lora.py`` folds the adapter into a full checkpoint folder. The layers are in `lit_qa.models.lora`.
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
    resolve_base,
    save_finetuned_dir,
)
from lit_qa.checkpoints.finetuned import read_base_record
from lit_qa.checkpoints.folder import load_model
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_state_dict
from lit_qa.models.model import GPT

LORA_WEIGHTS_FILE = "lit_lora.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
LORA_FILES = (LORA_WEIGHTS_FILE, LORA_CONFIG_FILE, BASE_RECORD_FILE)


def save_lora_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    lora_config: LoRAConfig,
    base_checkpoint_dir: str | Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an adapter folder: LoRA tensors, `LoRAConfig` and the base model's identity, all or nothing
    (`lit_qa.checkpoints.finetuned.save_finetuned_dir`).

    Call it on one process only (rank 0). Under FSDP the LoRA tensors are shards: gather them on every rank
    first (``lit_qa.training.distributed.full_state_dict(lora_state_dict(model))``) and pass them as ``tensors``.

    Args:
        out_dir: Folder to create.
        model: A model with LoRA applied.
        lora_config: The config the LoRA was applied with, saved as ``lora_config.json``.
        base_checkpoint_dir: The base checkpoint folder; its path (as given), ``lit_config`` and a weights
            fingerprint (`lit_qa.checkpoints.finetuned.weights_fingerprint`) go to ``base_checkpoint.json``.
        extra: More files for the folder, ``{file name: content}``: a `Path` is copied, anything else
            written as JSON (e.g. ``{"hyperparameters.json": asdict(train_args)}``).
        overwrite: Replace a non-empty ``out_dir``.
        tensors: The LoRA tensors to write; None takes them from ``model``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If ``model`` has no LoRA, the base folder is not a checkpoint, an ``extra`` name is
            invalid, or ``out_dir`` is not empty without ``overwrite``.
    """
    tensors = lora_state_dict(model) if tensors is None else tensors
    if not tensors:
        raise LitQAError("the model has no LoRA layers to save; call apply_lora first")
    return save_finetuned_dir(
        out_dir, tensors, LORA_WEIGHTS_FILE, lora_config, LORA_CONFIG_FILE, base_checkpoint_dir, extra, overwrite
    )


def check_lora_dir(lora_dir: str | Path) -> Path:
    """Make sure a folder holds an adapter written by `save_lora_checkpoint`.

    Raises:
        LitQAError: If the folder is missing or lacks one of its files; the message lists what it has.
    """
    return check_finetuned_dir(lora_dir, LORA_FILES, "LoRA")


def read_lora_base_record(lora_dir: str | Path) -> dict[str, Any]:
    """The contents of a LoRA folder's ``base_checkpoint.json``: ``path``, ``lit_config`` and ``fingerprint``.

    Raises:
        LitQAError: If ``lora_dir`` is not a LoRA folder, or the file is malformed.
    """
    return read_base_record(check_lora_dir(lora_dir))


def load_lora_checkpoint(
    lora_dir: str | Path,
    base_checkpoint_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_different_base: bool = False,
) -> tuple[GPT, Config, LoRAConfig]:
    """Load a base checkpoint with an adapter on top (unmerged), after checking they belong together.

    Args:
        lora_dir: A folder written by `save_lora_checkpoint`.
        base_checkpoint_dir: The base checkpoint folder; None uses the path recorded in ``base_checkpoint.json``.
        device: Where the model should live.
        dtype: Cast the base weights (and the LoRA tensors with them); None keeps the base's dtype.
        allow_different_base: Load even if the base weights are not those the adapter was trained on
            (e.g. the same model converted again in another dtype). The architecture must still match.

    Returns:
        The model (in eval mode), its config and the `LoRAConfig`.

    Raises:
        LitQAError: If a file is missing or malformed, the base has another architecture or (unless
            ``allow_different_base``) other weights, or a LoRA tensor is missing, unexpected or misshapen.
    """
    lora_dir = check_lora_dir(lora_dir)
    lora_config = LoRAConfig.from_file(lora_dir / LORA_CONFIG_FILE)
    base = resolve_base(lora_dir, base_checkpoint_dir, allow_different_base, "LoRA")
    model, config = load_model(base, device=device, dtype=dtype)
    apply_lora(model, lora_config)
    load_trained_tensors(model, lora_dir / LORA_WEIGHTS_FILE, lora_state_dict(model), LORA_CONFIG_FILE, "LoRA")
    return model.eval(), config, lora_config
