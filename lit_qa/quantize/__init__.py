# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Quantized models, one file each:

- `modes`: the ``--quantize`` modes: checking the flags, quantizing a loaded model (`quantize_model`), weight sizes.
- `bnb`: bitsandbytes int8 / nf4 / fp4 layers (also QLoRA's frozen base).
- `weight_only`: weight-only int8 and round-to-nearest int4 layers for fast decoding.
- `int4`: the packed int4 / int8 format and `Int4Linear`.
- `gptq`: GPTQ's step on one weight matrix; `gptq_model`: GPTQ over a whole model with calibration data.
- `comparison`: ``scripts/compare.py``'s table of formats.

The names of `modes` are re-exported here, so ``from lit_qa.quantize import check_quantize_args`` works too.
"""

from lit_qa.quantize.modes import (
    QUANTIZE_CHOICES,
    QUANTIZE_RECORD_FILE,
    WEIGHT_ONLY_MODES,
    check_qlora_args,
    check_quantize_args,
    quantize_model,
    quantize_record,
    warn_if_trained_quantized,
    weights_size_bytes,
)

__all__ = [
    "QUANTIZE_CHOICES",
    "QUANTIZE_RECORD_FILE",
    "WEIGHT_ONLY_MODES",
    "check_qlora_args",
    "check_quantize_args",
    "quantize_model",
    "quantize_record",
    "warn_if_trained_quantized",
    "weights_size_bytes",
]
