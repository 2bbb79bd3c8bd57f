# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The no-answer head's files beside a method's weights: ``na_head.safetensors`` and ``na_head_config.json``
(the head itself: `lit_qa.models.na_head`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from lit_qa.checkpoints.folder import load_state_dict
from lit_qa.errors import LitQAError
from lit_qa.models.na_head import PREFIX, NAHeadConfig, NoAnswerHead, attach_na_head, na_head_state_dict

NA_HEAD_WEIGHTS_FILE = "na_head.safetensors"
NA_HEAD_CONFIG_FILE = "na_head_config.json"
NA_HEAD_FILES = (NA_HEAD_WEIGHTS_FILE, NA_HEAD_CONFIG_FILE)


def split_na_head(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A model state dict as (the model's own tensors, the head's): a model's weights file never holds the head."""
    head = {key: value for key, value in state_dict.items() if key.startswith(PREFIX)}
    return {key: value for key, value in state_dict.items() if key not in head}, head


def na_head_files(model: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """The head's two files as ``{name: bytes}``, for the ``extra`` files of a fine-tuned folder; empty without a
    head. Under FSDP pass ``tensors`` gathered on every rank (``full_state_dict(na_head_state_dict(model))``)."""
    head = getattr(model, "na_head", None)
    if head is None:
        return {}
    tensors = na_head_state_dict(model) if tensors is None else tensors
    tensors = {key.removeprefix(PREFIX): value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    return {NA_HEAD_WEIGHTS_FILE: safetensors_bytes(tensors, metadata={"format": "pt"}),
            NA_HEAD_CONFIG_FILE: (json.dumps(asdict(head.config), indent=2) + "\n").encode()}  # fmt: skip


def load_na_head(model: nn.Module, folder: str | Path) -> NoAnswerHead | None:
    """Attach the head saved in ``folder`` to ``model`` (in its weights' dtype and device), or do nothing and
    return None when the folder has none.

    Raises:
        LitQAError: If only one of the two files is there, the config is invalid, or the tensors do not fit it.
    """
    folder = Path(folder)
    present = [name for name in NA_HEAD_FILES if (folder / name).is_file()]
    if not present:
        return None
    if len(present) == 1:
        missing = next(name for name in NA_HEAD_FILES if name not in present)
        raise LitQAError(f"{folder} has {present[0]} but not {missing}: the no-answer head is incomplete")
    config = NAHeadConfig.from_file(folder / NA_HEAD_CONFIG_FILE)
    head = attach_na_head(model, config)
    path = folder / NA_HEAD_WEIGHTS_FILE
    tensors = load_state_dict(path)
    expected = head.state_dict()
    if tensors.keys() != expected.keys() or any(tensors[k].shape != expected[k].shape for k in expected):
        have = {k: tuple(v.shape) for k, v in tensors.items()}
        need = {k: tuple(v.shape) for k, v in expected.items()}
        raise LitQAError(f"{path} does not fit {NA_HEAD_CONFIG_FILE} and the model: it has {have}, needs {need}")
    head.load_state_dict(tensors)
    weight = model.transformer.wte.weight
    head.to(dtype=weight.dtype if weight.dtype.is_floating_point else torch.float32)
    head.requires_grad_(False)
    return head.eval()
