# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Reading a llama.cpp GGUF file: its config, its tensors (dequantized by the ``gguf`` package) and llama.cpp's
row order of q and k undone (see `lit_qa.checkpoints.convert_gguf`).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lit_qa.checkpoints.folder import expected_shapes
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.model import apply_llama3_rope_scaling

# GGUF tensor name -> lit-qa name; "{}" is the layer index.
_LAYER_NAMES = {
    "blk.{}.attn_norm.weight": "transformer.h.{}.norm_1.weight",
    "blk.{}.attn_q.weight": "transformer.h.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "transformer.h.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "transformer.h.{}.attn.v_proj.weight",
    "blk.{}.attn_output.weight": "transformer.h.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "transformer.h.{}.norm_2.weight",
    "blk.{}.ffn_gate.weight": "transformer.h.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "transformer.h.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "transformer.h.{}.mlp.down_proj.weight",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
}

# Llama-3.1 style RoPE scaling is stored as per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
REQUIRED = object()


def read_gguf_config(gguf_path: str | Path, name: str | None = None) -> Config:
    """Build the `Config` a GGUF file describes, without converting anything.

    Args:
        gguf_path: The ``.gguf`` file.
        name: ``Config.name`` to record; defaults to the file's ``general.name``, then its file name.

    Returns:
        The config, as `convert_gguf` would save it.

    Raises:
        LitQAError: If the file is missing or not GGUF, the architecture is not LLaMA or the metadata is incomplete.
    """
    return config_from_gguf(GGUFFile(gguf_path), name)


