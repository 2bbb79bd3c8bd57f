# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Files on disk, one way each: atomic writes (a file, a folder), JSON read with one-line errors, SHA-256.

Every result lit-qa writes goes through here, so a crash or a full disk never leaves half a file or half a
folder where a later run would read it, and every JSON file it reads fails the same way: one line naming the
file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_qa.errors import LitQAError, not_found


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the usual permissions instead
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically (`write_atomic`)."""
    write_atomic(Path(path), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: Path | str) -> Any:
    """Read a UTF-8 JSON file (a byte-order mark is allowed: editors on Windows write one).

    Raises:
        LitQAError: If the file is missing, not UTF-8 or not valid JSON, naming the file (and line/column).
    """
    path = Path(path)
    if not path.is_file():
        raise LitQAError(f"{path} {not_found(path, 'file')}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise LitQAError(
            f"{path} is not UTF-8 text: bad byte {e.object[e.start]:#04x} at offset {e.start} (line {line})"
        ) from None
    except OSError as e:
        raise LitQAError(f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LitQAError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def read_json_object(path: Path | str, what: str = "JSON file", optional: bool = False) -> dict[str, Any]:
    """`read_json` for a file that must hold a JSON object (a config, a record).

    Args:
        path: The file.
        what: What the file is, for the message when it is missing (e.g. "LoRA config").
        optional: Return ``{}`` when the file does not exist instead of failing.

    Raises:
        LitQAError: If the file is missing (unless ``optional``), unreadable, or holds something else.
    """
    path = Path(path)
    if not path.exists():
        if optional:
            return {}
        raise LitQAError(f"{path}: {what} not found")
    values = read_json(path)
    if not isinstance(values, dict):
        raise LitQAError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse to write into a non-empty folder unless asked to, before any work starts.

    Raises:
        LitQAError: If ``out_dir`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LitQAError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LitQAError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    return out


@contextmanager
def write_folder_atomically(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it replaces ``out_dir`` only if the block finishes.

    A crash or an exception half-way leaves the previous ``out_dir`` untouched and removes the temporary
    folder, so a later load never sees a checkpoint with a config but truncated weights.

    Args:
        out_dir: The folder to produce.
        overwrite: Replace a non-empty ``out_dir``. The old folder is deleted only after the new one is complete.

    Raises:
        LitQAError: If ``out_dir`` is not empty and ``overwrite`` is False.
    """
    out = check_out_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an earlier crash of a process with our pid
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the complete folder ``tmp`` to ``out``. An existing ``out`` is renamed aside first (rename cannot
    replace a non-empty folder) and deleted afterwards, which is also quicker than deleting it first: two renames
    take no time, deleting a full model does. If the second rename fails, the old folder is put back."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)
