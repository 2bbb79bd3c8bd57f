# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Step checkpoints and exact resume.

A step checkpoint (``out_dir/step-000200/``) holds what the method saves plus ``training_state.pt``: the trained
parameters, the optimizer, the scheduler, the progress counters (the position in the data order), every rank's
RNG state and the fp16 loss scale; FSDP writes one shard per rank instead. Folders are written to a temporary
sibling and renamed into place when complete (`write_folder`), so a run killed while saving never leaves a
broken checkpoint, and a full disk fails with the last complete one named.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_qa.checkpoints.trusted import first_line, refused_global
from lit_qa.errors import LitQAError
from lit_qa.files import replace_folder
from lit_qa.training.replace import finish_replacement
from lit_qa.training.distributed import SHARDED_STATE_DIR, is_sharded, load_sharded_state, save_sharded_state
from lit_qa.training.progress import Progress

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


def rng_states(fabric: L.Fabric) -> dict[str, Any]:
    """The global RNG states a checkpoint records: this process's CPU and CUDA ones and, with several processes,
    every rank's (``rank_rng``, row r = rank r's CPU state followed by its CUDA state if any): ranks start with
    the same seed, but each one's dropout draws as many numbers as its own micro-batches' shapes need."""
    states = {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if fabric.world_size > 1:  # a collective: every rank calls this
        own = torch.get_rng_state()
        if fabric.device.type == "cuda":
            own = torch.cat([own, torch.cuda.get_rng_state(fabric.device)])
        states["rank_rng"] = fabric.all_gather(own.to(fabric.device)).cpu()
    return states


def restore_rng_states(fabric: L.Fabric, states: dict[str, Any]) -> None:
    """Set this rank's global RNG from what `rng_states` saved; on another number of ranks every rank gets rank
    0's state (the run continues deterministically, though not as the saved one would have)."""
    rank_rng = states.get("rank_rng")
    if isinstance(rank_rng, torch.Tensor) and rank_rng.shape[0] == fabric.world_size:
        own, cpu_size = rank_rng[fabric.global_rank], torch.get_rng_state().numel()
        torch.set_rng_state(own[:cpu_size].clone())
        if fabric.device.type == "cuda" and own.numel() > cpu_size:
            torch.cuda.set_rng_state(own[cpu_size:].clone(), fabric.device)
        return
    torch.set_rng_state(states["rng"])
    if states.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng"])


def save_training_checkpoint(
    fabric: L.Fabric,
    step_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    trainable: set[str],
    save_fn: Callable[[Path], None],
) -> None:
    """Write the method's weights and the resume state into ``step_dir`` atomically (see `write_folder`).

    The resume state: the trained parameters, the optimizer, the scheduler, the progress counters, the RNG
    states and the precision plugin's state (the fp16 loss scale; ``fabric.save`` does not save it).
    """
    precision = fabric.strategy.precision.state_dict()
    counters = {"progress": progress.to_state(), **rng_states(fabric), "precision": precision}
    module = getattr(model, "module", model)

    def write(folder: Path) -> None:
        save_fn(folder)
        if fabric.global_rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        if is_sharded(module):
            # FSDP: every rank writes its own shard; nothing is gathered on one rank.
            save_sharded_state(folder, module, getattr(optimizer, "optimizer", optimizer),
                               {**counters, "scheduler": scheduler.state_dict()}, fabric.global_rank)  # fmt: skip
        else:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **counters}
            # Only what is trained: the frozen base model is already on disk in its checkpoint folder.
            fabric.save(folder / STATE_FILE, state, filter={"model": lambda key, _: key in trainable})

    write_folder(fabric, step_dir, write)


