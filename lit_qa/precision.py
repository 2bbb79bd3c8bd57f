# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Choosing a numeric precision: "auto" means bf16 where the hardware does bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from lit_qa.errors import LitQAError

PRECISIONS = ("auto", "32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True on CPUs with bf16 matmul instructions: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16
    (e.g. AMD Zen 4). bf16 matmuls run several times faster than fp32 there: ~6x with AMX, 5x on a 2-core AMD
    EPYC with AVX512-BF16 (one LoRA training step of the demo 2.4x faster, benchmarks/demo_budget.py).

    CPUs with neither emulate bf16 and run it much slower than fp32, so "auto" must not pick it there. The
    AVX512-BF16 flag is read from ``cpuinfo`` (Linux); elsewhere only torch's AMX probe counts.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe and probe():
        return True
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str = "auto", accelerator: str = "auto") -> str:
    """Turn "auto" into a Fabric precision string; validate anything else.

    Args:
        precision: One of `PRECISIONS`.
        accelerator: "cpu", "cuda"/"gpu", or "auto" (CUDA if available).

    Returns:
        "bf16-true" on GPUs and on CPUs with native bf16, "32-true" elsewhere, or ``precision`` itself.
    """
    if precision not in PRECISIONS:
        raise LitQAError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "bf16-true" if cpu_has_native_bf16() else "32-true"


def inference_precision(precision: str = "auto", device: str = "auto") -> str:
    """`resolve_precision` for generation and evaluation: bf16 asked for on a CPU without native bf16 falls back to
    32-true with one line saying so (emulated bf16 decodes many times slower than fp32 there).

    Training keeps what it is given (`resolve_precision`): there a user may want bf16's numerics whatever the speed.
    """
    resolved = resolve_precision(precision, device)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and resolved.startswith("bf16") and not cpu_has_native_bf16():
        print(f"note: --precision {precision}: this CPU has no native bf16 (no AMX or AVX512-BF16), where bf16 "
              "runs many times slower than fp32; decoding in 32-true instead", file=sys.stderr)  # fmt: skip
        return "32-true"
    return resolved


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype model weights are kept in under a resolved Fabric precision ("-mixed" keeps fp32 weights)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when a GPU is available, else "cpu"."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """Mixed precision keeps float32 weights and computes in half precision; "-true" precisions need nothing."""
    if not precision.endswith("-mixed"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
