# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Prepared data folders (what ``scripts/prepare_squad.py`` writes) read back, and batches made of them.

A folder holds ``train.pt`` and ``val.pt`` (lists of samples made by `lit_qa.data.prepare`), ``val-v2.0.json``
(the validation questions in the official format), ``prepare_config.json`` (how the samples were made: the
tokenizer, the prompt style, the no-answer string) and ``stats.json``. `load_prepared` checks a split before
training spends any time on it; `collate` pads a micro-batch on the right (labels -100 there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lit_qa.checkpoints.trusted import load_tensors
from lit_qa.data.prompts import chat_template_sha256
from lit_qa.errors import LitQAError, not_found
from lit_qa.files import file_sha256, read_json, write_atomic
from lit_qa.models.tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels with this value are skipped by torch.nn.functional.cross_entropy
SPLITS = ("train", "val")
CONFIG_FILE = "prepare_config.json"
STATS_FILE = "stats.json"
VAL_SQUAD_FILE = "val-v2.0.json"
PREPARED_BY = "lit-qa scripts/prepare_squad.py"
FORMAT_VERSION = 1


def load_prepared(data_dir: Path | str, split: str) -> list[dict[str, Any]]:
    """Load the samples ``scripts/prepare_squad.py`` wrote for one split.

    Args:
        data_dir: The script's ``out_dir``.
        split: ``"train"`` or ``"val"``.

    Returns:
        The samples: dicts with ``id`` (str), ``input_ids`` and ``labels`` (1-D ``torch.long``, same length), and in
        folders prepared since packing exists ``paragraph`` (int; -1: the sample cannot share its prompt).

    Raises:
        LitQAError: If the split is unknown, the folder was not prepared by the script (no or a foreign
            ``prepare_config.json``), or the file is missing, corrupt or not in the expected format.
    """
    if split not in SPLITS:
        raise LitQAError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    read_prepare_config(data_dir)
    path = data_dir / f"{split}.pt"
    if not path.is_file():
        raise LitQAError(f"{path} {not_found(path, 'file')}; run scripts/prepare_squad.py --out_dir {data_dir} again")
    samples = load_tensors(path, "prepared split")
    _check_samples(samples, path)
    return samples


def read_prepare_config(data_dir: Path | str) -> dict[str, Any]:
    """Read ``prepare_config.json`` of a prepared folder.

    Raises:
        LitQAError: If it is missing, unreadable, or was not written by ``scripts/prepare_squad.py`` in this
            format version.
    """
    path = Path(data_dir) / CONFIG_FILE
    if not path.is_file():
        raise LitQAError(f"{path} {not_found(path, 'file')}: {data_dir} was not prepared by scripts/prepare_squad.py")
    config = read_json(path)
    if not isinstance(config, dict) or config.get("prepared_by") != PREPARED_BY:
        raise LitQAError(f"{path} was not written by scripts/prepare_squad.py")
    if config.get("format_version") != FORMAT_VERSION:
        raise LitQAError(
            f"{path} has format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}; "
            "prepare the data again with --overwrite"
        )
    return config


def _check_samples(samples: Any, path: Path) -> None:
    if not isinstance(samples, list):
        raise LitQAError(f"{path} must hold a list of samples, got {type(samples).__name__}")
    for i, sample in enumerate(samples):
        ok = (
            isinstance(sample, dict)
            and isinstance(sample.get("id"), str)
            and all(
                isinstance(sample.get(k), torch.Tensor) and sample[k].dtype == torch.long and sample[k].ndim == 1
                for k in ("input_ids", "labels")
            )
        )
        if not ok or sample["input_ids"].shape != sample["labels"].shape:
            raise LitQAError(
                f"{path}: sample {i} is not a dict of id (str) and equally long 1-D long tensors input_ids, labels"
            )
        paragraph = sample.get("paragraph", -1)
        if not isinstance(paragraph, int) or isinstance(paragraph, bool) or paragraph < -1:
            raise LitQAError(f"{path}: sample {i} has paragraph {paragraph!r}; expected an int >= -1")


def collate(
    samples: list[dict[str, Any]], pad_id: int, max_length: int | None = None, pad_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """Stack samples into a right-padded batch.

    Args:
        samples: Dicts with 1-D ``input_ids`` and ``labels``.
        pad_id: Token id to pad ``input_ids`` with (it is never learned: its labels are -100).
        max_length: Cut longer samples to this many tokens first; None keeps them whole.
        pad_multiple: Round T up to a multiple of this. On CPUs, bf16 kernels are re-built for every new
            shape, which made training on varying lengths several times slower than a few fixed shapes.

    Returns:
        ``{"input_ids": (B, T), "labels": (B, T)}``, where T is the longest (cut) sample in the batch, rounded
        up to ``pad_multiple``; plus ``"unanswerable": (B,)`` 0/1 floats when the samples are marked
        (`mark_unanswerable`).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids = [s["input_ids"][:max_length] for s in samples]
    labels = [s["labels"][:max_length] for s in samples]
    longest = max(len(x) for x in input_ids)
    longest = -(-longest // pad_multiple) * pad_multiple
    longest = min(longest, max_length) if max_length is not None else longest  # rounding never exceeds the limit
    batch_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)  # (B, T)
    batch_labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        batch_ids[row, : len(x)] = x
        batch_labels[row, : len(y)] = y
    batch = {"input_ids": batch_ids, "labels": batch_labels}
    if all("unanswerable" in s for s in samples):
        batch["unanswerable"] = torch.tensor([float(s["unanswerable"]) for s in samples])  # (B,)
    return batch


def mark_unanswerable(samples: list[dict[str, Any]], no_answer_ids: torch.Tensor) -> int:
    """Label each sample ``unanswerable`` (True/False) by its target: the no-answer reply's tokens
    (``tokenizer.encode(no_answer, eos=True)``, as `QuestionEncoder` writes them) or an answer. Works on data
    prepared before the no-answer head existed. Returns how many are unanswerable."""
    count = 0
    for sample in samples:
        target = sample["input_ids"][sample["labels"] != IGNORE_INDEX]
        sample["unanswerable"] = bool(target.shape == no_answer_ids.shape and torch.equal(target, no_answer_ids))
        count += sample["unanswerable"]
    return count


PREPARED_FILES = tuple(f"{split}.pt" for split in SPLITS) + (VAL_SQUAD_FILE, STATS_FILE, CONFIG_FILE)


def prepare_config(
    tokenizer: Tokenizer,
    checkpoint_dir: Path,
    max_seq_length: int,
    prompt_style: str,
    no_answer: str,
    seed: int,
    val_fraction: float,
    answers: str,
    train_file: Path,
    eval_file: Path | None,
    extra_train_file: Path | None = None,
) -> dict[str, Any]:
    """What ``prepare_config.json`` records: how the samples were made (the tokenizer and its files' hash, the
    prompt, the split) and from which files (with their hashes), so a training run can tell its data apart."""
    config = {
        "prepared_by": PREPARED_BY,
        "format_version": FORMAT_VERSION,
        "checkpoint_dir": str(checkpoint_dir),
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "add_bos": tokenizer.add_bos,
            "sha256": tokenizer.file_sha256(),
        },
        "max_seq_length": max_seq_length,
        "prompt_style": prompt_style,
        "no_answer": no_answer,
        "seed": seed,
        "val_fraction": val_fraction,
        "train_file": {"path": str(train_file), "sha256": file_sha256(train_file)},
        "eval_file": None if eval_file is None else {"path": str(eval_file), "sha256": file_sha256(eval_file)},
    }
    # Recorded only when not the default, so folders prepared before these options existed stay valid.
    if prompt_style == "chat":
        config["chat_template_sha256"] = chat_template_sha256(tokenizer)
    if answers != "first":
        config["answers"] = answers
    if extra_train_file is not None:
        config["extra_train_file"] = {"path": str(extra_train_file), "sha256": file_sha256(extra_train_file)}
    return config


def check_prepared_out_dir(out_dir: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace prepared files made with other settings, unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LitQAError(f"--out_dir {out_dir} is a file, not a folder")
    present = [name for name in PREPARED_FILES if (out_dir / name).exists()]
    if not present or overwrite:
        return
    try:
        old = json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == config:
        return  # same settings: the rewrite gives the same bytes
    keys = set(config) | (set(old) if isinstance(old, dict) else set())
    changed = sorted(k for k in keys if not isinstance(old, dict) or old.get(k) != config.get(k))
    raise LitQAError(
        f"{out_dir} already holds prepared data ({', '.join(present)}) made with other settings "
        f"(differs in: {', '.join(changed)}); pass --overwrite to replace it or choose another --out_dir"
    )


def write_prepared(out_dir: Path, files: dict[str, bytes], stats: dict[str, Any], config: dict[str, Any]) -> None:
    """Write a prepared folder: the split files, ``stats.json`` and, last, ``prepare_config.json``, each atomically;
    a folder whose write was interrupted has no config, and `load_prepared` refuses it."""
    files = {**files, STATS_FILE: to_json(stats), CONFIG_FILE: to_json(config)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    for name, data in files.items():
        write_atomic(out_dir / name, data)


def to_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
