# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The report of ``scripts/compare.py``: quantization formats side by side, as ``comparison.md`` (printed too),
``comparison.json`` and a bar chart ``comparison.png`` (F1 and weights size per format)."""

from __future__ import annotations

import json
from pathlib import Path


def add_differences(rows: list[dict]) -> list[dict]:
    """Add each format's F1 difference to the full-precision row (if present)."""
    full = next((r for r in rows if r["format"] == "full"), None)
    for row in rows:
        row["F1 vs full"] = None if full is None else row["F1"] - full["F1"]
    return rows


def write_outputs(out_dir: Path, rows: list[dict], extra: dict) -> None:
    """``comparison.md`` (printed too), ``comparison.json`` and ``comparison.png``.

    Besides the official scores, ``span F1`` is the F1 of each answerable question's best span as if the model never
    abstained (the answer quality a format keeps), and ``no-answer AUC`` how well its p_na separates the
    unanswerable questions (0.5 = chance): together they tell a format's loss apart from a threshold's shift."""
    columns = ["format", "EM", "F1", "HasAns F1", "NoAns accuracy", "span F1", "no-answer rule", "no-answer AUC",
               "best-threshold F1", "weights GB", "peak memory GB", "tokens/s", "F1 vs full"]  # fmt: skip
    special = {"format": label, "no-answer rule": rule, "F1 vs full": difference}

    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(special[c](row) if c in special else row.get(c)) for c in columns) + " |"
              for row in rows]  # fmt: skip
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    (out_dir / "comparison.md").write_text(markdown)
    (out_dir / "comparison.json").write_text(json.dumps({"rows": rows, **extra}, indent=2) + "\n")
    plot(rows, out_dir / "comparison.png")
    if extra.get("gptq_quantization_seconds"):
        print(f"GPTQ quantization took {extra['gptq_quantization_seconds']:.0f} s")
    print(f"wrote {out_dir / 'comparison.md'}, comparison.json and comparison.png")


def label(row: dict) -> str:
    """The format and, for GPTQ, its settings: ``gptq.int4 g128 act-order``."""
    return f"{row['format']} {row['settings']}" if row.get("settings") else row["format"]


def difference(row: dict) -> str | None:
    """``F1 vs full`` with its sign: ``+0.70``, ``-1.24``, ``0.00``."""
    value = row.get("F1 vs full")
    return None if value is None else "0.00" if abs(value) < 0.005 else f"{value:+.2f}"


def rule(row: dict) -> str | None:
    """The no-answer rule and threshold a format was evaluated with: ``head+span >= 0.53``; None when off."""
    if row.get("threshold") is None:
        return None
    return f"{row.get('no-answer rule') or 'p_na'} >= {row['threshold']:.2f}"


def plot(rows: list[dict], path: Path) -> None:
    """Bar charts of F1 and weights size per format, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [label(row) for row in rows]
    fig, (f1_axis, size_axis) = plt.subplots(1, 2, figsize=(10, 4))
    f1_axis.bar(names, [row["F1"] for row in rows], color="tab:blue")
    f1_axis.set_ylabel("SQuAD F1")
    size_axis.bar(names, [row["weights GB"] for row in rows], color="tab:orange")
    size_axis.set_ylabel("weights (GB)")
    for axis in (f1_axis, size_axis):
        axis.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{rows[0]['questions']} SQuAD questions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
