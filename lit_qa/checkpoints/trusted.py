# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Reading the pickled files of a run without running code from them.

Three kinds of file in a checkpoint, step or prepared folder are pickles: ``torch.save`` files (``training_state.pt``,
``sharded_state/metadata.pt``, the prepared ``train.pt`` / ``val.pt``) and the two files of a
``torch.distributed.checkpoint`` folder (``sharded_state/.metadata`` and the ``*.distcp`` shards). A pickle can
name any importable function and call it while it loads, so every one of them is read here through an
allow-list:

- ``torch.save`` files: `load_tensors`, ``torch.load(weights_only=True)`` (tensors, numbers, strings and plain
  containers), its refusal turned into one line;
- the distributed checkpoint's ``.metadata``, which PyTorch reads with a plain ``pickle.load``:
  `TrustedFileSystemReader`, the reader's ``read_metadata`` with an unpickler that builds only the classes that
  metadata is made of (`DCP_METADATA_CLASSES`);
- the non-tensor values in its shards (an optimizer's step counts and hyperparameters), which PyTorch's default
  planner reads with ``torch.load(weights_only=False)``: `TrustedLoadPlanner`, the same with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from lit_qa.errors import LitQAError

# module -> names a distributed checkpoint's metadata may name (what torch 2.4-2.13 write); nothing else is built.
DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},  # fmt: skip
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},  # and every dtype, see find_class
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class RefusedPickle(pickle.UnpicklingError):
    """A pickle named something outside the allow-list."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds only what `DCP_METADATA_CLASSES` lists, plus torch dtypes; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise RefusedPickle(f"it names {module}.{name}, which a checkpoint's metadata never holds")


def read_dcp_metadata(path: Path) -> Any:
    """Unpickle a distributed checkpoint's ``.metadata`` file with `MetadataUnpickler`.

    Raises:
        LitQAError: If the file is missing, truncated, or names anything outside the allow-list.
    """
    try:
        with open(path, "rb") as file:
            metadata = MetadataUnpickler(file).load()
    except RefusedPickle as e:
        raise LitQAError(f"refusing to load {path}: {e}") from None
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise LitQAError(f"{path} is not a readable distributed-checkpoint metadata file: {first_line(e)}") from None
    if type(metadata).__name__ != "Metadata":
        raise LitQAError(f"{path} is not a distributed-checkpoint metadata file (it holds a {type(metadata).__name__})")
    return metadata


class TrustedFileSystemReader(FileSystemReader):
    """PyTorch's file-system reader with the metadata read by `read_dcp_metadata` instead of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_dcp_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        if hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata


class TrustedLoadPlanner(DefaultLoadPlanner):
    """PyTorch's default load planner with the shards' non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise LitQAError(f"refusing to load the value of {read_item.dest_index.fqn}: it holds more than "
                             f"numbers, strings and tensors ({refused_global(e)})") from None  # fmt: skip
        super().load_bytes(read_item, _as_buffer(loaded))


def _as_buffer(value: Any) -> io.BytesIO:
    """``value`` saved again, for the parent class that reads it back (its ``torch.load`` then sees only what the
    trusted load above produced)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def load_tensors(path: Path, what: str, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers, nothing that runs.

    Args:
        path: The ``torch.save`` file.
        what: What the file should be, for the message (e.g. "training state").
        kwargs: Passed to ``torch.load`` (``map_location``, ``mmap``).

    Raises:
        LitQAError: One line naming ``path``: refused (it holds more than tensors), or truncated / not a
            PyTorch file.
    """
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise LitQAError(f"refusing to load {path}: a {what} holds only tensors, numbers and strings, this file "
                         f"names more ({refused_global(e)})") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        raise LitQAError(f"{path} is not a readable {what} (truncated or not a PyTorch file): {first_line(e)}") from None


def refused_global(error: BaseException) -> str:
    """The global ``weights_only`` refused, from PyTorch's long message ("Unsupported global: GLOBAL os.system
    was not an allowed global ..."), without its advice to load with ``weights_only=False``."""
    text = str(error)
    for marker in ("Unsupported global: GLOBAL ", "Unsupported operand", "Unsupported class "):
        if marker in text:
            rest = text[text.index(marker) + len(marker):].split()
            return f"{marker.split(':')[0].strip().lower()} {rest[0]}" if rest else marker.strip()
    return "a global outside the tensors-only allow-list"


def first_line(error: BaseException) -> str:
    """The first sentence of an exception's message (its type when it has none): what went wrong, without the
    advice and internals a library adds after it."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:200] if text else type(error).__name__
