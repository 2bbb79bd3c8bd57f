# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Convert a llama.cpp GGUF file (LLaMA architecture) into a lit-qa checkpoint folder.

    from lit_qa.convert_gguf import convert_gguf
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "checkpoints/SmolLM2-135M-Instruct")

Every tensor is dequantized to ``dtype`` (any type ``gguf.quants.dequantize`` knows: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...), one at a time, and streamed into ``lit_model.safetensors``, so the
peak memory is one tensor on top of the memory-mapped GGUF file. The tokenizer, which a GGUF stores as
metadata (tokens, merges, token types), is rebuilt as a Hugging Face ``tokenizer.json``.

GGUF lists shapes fastest-dimension first (ggml's ``ne``), the reverse of PyTorch's ``(out, in)``.
llama.cpp also reorders the rows of q and k in each head: it rotates interleaved pairs, while Hugging
Face and lit-qa rotate the two halves of a head against each other (``apply_rope`` in ``model.py``).
One head of size 8, where (x_i, y_i) are rotated together::

    Hugging Face / lit-qa ("rotate half"):  x0 x1 x2 x3 y0 y1 y2 y3
    GGUF / Meta's original (interleaved):   x0 y0 x1 y1 x2 y2 x3 y3

`lit_qa.checkpoints.gguf_reader` reads the file; its `_unpermute` undoes ``LlamaModel.permute`` of llama.cpp's
``convert_hf_to_gguf.py`` (MIT license, https://github.com/ggml-org/llama.cpp).
`lit_qa.checkpoints.gguf_tokenizer` rebuilds the tokenizer.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lit_qa.checkpoints.folder import WEIGHTS_FILE
from lit_qa.checkpoints.gguf_reader import GGUFFile, config_from_gguf, converted_tensor, plan_tensors, torch_shape
from lit_qa.checkpoints.gguf_tokenizer import (
    gguf_tokenizer_files,
)
from lit_qa.errors import LitQAError
from lit_qa.files import check_out_dir, write_folder_atomically
from lit_qa.models.config import CONFIG_FILE

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Convert a LLaMA-architecture GGUF file into a checkpoint folder.

    The folder gets ``lit_model.safetensors``, ``lit_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json`` and ``generation_config.json``. It is built next to ``out_dir`` and renamed
    into place at the end, so an interrupted conversion never leaves a folder that looks like a checkpoint.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: The checkpoint folder to create.
        name: ``Config.name`` to record; defaults to the file's ``general.name``, then its file name.
        dtype: Dtype of the saved weights: ``torch.float32`` (exact for every GGUF type), ``torch.float16`` or
            ``torch.bfloat16``.
        overwrite: Replace ``out_dir`` if it exists and is not empty.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If the file is missing or not GGUF, the architecture is not LLaMA, a tensor has a type
            that cannot be dequantized, the metadata is incomplete, or ``out_dir`` is not empty and
            ``overwrite`` is False.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise LitQAError(f"dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16")
    check_out_dir(out_dir, overwrite)  # fail before the slow part
    source = GGUFFile(gguf_path)
    config = config_from_gguf(source, name)
    plan = plan_tensors(source, config)
    tokenizer_files = gguf_tokenizer_files(source, config)
    with write_folder_atomically(out_dir, overwrite) as tmp:

        def load(key: str) -> torch.Tensor:
            return converted_tensor(source, key, plan[key], config)

        shapes = {key: torch_shape(tensor) for key, tensor in plan.items()}
        _write_safetensors(tmp / WEIGHTS_FILE, shapes, load, dtype)
        config.save(tmp / CONFIG_FILE)
        for file_name, content in tokenizer_files.items():
            (tmp / file_name).write_text(content, encoding="utf-8")
    return Path(out_dir)


def _write_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], load: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> None:
    """Stream tensors into a safetensors file, holding only one of them in memory at a time.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
    and byte range, then the raw bytes (https://github.com/huggingface/safetensors). The header needs only
    the shapes, which GGUF gives without dequantizing, so it is written first and ``load(key)`` is called
    once per tensor afterwards.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for key, shape in shapes.items():
            w = load(key).to(dtype).contiguous()
            assert tuple(w.shape) == shape, (key, tuple(w.shape), shape)
            f.write(w.reshape(-1).view(torch.uint8).numpy())


# --- tokenizer -------------------------------------------------------------------------------------------------
# llama.cpp's token types (gguf.TokenType): which ids are special tokens rather than text.