def write_folder(fabric: L.Fabric, folder: Path, write: Callable[[Path], None]) -> None:
    """Fill ``folder`` atomically: ``write`` (called on every rank) fills a temporary sibling, which is renamed to
    ``folder`` only when complete, so a run killed while saving never leaves a half-written ``folder``.

    Raises:
        LitQAError: If writing fails (disk full, quota, permissions); the previous ``folder`` is untouched.
    """
    tmp_dir = folder.with_name(folder.name + ".tmp")
    if fabric.global_rank == 0:
        # Left by a run killed while saving this folder (save_fn may have its own ".tmp-<pid>" folder inside),
        # or while replacing it (`replace_folder` renames the previous one to ".old-<pid>" first).
        for stale in [*folder.parent.glob(f"{folder.name}.tmp*"), *folder.parent.glob(f"{folder.name}.old*")]:
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    try:
        write(tmp_dir)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint is untouched
        shutil.rmtree(tmp_dir, ignore_errors=True)
        latest = latest_checkpoint(folder.parent)
        reason = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise LitQAError(f"cannot write checkpoint {folder}: {reason}; the last complete checkpoint is "
                         f"{latest or 'none'} (free space, then continue with --resume auto)") from None  # fmt: skip
    fabric.barrier()
    if fabric.global_rank == 0:
        replace_folder(tmp_dir, folder)
        if replaced := finish_replacement(folder.parent, folder):
            fabric.print(f"--overwrite: {folder.name} is complete, removed the earlier run's {', '.join(replaced)}")
    fabric.barrier()



def load_training_state(
    fabric: L.Fabric,
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainable: set[str],
) -> Progress:
    """Restore model (trained part), optimizer, scheduler, RNG and loss scale from ``checkpoint``; say so, and return
    the run's `Progress` there."""
    path = checkpoint / STATE_FILE
    module = getattr(model, "module", model)
    if is_sharded(module):
        if path.is_file():
            raise LitQAError(f"{checkpoint} was saved without FSDP; resume it with the strategy it was trained with")
        rest = load_sharded_state(checkpoint, module, getattr(optimizer, "optimizer", optimizer))
        scheduler.load_state_dict(rest["scheduler"])
    else:
        if not path.is_file():
            hint = " (it is an FSDP checkpoint: resume with --strategy fsdp)" if (checkpoint / SHARDED_STATE_DIR).is_dir() else ""
            raise LitQAError(f"{checkpoint} is not a training checkpoint: {STATE_FILE} is missing{hint}")
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        try:
            rest = fabric.load(path, state, strict=False, weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused a global: nothing ran
            raise LitQAError(f"refusing to load {path}: a training state holds only tensors, numbers and strings, "
                             f"this file names more ({refused_global(e)})") from None  # fmt: skip
        except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
            raise LitQAError(f"{path}: cannot load the training state ({first_line(e)})") from None
    if not isinstance(rest.get("progress"), dict) or not isinstance(rest.get("rng"), torch.Tensor):
        raise LitQAError(f"{path}: not a lit-qa training state (no progress counters or RNG state)")
    progress = Progress.from_state(rest["progress"])
    restore_rng_states(fabric, rest)
    if rest.get("precision"):  # the loss scale of a 16-mixed run; a scaler starting over would overflow again
        fabric.strategy.precision.load_state_dict(rest["precision"])
    fabric.print(f"Resumed from {checkpoint} at step {progress.step}")
    return progress


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete ``step-*`` folder with the highest step in ``out_dir`` (temporary folders are ignored)."""
    steps = [(int(m.group(1)), p) for p in Path(out_dir).glob("step-*") if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def find_resume_checkpoint(out_dir: Path, resume: bool | str | Path) -> Path | None:
    """Resolve ``--resume`` to a checkpoint folder, or None for a fresh start."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        latest = latest_checkpoint(out_dir)
        if latest is None and resume is True:
            raise LitQAError(f"--resume: no checkpoint (step-* folder) in {out_dir}")
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file() and not (path / SHARDED_STATE_DIR).is_dir():
        raise LitQAError(f"--resume {path}: not a training checkpoint folder ({STATE_FILE} or {SHARDED_STATE_DIR}/ missing)")
    return path


def step_dir(out_dir: Path, step: int) -> Path:
    """The checkpoint folder of ``step``: ``out_dir/step-000200``."""
    return Path(out_dir) / f"step-{step:06d}"
