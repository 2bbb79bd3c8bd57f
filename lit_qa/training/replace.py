# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""``finetune/*.py --overwrite``: an earlier run in ``out_dir`` is replaced once the new one has something to show.

Nothing of the old run is removed when the new one starts: it may still fail on a bad flag, a corrupt base
checkpoint or a learning rate that diverges. `begin_replacement` lists the old run's results in
``out_dir/.overwrite/old_results.json``; until the new run's first complete checkpoint (a ``step-*`` folder,
``best/`` or ``final/``), the files it would write over (``hyperparameters.yaml``, ``curves.png``) go into
``.overwrite/`` instead (`staged`). `finish_replacement`, called right after that first checkpoint is in place,
deletes the old results and moves the staged files into ``out_dir``. A run killed or failed before then leaves the
old run byte for byte as it was (and a ``.overwrite/`` folder that the next start clears).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PENDING_DIR = ".overwrite"
OLD_RESULTS_FILE = "old_results.json"
TOP_LEVEL_FILES = ("hyperparameters.yaml", "curves.png")  # written by a run outside its checkpoint folders


def old_results(out_dir: Path) -> list[str]:
    """Names of an earlier run's results in ``out_dir``: its checkpoint folders and top-level files (its logs stay:
    each run logs into a new ``version_*`` folder)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    names = [p.name for p in out_dir.glob("step-*")] + [name for name in ("final", "best", *TOP_LEVEL_FILES)]
    return sorted(name for name in names if (out_dir / name).exists())


def begin_replacement(out_dir: Path) -> list[str]:
    """Start replacing the run in ``out_dir`` (main process, before the run starts); returns the old results'
    names. Nothing is removed here."""
    names = old_results(out_dir)
    pending = Path(out_dir) / PENDING_DIR
    shutil.rmtree(pending, ignore_errors=True)
    pending.mkdir(parents=True)
    (pending / OLD_RESULTS_FILE).write_text(json.dumps(names, indent=1) + "\n")
    return names


def cancel_replacement(out_dir: Path) -> None:
    """Forget a replacement that never finished (its run stopped before its first checkpoint): the old run is
    intact, and this start does not replace it."""
    shutil.rmtree(Path(out_dir) / PENDING_DIR, ignore_errors=True)


def replacement_pending(out_dir: Path) -> bool:
    return (Path(out_dir) / PENDING_DIR / OLD_RESULTS_FILE).is_file()


def staged(out_dir: Path, name: str) -> Path:
    """Where the run writes its top-level file ``name``: in ``out_dir``, or in ``.overwrite/`` while the run it
    replaces is still there."""
    return Path(out_dir) / PENDING_DIR / name if replacement_pending(out_dir) else Path(out_dir) / name


def finish_replacement(out_dir: Path, written: Path) -> list[str]:
    """After the new run's first complete checkpoint ``written`` is in place (rank 0): delete the old run's
    results except ``written`` and move the staged files into ``out_dir``. Returns the names deleted; a no-op
    when no replacement is pending."""
    out_dir, pending = Path(out_dir), Path(out_dir) / PENDING_DIR
    if not replacement_pending(out_dir):
        return []
    deleted = []
    for name in json.loads((pending / OLD_RESULTS_FILE).read_text()):
        path = out_dir / name
        if path == Path(written) or name in TOP_LEVEL_FILES or not path.exists():
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        deleted.append(name)
    for name in TOP_LEVEL_FILES:
        if (pending / name).exists():
            os.replace(pending / name, out_dir / name)
        elif (out_dir / name).exists():  # the old run's, with no new one to take its place
            (out_dir / name).unlink()
            deleted.append(name)
    shutil.rmtree(pending)
    return deleted
