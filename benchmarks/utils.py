# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Shared helpers for the benchmark scripts: machine description, timing, result tables."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from pathlib import Path

import torch

from lit_qa import files
from lit_qa.errors import LitQAError
from lit_qa.models.lora import LoRAConfig
from lit_qa.precision import cpu_has_native_bf16
from lit_qa.training.args import EvalArgs, TrainArgs


def describe_machine() -> dict[str, object]:
    """What the numbers were measured on: CPU model, cores/threads, native bf16, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``fn`` (after one untimed warm-up run).

    The minimum is the least disturbed by other processes on a shared machine.
    """
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table(rows: list[dict[str, object]]) -> None:
    """Print rows as a Markdown table (columns from the first row)."""
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print("| " + " | ".join(cells) + " |")


def write_results(path: Path, payload: dict[str, object]) -> None:
    """Write a benchmark's results (`lit_qa.files.write_json`) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, payload)
    print(f"wrote {path}")


@dataclass
class DemoConfig:
    """What the benchmarks read from a finetune config YAML (the demo's ``configs/lora-smollm2-cpu.yaml``)."""

    data_dir: Path
    checkpoint_dir: Path
    train: TrainArgs
    eval: EvalArgs
    lora: LoRAConfig


def read_demo_config(path: Path) -> DemoConfig:
    """Read a finetune config YAML as `DemoConfig`; its prepared data must exist (run scripts/demo.sh first)."""
    import yaml

    settings = yaml.safe_load(Path(path).read_text())
    data_dir, checkpoint_dir = Path(settings["data_dir"]), Path(settings["checkpoint_dir"])
    if not (data_dir / "train.pt").is_file():
        raise LitQAError(f"{data_dir}/train.pt does not exist: run scripts/demo.sh (or scripts/prepare_squad.py) first")
    return DemoConfig(data_dir, checkpoint_dir, replace(TrainArgs(), **settings.get("train", {})),
                      replace(EvalArgs(), **settings.get("eval", {})), LoRAConfig(**settings.get("lora", {})))  # fmt: skip
