# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Stopping a run cleanly on SIGTERM or SIGINT (Ctrl-C), or when its time budget is spent.

The current optimizer step finishes, a checkpoint is saved and the process exits (status 0 after SIGTERM, 130
after SIGINT) with a line saying how to resume. A second signal stops at once; checkpoints are written
atomically (`lit_qa.training.resume`), so that never leaves a broken one.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_qa.training.progress import Progress


class TrainingStopped(SystemExit):
    """Raised by `fit` after a SIGTERM or SIGINT, once the checkpoint is saved: the process exits with status
    0 after SIGTERM (a polite request, e.g. a scheduler's preemption) and 130 after SIGINT (Ctrl-C, so a
    ``train && evaluate`` chain stops). Scripts let it through, so they do not save ``final/``."""


@contextmanager
def signals_caught(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[list[int]]:
    """Record SIGTERM and SIGINT in the yielded list instead of dying, so the loop can save and stop.

    A second signal goes to the previous handler (by default: stop at once, which checkpoints survive since
    they are renamed into place only when complete). The previous handlers come back on exit. Nothing
    changes off the main thread (only it may set handlers) or for a signal ignored from the start (nohup).
    """
    received: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signums} if in_main_thread else {}
    previous = {s: handler for s, handler in previous.items() if handler not in (None, signal.SIG_IGN)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    def record(signum: int, frame: Any) -> None:
        if received:  # the user insists
            restore()
            signal.raise_signal(signum)
        else:
            received.append(signum)

    for s in previous:
        signal.signal(s, record)
    try:
        yield received
    finally:
        restore()


def stop_reason(fabric: L.Fabric, signals: list[int], deadline: float) -> str | None:
    """Why to stop after this step, the same on every rank: "SIGTERM" or "SIGINT" if any rank received it,
    "time" once rank 0's clock passes ``deadline``, else None."""
    signum = signals[0] if signals else 0
    out_of_time = fabric.global_rank == 0 and time.monotonic() > deadline
    if fabric.world_size > 1:  # one tiny collective per step
        flags = fabric.all_reduce(torch.tensor([signum, int(out_of_time)], device=fabric.device), reduce_op="max")
        signum, out_of_time = int(flags[0]), bool(flags[1])
    if signum:
        return signal.Signals(signum).name
    return "time" if out_of_time else None


def finish_run(fabric: L.Fabric, stop: str | None, progress: Progress, total_steps: int, out_dir: Path) -> None:
    """After the loop: close the loggers, and if a signal stopped the run, say where its checkpoint is and raise
    `TrainingStopped`."""
    for logger in fabric.loggers:
        logger.finalize("success")
    if stop not in ("SIGTERM", "SIGINT"):
        return
    saved = Path(out_dir) / f"step-{progress.step:06d}"
    fabric.print(f"\nstopped by {stop} at step {progress.step}/{total_steps}; saved {saved}; "
                 "continue with --resume auto")  # fmt: skip
    raise TrainingStopped(0 if stop == "SIGTERM" else 128 + signal.SIGINT)
