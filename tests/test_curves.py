# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""``curves.png`` (`lit_qa.training.curves`): read from the CSV logs (a resumed run's later version wins), drawn with
an F1 panel only when the run validated F1, and bigger with more points."""

import math
import struct

from lit_qa.training.curves import plot_curves, read_logged_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def write_csv(path, rows):
    path.parent.mkdir(parents=True)
    keys = sorted({key for row in rows for key in row})
    lines = [",".join(keys)] + [",".join(str(row.get(key, "")) for key in keys) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def test_series_come_from_every_version_and_the_later_one_wins(tmp_path):
    write_csv(tmp_path / "version_0" / "metrics.csv", [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.5},
                                                        {"step": 2, "val/loss": 2.7, "val/f1": 10.0}])  # fmt: skip
    write_csv(tmp_path / "version_1" / "metrics.csv", [{"step": 2, "train/loss": 2.4}, {"step": 3, "train/loss": "nan"},
                                                        {"step": 4, "train/lr": 0.1}])  # fmt: skip
    series = read_logged_series(tmp_path)
    assert series["train/loss"] == {1: 3.0, 2: 2.4}  # resumed from step 2; the NaN is not drawn
    assert series["val/loss"] == {2: 2.7} and series["val/f1"] == {2: 10.0}


def test_curves_have_an_f1_panel_only_with_f1_and_grow_with_the_points(tmp_path):
    def series(n: int, with_val: bool) -> dict:
        train = {step: 3 / (1 + step) + 0.2 * math.sin(step) for step in range(1, n + 1)}
        val = {step: 2 + 1 / step for step in range(5, n + 1, 5)} if with_val else {}
        f1 = {step: 40 + 10 * math.log(step) for step in range(5, n + 1, 5)} if with_val else {}
        return {"train/loss": train, "val/loss": val, "val/f1": f1}

    few = plot_curves(series(10, True), tmp_path / "few.png", best_step=10)
    many = plot_curves(series(200, True), tmp_path / "many.png", best_step=150)
    train_only = plot_curves(series(10, False), tmp_path / "train.png")
    assert png_size(few) == png_size(many) and png_size(many)[0] > png_size(train_only)[0]
    assert many.stat().st_size > few.stat().st_size
    unmarked = plot_curves(series(10, True), tmp_path / "unmarked.png")
    assert unmarked.read_bytes() != few.read_bytes()  # the best-step line is drawn
    assert not list(tmp_path.glob("*.tmp"))
