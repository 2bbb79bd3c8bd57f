# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""scripts/compare.py end to end on a tiny model: every format evaluated, one table in three files."""

from __future__ import annotations

import json

import torch
from helpers import run_script
from test_finetune_lora import CONTEXTS, squad_file
from test_quantize_bnb import WIDE, make_wide_checkpoint  # 64 wide: bitsandbytes' CPU 4-bit kernels need it

from lit_qa.checkpoints.na_head import na_head_files
from lit_qa.models.config import Config
from lit_qa.models.model import GPT
from lit_qa.models.na_head import NAHeadConfig, attach_na_head
from lit_qa.quantize.comparison import add_differences, write_outputs


def run_compare(tmp_path, checkpoint, eval_file, *extra):
    """scripts/compare.py on the tiny model into tmp_path/compare, GPTQ calibrated on a repeated sentence."""
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The Normans were in Normandy in the 10th and 11th centuries. " * 40)
    out = tmp_path / "compare"
    result = run_script("scripts/compare.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file),
                        "--out_dir", str(out), "--calibration", str(calibration), "--group_size", "32",
                        "--n_samples", "4", "--precision", "32-true", "--max_new_tokens", "4", "--limit", "8",
                        *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_compare_writes_markdown_json_and_png(tmp_path):
    checkpoint = make_wide_checkpoint(tmp_path)
    out = run_compare(tmp_path, checkpoint, squad_file(tmp_path / "eval.json", articles=2), "--na_threshold", "0.5")
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["format"] for row in rows] == ["full", "bnb.int8", "bnb.nf4", "gptq.int4"]
    by_format = {row["format"]: row for row in rows}
    assert by_format["full"]["F1 vs full"] == 0.0
    assert all(row["questions"] == 8 and row["tokens/s"] > 0 for row in rows)
    # The oracle threshold on the evaluated questions scores at least the threshold actually used.
    assert all(row["best-threshold F1"] >= row["F1"] - 1e-9 for row in rows)
    # The quantized formats store their block linears in fewer bytes than fp32.
    assert by_format["bnb.nf4"]["weights GB"] < by_format["bnb.int8"]["weights GB"] < by_format["full"]["weights GB"]
    assert by_format["gptq.int4"]["weights GB"] < by_format["full"]["weights GB"]
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| gptq.int4 g32 |" in table  # GPTQ rows show their settings
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for fmt in by_format:
        assert json.loads((out / fmt / "metrics.json").read_text())["total"] == 8


def test_compare_answers_like_the_evaluators_with_head_and_per_format_calibration(tmp_path):
    """The rule evaluate/*.py use: extractive spans, the folder's no-answer head, a threshold tuned per format."""
    checkpoint = make_wide_checkpoint(tmp_path)
    torch.manual_seed(1)
    model = GPT(Config(**WIDE))
    head = attach_na_head(model, NAHeadConfig(layers=[0, 1], standardize_samples=0))
    torch.nn.init.normal_(head.proj.weight, std=1.0)  # a head that says something, so its AUC is not undefined
    for name, data in na_head_files(model).items():
        (checkpoint / name).write_bytes(data)
    calibration_file = squad_file(tmp_path / "calibration.json", articles=2)
    out = run_compare(tmp_path, checkpoint, squad_file(tmp_path / "eval.json", articles=2),
                      "--formats", "[full, gptq.int4]", "--calibration_file", str(calibration_file))  # fmt: skip
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    contexts = [context for context, _, _ in CONTEXTS]
    for row in rows:
        metrics = json.loads((out / row["format"] / "metrics.json").read_text())
        assert metrics["extractive"] is True and metrics["na_threshold_source"] == "tuned on --calibration_file"
        assert set(metrics["na_prob_auc_by_rule"]) == {"head", "span", "head+span"}  # the head was loaded
        assert row["no-answer rule"] == metrics["na_source"] and row["threshold"] == metrics["na_threshold"]
        assert 0 <= row["no-answer AUC"] <= 1 and row["span F1"] == metrics["span_HasAns_f1"]
        predictions = json.loads((out / row["format"] / "predictions.json").read_text())
        assert all(answer == "" or any(answer in context for context in contexts) for answer in predictions.values())
    table = (out / "comparison.md").read_text()
    assert f"| {rows[0]['no-answer rule']} >= {rows[0]['threshold']:.2f} |" in table


def test_compare_refuses_a_bad_calibration_file_before_any_work(tmp_path):
    checkpoint = make_wide_checkpoint(tmp_path)
    bad = tmp_path / "val.json"
    bad.write_text("{not json")
    out = tmp_path / "compare"
    result = run_script("scripts/compare.py", "--checkpoint_dir", str(checkpoint), "--out_dir", str(out),
                        "--eval_file", str(squad_file(tmp_path / "eval.json", articles=1)),
                        "--formats", "[full]", "--calibration_file", str(bad))  # fmt: skip
    assert result.returncode != 0 and str(bad) in result.stderr and not (out / "full").exists()


def test_comparison_table_cells(tmp_path):
    """Signed differences, the rule with its threshold, '-' where a value is missing (no threshold: rule off)."""
    rows = [{"format": "full", "F1": 50.0, "questions": 2, "weights GB": 0.5, "threshold": 0.785,
             "no-answer rule": "head+span"},
            {"format": "gptq.int4", "settings": "g128", "F1": 51.5, "questions": 2, "weights GB": 0.2,
             "threshold": None},
            {"format": "bnb.nf4", "F1": 48.76, "questions": 2, "weights GB": 0.2, "threshold": 0.5}]  # fmt: skip
    write_outputs(tmp_path, add_differences(rows), {})
    lines = (tmp_path / "comparison.md").read_text().splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header = cells[0]
    column = {name: [row[header.index(name)] for row in cells[2:]] for name in header}
    assert column["format"] == ["full", "gptq.int4 g128", "bnb.nf4"]
    assert column["F1 vs full"] == ["0.00", "+1.50", "-1.24"]
    assert column["no-answer rule"] == ["head+span >= 0.79", "-", "p_na >= 0.50"]
    assert column["span F1"] == ["-", "-", "-"]
