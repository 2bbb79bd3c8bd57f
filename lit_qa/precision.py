# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Choosing a numeric precision: "auto" means bf16 where the hardware does bf16 natively, fp32 elsewhere."""

from __future__ import annotations

import torch

from lit_qa.errors import LitQAError

PRECISIONS = ("auto", "32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AMX tiles, where bf16 matmuls run several times faster than fp32.

    CPUs without them emulate bf16 and run it much slower than fp32, so "auto" must not pick it there.
    """
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


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


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype model weights are kept in under a resolved Fabric precision ("-mixed" keeps fp32 weights)."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
