# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Checkpoint folders: write them atomically, check them, and load them memory-light.

A lit-qa checkpoint is a self-describing folder::

    checkpoints/SmolLM2-135M-Instruct/
        lit_model.safetensors   # weights; lm_head.weight is left out when the embeddings are tied
        lit_config.json         # `Config`
        tokenizer.json ...      # tokenizer files copied from the source model

Loading builds the model on the meta device (no memory, no random init) and assigns the weights read
from the memory-mapped safetensors file, the recipe of gpt-fast's ``_load_model`` and litgpt.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_qa.errors import LitQAError, not_found
from lit_qa.files import write_folder_atomically
from lit_qa.models.config import CONFIG_FILE, Config
from lit_qa.models.model import GPT

WEIGHTS_FILE = "lit_model.safetensors"
TIED_KEY = "lm_head.weight"
EMBEDDING_KEY = "transformer.wte.weight"


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """Make sure a folder holds a converted checkpoint before anything heavy runs.

    Args:
        checkpoint_dir: The folder to check.

    Returns:
        The folder as a `Path`.

    Raises:
        LitQAError: If the folder does not exist or lacks ``lit_config.json`` or ``lit_model.safetensors``;
            the message lists what the folder holds instead.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise LitQAError(
            f"checkpoint folder {path} {not_found(path)}; convert a model first with scripts/convert_checkpoint.py"
        )
    if misplaced := [name for name in (CONFIG_FILE, WEIGHTS_FILE) if (path / name).is_dir()]:
        raise LitQAError(f"{path / misplaced[0]} is a folder, not a file: {path} is not a lit-qa checkpoint")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        present = sorted(p.name for p in path.iterdir())
        raise LitQAError(
            f"{path} is not a lit-qa checkpoint: missing {', '.join(missing)} "
            f"(it has: {', '.join(present) or 'nothing'}); convert a model with scripts/convert_checkpoint.py"
        )
    return path


def check_not_inside(
    out_dir: str | Path, inputs: dict[str, str | Path | None], out_flag: str = "--out_dir", replaces_folder: bool = True
) -> None:
    """Refuse an output folder that is, is inside, or contains one of ``inputs`` (flag -> path; None skipped):
    replacing it would replace what the command reads. A command that writes only its own files into the folder
    (``replaces_folder=False``: an evaluation) may write into a folder that contains an input.

    Raises:
        LitQAError: Naming the output, the input's flag and how they overlap.
    """
    out = Path(out_dir).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if out == source:
            relation = "is"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents and replaces_folder:
            relation = "contains"
        else:
            continue
        raise LitQAError(f"{out_flag} {out_dir} {relation} the input {flag} {path}; write the output to another folder")


def save_checkpoint(
    out_dir: str | Path,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    extra_files: dict[str, Path | bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder: weights, config and extra files (tokenizer), all or nothing.

    Args:
        out_dir: Folder to create.
        config: The model config, saved as ``lit_config.json``.
        state_dict: Weights with lit-qa names. With ``config.tie_embeddings`` the ``lm_head.weight`` entry
            may be present (it must equal the embedding) and is not written.
        extra_files: Files to copy into the folder, as ``{name in the folder: source path}``; ``bytes`` are
            written as they are (e.g. `lit_qa.checkpoints.na_head.na_head_files`).
        overwrite: Replace a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If ``out_dir`` is not empty and ``overwrite`` is False.
    """
    tensors = _tensors_to_save(config, state_dict)
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        config.save(tmp / CONFIG_FILE)
        for name, source in (extra_files or {}).items():
            if isinstance(source, bytes):
                (tmp / name).write_bytes(source)
            else:
                shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def _tensors_to_save(config: Config, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, tensor in state_dict.items():
        if key == TIED_KEY and config.tie_embeddings:
            # Dropping a head that differs from the embedding would silently change the model.
            embedding = state_dict.get(EMBEDDING_KEY)
            if embedding is None or not torch.equal(tensor, embedding):
                raise LitQAError("config has tie_embeddings=true but lm_head.weight differs from the embedding")
            continue
        # safetensors needs contiguous CPU tensors that do not share memory.
        tensors[key] = tensor.detach().to("cpu").contiguous()
    return tensors


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint folder (or a ``.safetensors`` file) onto the CPU.

    Args:
        checkpoint_dir: A checkpoint folder, or the path of a safetensors file.

    Returns:
        The tensors by name, in the dtype they were saved in.

    Raises:
        LitQAError: If the file is missing, truncated or not a safetensors file.
    """
    path = Path(checkpoint_dir)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise LitQAError(f"weights file {path} not found")
    try:
        # safe_open memory-maps the file: each tensor is read once, straight into its final tensor.
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LitQAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """The tensors a checkpoint for ``config`` must hold, with their shapes (``lm_head`` left out when tied).

    The model is built on the meta device, so this costs no memory even for a 70B config.
    """
    with torch.device("meta"):
        model = GPT(config)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop(TIED_KEY)
    return shapes


def check_state_dict(state_dict: dict[str, torch.Tensor], config: Config, source: str | Path) -> None:
    """Compare weights to what ``config`` needs: names and shapes.

    Args:
        state_dict: Weights with lit-qa names.
        config: The config they should fit.
        source: File or folder named in the error message.

    Raises:
        LitQAError: One message listing missing tensors, unexpected tensors and every wrong shape.
    """
    expected = expected_shapes(config)
    present = {k for k in state_dict if not (k == TIED_KEY and config.tie_embeddings)}
    problems = []
    if missing := sorted(expected.keys() - present):
        problems.append(f"missing tensors {_short_list(missing)}")
    if unexpected := sorted(present - expected.keys()):
        problems.append(f"unexpected tensors {_short_list(unexpected)}")
    for key in sorted(present & expected.keys()):
        if state_dict[key].shape != expected[key]:
            problems.append(
                f"{key} has shape {tuple(state_dict[key].shape)} but the config expects {tuple(expected[key])}"
            )
    if problems:
        raise LitQAError(f"{source} does not match its config ({config.name or 'unnamed'}): " + "; ".join(problems))


def _short_list(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model(
    checkpoint_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config]:
    """Build a `GPT` from a checkpoint folder without random init or a second copy of the weights.

    Args:
        checkpoint_dir: A folder written by `save_checkpoint` or a converter.
        device: Where the model should live.
        dtype: Cast the weights to this dtype; None keeps the dtype they were saved in.

    Returns:
        The model (in eval mode) and its config.

    Raises:
        LitQAError: If the folder, config or weights are missing or corrupt, or the weights do not fit the config.
    """
    path = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_checkpoint(path)
    state_dict = load_state_dict(path)
    check_state_dict(state_dict, config, path / WEIGHTS_FILE)
    with torch.device("meta"):
        model = GPT(config)
    if config.tie_embeddings:
        state_dict[TIED_KEY] = state_dict[EMBEDDING_KEY]
    # assign=True adopts the loaded tensors instead of copying into the meta (storage-less) parameters.
    model.load_state_dict(state_dict, assign=True)
    if config.tie_embeddings:
        # assign=True gave the head a Parameter of its own; share the embedding's again so casts keep them one.
        model.lm_head.weight = model.transformer.wte.weight
    # The RoPE buffers are not in the checkpoint and still live on meta, which .to() cannot copy from.
    model.reset_rope_cache(device=torch.device("cpu"))
    model.to(device=device, dtype=dtype)
    # Rebuild them on the device in float32 whatever the weights' dtype: bf16 angles lose precision.
    model.reset_rope_cache(device=torch.device(device))
    return model.eval(), config


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``torch.save`` file (``pytorch_model.bin``, Meta's ``consolidated.00.pth``) safely.

    ``weights_only=True`` makes the unpickler refuse anything but tensors and plain containers, so a file
    carrying code cannot run it. ``mmap=True`` leaves the tensors on disk until they are used.

    Args:
        path: The file to read.

    Returns:
        What the file holds, normally a dict of tensors on the CPU.

    Raises:
        LitQAError: If the file is missing, corrupt, or refused because it holds more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise LitQAError(f"{path} not found")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written before torch 1.6 (not zip archives) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LitQAError(f"refusing to load {path}: it holds more than tensors ({first_line})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise LitQAError(f"{path} is not a readable PyTorch file (truncated or corrupt?): {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
