# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""``curves.png`` in a run's out_dir: train and validation loss, and validation F1, over steps, the best step marked.

Drawn from the metrics the run already logs (the CSV logger's ``logs/csv/version_*/metrics.csv``; a resumed run
adds a version, and later versions win for the same step), at every validation and at the end of the run, so
the picture is never more than one validation behind. TensorBoard's events are written as before.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import lightning as L

from lit_qa.training.replace import staged

CURVES_FILE = "curves.png"
_SERIES = {"train/loss": "train loss", "val/loss": "validation loss", "val/f1": "validation F1"}


def write_curves(fabric: L.Fabric, out_dir: Path, best_step: int | None = None) -> Path | None:
    """Flush the run's CSV log and redraw ``out_dir/curves.png`` (rank 0; other ranks return None).

    Args:
        fabric: The run's Fabric, with the CSV logger `lit_qa.training.launch.make_fabric` gives it.
        out_dir: The run's out_dir.
        best_step: The step of ``best/``, marked on every panel; None: no best step (yet).
    """
    if fabric.global_rank != 0:
        return None
    for logger in fabric.loggers:
        if type(logger).__name__ == "CSVLogger":
            logger.save()
    series = read_logged_series(Path(out_dir) / "logs" / "csv")
    return plot_curves(series, staged(Path(out_dir), CURVES_FILE), best_step)


def read_logged_series(csv_root: Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` for the plotted metrics from every ``version_*/metrics.csv`` under ``csv_root``."""
    series: dict[str, dict[int, float]] = {name: {} for name in _SERIES}

    def version(path: Path) -> int:
        match = re.search(r"version_(\d+)", path.parent.name)
        return int(match.group(1)) if match else -1

    for path in sorted(csv_root.glob("version_*/metrics.csv"), key=version):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for name in _SERIES:
                    if _number(row.get(name)) is not None and _number(row.get("step")) is not None:
                        series[name][int(float(row["step"]))] = _number(row[name])
    return series


def plot_curves(series: dict[str, dict[int, float]], path: Path, best_step: int | None = None) -> Path:
    """Draw the loss panel (train and validation) and the F1 panel into ``path`` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    has_f1 = bool(series.get("val/f1"))
    fig, axes = plt.subplots(1, 2 if has_f1 else 1, figsize=(10 if has_f1 else 5.5, 3.6), squeeze=False)
    loss_ax = axes[0][0]
    for name, style in (("train/loss", "-"), ("val/loss", "o-")):
        if points := sorted(series.get(name, {}).items()):
            loss_ax.plot(*zip(*points), style, label=_SERIES[name], markersize=3, linewidth=1)
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    panels = [loss_ax]
    if has_f1:
        f1_ax = axes[0][1]
        f1_ax.plot(*zip(*sorted(series["val/f1"].items())), "o-", color="tab:green", markersize=3, linewidth=1,
                   label=_SERIES["val/f1"])  # fmt: skip
        f1_ax.set(xlabel="step", ylabel="F1", title="validation F1")
        panels.append(f1_ax)
    for ax in panels:
        if best_step is not None:
            ax.axvline(best_step, color="tab:red", linestyle="--", linewidth=1, label=f"best (step {best_step})")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)  # a run that saved nothing yet has no out_dir
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
