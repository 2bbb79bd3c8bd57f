# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Folders of fine-tuned tensors that sit on top of a base checkpoint: what LoRA and adapters share.

Such a folder holds the trained tensors (``lit_lora.safetensors``, ``lit_adapter.safetensors``), the method's
config (``lora_config.json``, ``adapter_config.json``) and ``base_checkpoint.json``: the base's path, its
``lit_config`` and a fingerprint of its weights, so loading onto another base fails with a clear message
instead of silently producing nonsense. `lit_qa.checkpoints.lora` and
`lit_qa.checkpoints.adapter` name their files and call these.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lit_qa.checkpoints.folder import WEIGHTS_FILE, _short_list, check_checkpoint_dir, load_state_dict
from lit_qa.errors import LitQAError, not_found
from lit_qa.files import read_json_object, write_folder_atomically
from lit_qa.models.config import Config

BASE_RECORD_FILE = "base_checkpoint.json"


def weights_fingerprint(checkpoint_dir: str | Path, sample_bytes: int = 4096) -> str:
    """A cheap identity of a checkpoint's weights file, to tell which base model an adapter belongs to.

    Hashes the safetensors header (names, dtypes, shapes), the file size, and the first and last
    ``sample_bytes`` of every tensor. The header alone is not enough: two models of the same architecture
    have identical headers. A 7B model costs ~2 MB of reads instead of hashing 13 GB. A base that differs
    only in the middle of some tensors would not be told apart; that is an accepted blind spot.

    Raises:
        LitQAError: If the file is missing or not a safetensors file.
    """
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length_bytes = f.read(8)
            header_length = int.from_bytes(length_bytes, "little")
            if len(length_bytes) < 8 or header_length > size - 8:
                raise ValueError("bad header length")
            header_bytes = f.read(header_length)
            digest.update(length_bytes + header_bytes + str(size).encode())
            header = json.loads(header_bytes)
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                for start in (begin, max(begin, end - sample_bytes)):
                    f.seek(8 + header_length + start)
                    digest.update(f.read(min(sample_bytes, end - start)))
    except OSError as e:
        raise LitQAError(f"cannot read {path}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LitQAError(f"{path} is not a readable safetensors file ({e})") from None
    return f"sha256:{digest.hexdigest()}"


def save_finetuned_dir(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    weights_file: str,
    method_config: Any,
    config_file: str,
    base_checkpoint_dir: str | Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the trained tensors, the method's config and the base model's identity into a folder, all or nothing.

    Args:
        out_dir: Folder to create.
        tensors: The trained tensors by state-dict name, whole (gathered, if they were FSDP shards).
        weights_file: Their file name, e.g. ``lit_lora.safetensors``.
        method_config: A config with a ``save(path)`` method (`LoRAConfig`, `AdapterConfig`).
        config_file: Its file name, e.g. ``lora_config.json``.
        base_checkpoint_dir: The base checkpoint folder; its path (as given), ``lit_config`` and a weights
            fingerprint (`weights_fingerprint`) go to ``base_checkpoint.json``.
        extra: More files for the folder, ``{file name: content}``: a `Path` is copied, ``bytes`` written as they
            are (e.g. `lit_qa.checkpoints.na_head.na_head_files`), anything else written as JSON (e.g.
            ``{"hyperparameters.json": asdict(train_args)}``).
        overwrite: Replace a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If the base folder is not a checkpoint, an ``extra`` name is invalid, or ``out_dir`` is
            not empty without ``overwrite``.
    """
    base = check_checkpoint_dir(base_checkpoint_dir)
    record = dict(
        path=str(base_checkpoint_dir),
        lit_config=asdict(Config.from_checkpoint(base)),
        fingerprint=weights_fingerprint(base),
    )
    extra = extra or {}
    for name in extra:
        if name in (weights_file, config_file, BASE_RECORD_FILE) or not name or Path(name).name != name:
            raise LitQAError(f"extra file name {name!r} is not a plain file name or is reserved")
    # safetensors needs contiguous CPU tensors.
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / weights_file, metadata={"format": "pt"})
        method_config.save(tmp / config_file)
        (tmp / BASE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for name, content in extra.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    return Path(out_dir)


def check_finetuned_dir(folder: str | Path, files: tuple[str, ...], kind: str) -> Path:
    """Make sure ``folder`` exists and holds ``files``.

    Raises:
        LitQAError: If the folder is missing or lacks one of its files; the message lists what it has.
    """
    path = Path(folder)
    if not path.is_dir():
        raise LitQAError(f"{kind} folder {path} {not_found(path)}")
    if misplaced := [name for name in files if (path / name).is_dir()]:
        raise LitQAError(f"{path / misplaced[0]} is a folder, not a file: {path} is not a {kind} folder")
    if missing := [name for name in files if not (path / name).is_file()]:
        present = sorted(p.name for p in path.iterdir())
        has = ", ".join(present) or "nothing"
        raise LitQAError(f"{path} is not a {kind} checkpoint: missing {', '.join(missing)} (it has: {has})")
    return path


def read_base_record(folder: Path) -> dict[str, Any]:
    """The contents of ``folder/base_checkpoint.json``: ``path``, ``lit_config`` and ``fingerprint``.

    Raises:
        LitQAError: If the file is missing or malformed.
    """
    path = folder / BASE_RECORD_FILE
    record = read_json_object(path, "base checkpoint record")
    if not {"path", "lit_config", "fingerprint"} <= record.keys():
        raise LitQAError(f"{path}: expected an object with path, lit_config and fingerprint")
    return record


def resolve_base(folder: Path, base_checkpoint_dir: str | Path | None, allow_different_base: bool, kind: str) -> Path:
    """The base checkpoint folder a fine-tuned ``folder`` is loaded onto, after checking they belong together.

    Args:
        folder: A folder written by `save_finetuned_dir`.
        base_checkpoint_dir: The base to use; None takes the path recorded in ``base_checkpoint.json``.
        allow_different_base: Accept base weights other than those trained on (the architecture must match).
        kind: The method's name for messages, e.g. "LoRA".

    Raises:
        LitQAError: If the base is missing, has another architecture or (unless ``allow_different_base``)
            other weights.
    """
    record = read_base_record(folder)
    if base_checkpoint_dir is None and not Path(record["path"]).is_dir():
        raise LitQAError(
            f"base checkpoint {record['path']} recorded in {folder / BASE_RECORD_FILE} does not exist; "
            "pass the base checkpoint folder explicitly"
        )
    base = check_checkpoint_dir(record["path"] if base_checkpoint_dir is None else base_checkpoint_dir)
    recorded, actual = record["lit_config"], asdict(Config.from_checkpoint(base))
    if not isinstance(recorded, dict):
        raise LitQAError(f"{folder / BASE_RECORD_FILE}: lit_config must be an object")
    # The name is only a label; every other field changes the computation.
    differences = [
        f"{key} {recorded.get(key)!r} vs {actual.get(key)!r}"
        for key in sorted(recorded.keys() | actual.keys())
        if key != "name" and recorded.get(key) != actual.get(key)
    ]
    if differences:
        differences = ", ".join(differences)
        raise LitQAError(f"{kind} in {folder} was trained on another architecture than {base}: {differences}")
    fingerprint = weights_fingerprint(base)
    if fingerprint != record["fingerprint"] and not allow_different_base:
        raise LitQAError(
            f"{kind} in {folder} was trained on a different base checkpoint ({record['path']}, "
            f"{str(record['fingerprint'])[:19]}...) than {base} ({fingerprint[:19]}...); "
            "pass allow_different_base=True (--allow_different_base) to load it anyway"
        )
    return base


def load_trained_tensors(
    model: nn.Module, weights_path: Path, expected: dict[str, torch.Tensor], config_file: str, kind: str
) -> None:
    """Copy the tensors of ``weights_path`` into ``model``, which must hold exactly the keys of ``expected``.

    Args:
        model: The base model with the method's layers applied.
        weights_path: The safetensors file of trained tensors.
        expected: The model's trained tensors by name (e.g. `lora_state_dict(model)`), for names and shapes.
        config_file: The config file name, for messages.
        kind: The method's name for messages, e.g. "LoRA".

    Raises:
        LitQAError: One message listing missing, unexpected and misshapen tensors.
    """
    tensors = load_state_dict(weights_path)
    problems = []
    if missing := sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing {kind} tensors {_short_list(missing)}")
    if unexpected := sorted(tensors.keys() - expected.keys()):
        problems.append(f"unexpected tensors {_short_list(unexpected)}")
    for key in sorted(tensors.keys() & expected.keys()):
        if tensors[key].shape != expected[key].shape:
            shape, needed = tuple(tensors[key].shape), tuple(expected[key].shape)
            problems.append(f"{key} has shape {shape} but {config_file} and the base need {needed}")
    if problems:
        raise LitQAError(f"{weights_path} does not match {config_file} and the base model: " + "; ".join(problems))
    # Copies into the trained parameters, casting to their device and dtype; the keys were checked above.
    model.load_state_dict(tensors, strict=False)
