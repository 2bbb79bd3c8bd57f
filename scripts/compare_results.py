# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Put several evaluation runs side by side in one Markdown table.

    python scripts/compare_results.py --runs '[base=out/evaluate/base, lora=out/evaluate/lora]' --out results.md

Each run is ``label=path``, where the path is a ``metrics.json`` written by ``evaluate/*.py`` or the folder
holding it. ``na_prob AUC`` is how well the run's no-answer probability separates unanswerable from answerable
questions (0.5 = chance; a dash for plain greedy decoding, which has none). The table ends with the "always
no-answer" floor on the same questions. Runs scored on different question sets (another ``--limit``,
``--seed``, ``--subset`` or eval file) are refused, since their numbers do not compare.

``F1 vs no-answer (95% CI)`` is the run's F1 minus the always-no-answer F1, ``+7.27 [+4.10, +10.52]``: the
difference and its paired bootstrap 95% interval over the questions (`lit_qa.evaluation.bootstrap`, 10,000
resamples, seed 0, so the same runs always print the same interval). An interval across 0 means that the run
is not clearly better than never answering on these questions. It is computed from the per-question scores
the evaluation wrote beside ``metrics.json`` (``question_scores.json``: each question's official F1 of
``predictions.json`` and of answering "no answer"); a run evaluated before that file existed shows a dash, with a
note under the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.bootstrap import paired_bootstrap
from lit_qa.evaluation.results import METRICS_FILE, QUESTION_SCORES_FILE
from lit_qa.files import read_json

COLUMNS = ("run", "questions", "EM", "F1", "HasAns F1", "NoAns accuracy", "na_prob AUC", "F1 vs no-answer (95% CI)",
           "questions/s")  # fmt: skip
REQUIRED = ("exact", "f1", "num_questions", "question_ids_sha256", "no_answer_baseline")


def main(runs: list[str], out: Path | None = None) -> str:
    """Print a Markdown table comparing evaluation runs.

    Args:
        runs: Items ``label=path/to/metrics.json`` (or ``label=folder`` holding metrics.json).
        out: Also write the table to this Markdown file.
    """
    if not runs:
        raise LitQAError("give at least one run as label=path/to/metrics.json")
    loaded = [load_run(item) for item in runs]
    check_same_questions(loaded)
    rows, notes = [], []
    for label, metrics, path in loaded:
        versus_no_answer, note = f1_vs_no_answer(metrics, path)
        rows.append(row(label, metrics, versus_no_answer, metrics.get("questions_per_second")))
        if note:
            notes.append(f"- {label}: {note}")
    rows.append(row("always no-answer", loaded[0][1]["no_answer_baseline"], None, None))
    table = markdown_table(rows)
    if notes:  # under the table, so a saved table explains its own dashes
        table += "\n\nNo interval for:\n" + "\n".join(notes)
    print(table)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")
    return table


def load_run(item: str) -> tuple[str, dict[str, Any], Path]:
    """Parse ``label=path`` and read the metrics file; the label defaults to the folder name."""
    label, sep, path_text = item.partition("=")
    if not sep:
        label, path_text = "", item
    path = Path(path_text)
    if path.is_dir():
        path = path / METRICS_FILE
    metrics = read_json(path)  # LitQAError naming the file if it is missing or not JSON
    if not isinstance(metrics, dict) or (missing := [k for k in REQUIRED if k not in metrics]):
        raise LitQAError(f"{path} is not a metrics file of evaluate/*.py (missing {', '.join(missing)})")
    return label or path.parent.name, metrics, path


def check_same_questions(loaded: list[tuple[str, dict[str, Any], Path]]) -> None:
    """Refuse runs scored on different questions, naming the first one that differs."""
    _, first, first_path = loaded[0]
    for label, metrics, path in loaded[1:]:
        if (metrics["num_questions"], metrics["question_ids_sha256"]) != (
            first["num_questions"], first["question_ids_sha256"]
        ):  # fmt: skip
            raise LitQAError(
                f"{path} ({label}, {metrics['num_questions']} questions) was computed on other questions than "
                f"{first_path} ({first['num_questions']} questions); evaluate both with the same eval file, "
                "--limit, --seed and --subset"
            )


def f1_vs_no_answer(metrics: dict[str, Any], metrics_path: Path) -> tuple[str | None, str | None]:
    """The run's F1 minus always-no-answer's with its paired bootstrap 95% interval, as ``+7.27 [+4.10, +10.52]``,
    from the ``question_scores.json`` beside ``metrics_path``.

    Returns:
        The cell and no note, or no cell and a note saying why (no such file: evaluated before it was written; or
        a file that does not hold this run's scores).
    """
    path = metrics_path.parent / QUESTION_SCORES_FILE
    if not path.is_file():
        return None, f"{path} is missing (evaluated before per-question scores were written); evaluate again"
    scores = read_json(path)
    try:
        f1 = [100.0 * s["f1"] for s in scores.values()]
        no_answer_f1 = [100.0 * s["no_answer_f1"] for s in scores.values()]
    except (AttributeError, KeyError, TypeError):
        return None, f"{path} is not a per-question scores file of evaluate/*.py"
    # The means must be metrics.json's: a file left from another run in the folder would pair other answers.
    if len(f1) != metrics["num_questions"] or any(
        abs(sum(values) / len(values) - total) > 1e-6
        for values, total in ((f1, metrics["f1"]), (no_answer_f1, metrics["no_answer_baseline"]["f1"]))
    ):  # fmt: skip
        return None, f"{path} does not hold the scores of {metrics_path}"
    mean, low, high = paired_bootstrap(f1, no_answer_f1)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]", None


def row(label: str, metrics: dict[str, Any], versus_no_answer: str | None,
        questions_per_second: float | None) -> list[str]:  # fmt: skip
    """One table row; a group with no questions (e.g. no unanswerable ones), or no interval, shows a dash."""
    return [
        label,
        str(metrics.get("num_questions", metrics.get("total", ""))),
        f"{metrics['exact']:.2f}",
        f"{metrics['f1']:.2f}",
        f"{metrics['HasAns_f1']:.2f}" if "HasAns_f1" in metrics else "-",
        f"{metrics['NoAns_exact']:.2f}" if "NoAns_exact" in metrics else "-",
        f"{metrics['na_prob_auc']:.3f}" if metrics.get("na_prob_auc") is not None else "-",
        versus_no_answer or "-",
        f"{questions_per_second:.2f}" if questions_per_second is not None else "-",
    ]


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table with the `COLUMNS` header; numbers right-aligned, cells padded to line up."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    header = "| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + " |"
    body = ["| " + " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            + " |" for r in rows]  # fmt: skip
    return "\n".join([header, rule, *body])


if __name__ == "__main__":
    run_cli(main)