class GGUFFile:
    """A memory-mapped GGUF file with metadata lookups whose errors name the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LitQAError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, OSError, struct.error, UnicodeDecodeError) as e:
            # GGUFReader says "GGUF magic invalid" for other files and fails in numpy on truncated ones.
            raise LitQAError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def get(self, key: str, default: Any = REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is REQUIRED:
                raise self.error(f"metadata key {key!r} is missing")
            return default
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # Print float32 values at their shortest (1e-05, not 9.999999747378752e-06); same float32 value.
            value = float(str(np.float32(value)))
        return value

    def error(self, message: str) -> LitQAError:
        return LitQAError(f"{self.path}: {message}")


def config_from_gguf(source: GGUFFile, name: str | None) -> Config:
    arch = source.get("general.architecture")
    if arch != "llama":
        raise source.error(f"architecture {arch!r} is not supported; lit-qa converts 'llama' GGUF files only")
    if source.get("llama.expert_count", 0):
        raise source.error("mixture-of-experts models are not supported")
    embedding = source.tensors.get("token_embd.weight")
    if embedding is None:
        raise source.error("tensor 'token_embd.weight' is missing")
    padded_vocab_size = int(embedding.shape[-1])  # ne order: (n_embd, vocab)
    tokens = source.get("tokenizer.ggml.tokens", None)
    values = dict(
        name=name or source.get("general.name", None) or source.path.stem,
        block_size=source.get("llama.context_length"),
        vocab_size=len(tokens) if tokens else source.get("llama.vocab_size", padded_vocab_size),
        padded_vocab_size=padded_vocab_size,
        n_layer=source.get("llama.block_count"),
        n_head=source.get("llama.attention.head_count"),
        n_embd=source.get("llama.embedding_length"),
        intermediate_size=source.get("llama.feed_forward_length"),
        rope_base=source.get("llama.rope.freq_base", 10000.0),
        norm_eps=source.get("llama.attention.layer_norm_rms_epsilon"),
        tie_embeddings="output.weight" not in source.tensors,
    )
    values["n_query_groups"] = source.get("llama.attention.head_count_kv", values["n_head"])
    for key, value in values.items():
        # Some GGUFs give per-layer lists (e.g. head_count_kv); LLaMA-family configs need one number.
        if isinstance(value, list):
            raise source.error(f"per-layer values for {key} are not supported: {value[:4]}...")
    try:
        config = Config(**values)
    except LitQAError as e:
        raise source.error(str(e)) from None
    rope_dims = source.get("llama.rope.dimension_count", config.head_size)
    if rope_dims != config.head_size:
        raise source.error(f"partial rotary embeddings ({rope_dims} of {config.head_size} dims) are not supported")
    config.rope_scaling = _read_rope_scaling(source, config)
    return config


def _read_rope_scaling(source: GGUFFile, config: Config) -> dict[str, float] | None:
    """Recognize Llama-3.1 RoPE scaling, the only kind lit-qa's model implements.

    llama.cpp writes no parameters for it: it stores the resulting per-frequency divisors as the
    ``rope_freqs.weight`` tensor. We recompute those divisors from Llama 3.1's published parameters
    (low 1, high 4, original context 8192; the factor is the largest divisor) and accept them only on a match.
    """
    kind = source.get("llama.rope.scaling.type", "none")
    if kind != "none":
        raise source.error(f"RoPE scaling type {kind!r} is not supported (only Llama-3.1 style)")
    tensor = source.tensors.get(_ROPE_FREQS)
    if tensor is None:
        return None
    divisors = torch.from_numpy(_dequantize(source, tensor)).reshape(-1)
    scaling = dict(
        factor=float(str(np.float32(divisors.max().item()))),
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_seq_len=float(source.get("llama.rope.scaling.original_context_length", 8192)),
    )
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, config.head_size, 2).double() / config.head_size))
    expected = inv_freq / apply_llama3_rope_scaling(inv_freq, **scaling)
    if divisors.shape != expected.shape or not torch.allclose(divisors.double(), expected, rtol=1e-3):
        raise source.error(f"{_ROPE_FREQS} does not match Llama-3.1 RoPE scaling; other scalings are not supported")
    return scaling


def plan_tensors(source: GGUFFile, config: Config) -> dict[str, gguf.ReaderTensor]:
    """Map every lit-qa weight to its GGUF tensor, checking names and shapes before anything is written."""
    names = dict(_GLOBAL_NAMES)
    for i in range(config.n_layer):
        names.update({gguf_name.format(i): lit_name.format(i) for gguf_name, lit_name in _LAYER_NAMES.items()})
    if config.tie_embeddings:
        del names["output.weight"]
    if unexpected := sorted(source.tensors.keys() - names.keys() - {_ROPE_FREQS}):
        raise source.error(f"unexpected tensors for a LLaMA model: {', '.join(unexpected[:5])}")
    if missing := sorted(names.keys() - source.tensors.keys()):
        raise source.error(f"missing tensors: {', '.join(missing[:5])}")
    shapes = expected_shapes(config)
    plan = {}
    for gguf_name, lit_name in names.items():
        tensor = source.tensors[gguf_name]
        shape = torch_shape(tensor)
        if shape != tuple(shapes[lit_name]):
            raise source.error(f"tensor {gguf_name} has shape {shape}, the config expects {tuple(shapes[lit_name])}")
        plan[lit_name] = tensor
    # Write in model order (embedding, blocks, final norm, head), which is what a reader of the file expects.
    return {key: plan[key] for key in shapes if key in plan}


def torch_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml ne order -> (out, in)


def _dequantize(source: GGUFFile, tensor: gguf.ReaderTensor) -> np.ndarray:
    """Dequantize one tensor to float32 with its PyTorch shape."""
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise source.error(
            f"tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf {_gguf_version()} cannot dequantize"
        ) from None
    if not array.flags.writeable:
        # F32 comes back as a view of the read-only memory map, which torch.from_numpy warns about.
        array = array.copy()
    return array.reshape(torch_shape(tensor))


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: interleaved rotary pairs back to rotate-half, per head."""
    rest = w.shape[1:]
    # (n_head * hs, in) -> (n_head, hs/2, 2, in) -> (n_head, 2, hs/2, in) -> (n_head * hs, in)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def converted_tensor(source: GGUFFile, key: str, tensor: gguf.ReaderTensor, config: Config) -> torch.Tensor:
    w = torch.from_numpy(_dequantize(source, tensor))
    if key.endswith("attn.q_proj.weight"):
        w = _unpermute(w, config.n_head)
    elif key.endswith("attn.k_proj.weight"):
        w = _unpermute(w, config.n_query_groups)
    return w
