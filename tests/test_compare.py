# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""scripts/compare.py end to end on a tiny model: every format evaluated, one table in three files."""

from __future__ import annotations

import json

from helpers import run_script
from test_finetune_lora import squad_file
from test_quantize_bnb import make_wide_checkpoint  # 64 wide: bitsandbytes' CPU 4-bit kernels need it


def test_compare_writes_markdown_json_and_png(tmp_path):
    checkpoint = make_wide_checkpoint(tmp_path)
    eval_file = squad_file(tmp_path / "eval.json", articles=2)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The Normans were in Normandy in the 10th and 11th centuries. " * 40)
    out = tmp_path / "compare"
    result = run_script("scripts/compare.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file),
                        "--out_dir", str(out), "--calibration", str(calibration), "--group_size", "32",
                        "--n_samples", "4", "--precision", "32-true", "--max_new_tokens", "4", "--limit", "8",
                        "--na_threshold", "0.5")  # fmt: skip
    assert result.returncode == 0, result.stderr
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
