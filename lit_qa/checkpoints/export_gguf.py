# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Export a lit-qa checkpoint folder (a base or a merged fine-tune) as a llama.cpp GGUF file, for llama.cpp and
Ollama, written with the ``gguf`` package (the format's own library)::

    python scripts/convert_checkpoint.py --to gguf --source out/merged --out_dir out/gguf --gguf_type Q8_0

The file is what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama model: the ``llama.*`` hyperparameters,
the tensors under llama.cpp's names with the rows of q and k reordered for its interleaved RoPE (the inverse of
`lit_qa.checkpoints.gguf_reader._unpermute`), Llama-3.1 RoPE scaling as ``rope_freqs.weight``, and the tokenizer
(byte-level BPE: tokens, token types, merges, special ids) with the chat template. A fine-tune's SQuAD prompt is
recorded under ``lit_qa.*`` keys (prompt style, template, no-answer string) so a server can be set up to ask it
the way it was trained. Norms stay F32 (as llama.cpp keeps them); a Q8_0 tensor whose rows are not a multiple
of 32 is written F16 instead. Tensors are streamed one at a time: the peak memory is one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from lit_qa.checkpoints.folder import WEIGHTS_FILE, check_checkpoint_dir
from lit_qa.checkpoints.gguf_reader import _GLOBAL_NAMES, _LAYER_NAMES, _ROPE_FREQS
from lit_qa.errors import LitQAError
from lit_qa.files import check_out_dir
from lit_qa.models.config import Config
from lit_qa.models.model import apply_llama3_rope_scaling

GGUF_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# tokenizer.json pre-tokenizers -> llama.cpp's tokenizer.ggml.pre (the ones `lit_qa.checkpoints.gguf_tokenizer` reads)
_GPT2 = {"type": "ByteLevel", "use_regex": True}
_PRE_TOKENIZERS = {
    "gpt2": [_GPT2],
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2],
    "llama-bpe": [{"type": "Split"}, {"type": "ByteLevel", "use_regex": False}],
}


def export_gguf(checkpoint_dir: str | Path, out_dir: str | Path, gguf_type: str = "F16", overwrite: bool = False,
                prompt: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write ``<out_dir>/<model name>-<gguf_type>.gguf`` from a lit-qa checkpoint folder.

    Args:
        checkpoint_dir: A lit-qa checkpoint folder (``lit_model.safetensors``, ``lit_config.json``, tokenizer).
        out_dir: The folder to write the file into; it must not exist or be empty unless ``overwrite``.
        gguf_type: ``F32``, ``F16``, ``BF16`` or ``Q8_0`` for the weight matrices.
        overwrite: Replace a non-empty ``out_dir``'s file of the same name.
        prompt: ``lit_qa.*`` metadata to record, e.g. ``{"prompt_style": "plain", "no_answer": "unanswerable"}``.

    Returns:
        The path of the GGUF file.

    Raises:
        LitQAError: If the folder is not a checkpoint, ``gguf_type`` is unknown, the tokenizer is not byte-level
            BPE with a pre-tokenizer llama.cpp knows, or ``out_dir`` is not empty without ``overwrite``.
    """
    if gguf_type not in GGUF_TYPES:
        raise LitQAError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    config = Config.from_checkpoint(checkpoint_dir)
    out_dir = check_out_dir(out_dir, overwrite)
    path = out_dir / f"{config.name}-{gguf_type}.gguf"
    tmp = path.with_name(path.name + ".partial")  # renamed into place once complete
    out_dir.mkdir(parents=True, exist_ok=True)
    qtype, file_type = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        _add_hyperparameters(writer, config, file_type)
        _add_tokenizer(writer, checkpoint_dir, config)
        for key, value in (prompt or {}).items():
            writer.add_string(f"lit_qa.{key}", value)
        _write_tensors(writer, checkpoint_dir, config, qtype)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(path)
    return path


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Config, file_type: gguf.LlamaFileType) -> None:
    writer.add_name(config.name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint_dir: Path, config: Config) -> None:
    """Byte-level BPE (SmolLM2, Llama-3) as llama.cpp's ``gpt2`` tokenizer model."""
    path = checkpoint_dir / "tokenizer.json"
    if not path.is_file():
        raise LitQAError(f"{checkpoint_dir}: tokenizer.json is missing (GGUF export needs the Hugging Face tokenizer)")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LitQAError(f"{path}: only byte-level BPE tokenizers (SmolLM2, Llama-3) are exported to GGUF so far")
    tokens, types = _token_list(tokenizer, config.vocab_size, path)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer.get("pre_tokenizer"), path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    settings = _read_optional_json(checkpoint_dir / "tokenizer_config.json")
    ids = {token: i for i, token in enumerate(tokens)}
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        token = settings.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            add(ids[token])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(settings.get("add_eos_token", False)))
    if settings.get("chat_template"):
        writer.add_chat_template(settings["chat_template"])


def _token_list(tokenizer: dict[str, Any], vocab_size: int, path: Path) -> tuple[list[str], list[int]]:
    """Every token by id with its GGUF type (control for special added tokens, user-defined for the other added
    ones); ids no token uses are filled with ``[PAD<id>]`` (unused), as llama.cpp's converter does."""
    by_id: dict[int, str] = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise LitQAError(f"{path}: token id {max(by_id)} is outside the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    return tokens, [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]


def _pre_tokenizer_name(pre: dict[str, Any] | None, path: Path) -> str:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    for name, expected in _PRE_TOKENIZERS.items():
        if len(steps) == len(expected) and all(all(step.get(k) == v for k, v in want.items())
                                               for step, want in zip(steps, expected)):  # fmt: skip
            return name
    raise LitQAError(
        f"{path}: its pre-tokenizer matches none llama.cpp is known to read ({', '.join(_PRE_TOKENIZERS)})"
    )


def _read_optional_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_tensors(
    writer: gguf.GGUFWriter, checkpoint_dir: Path, config: Config, qtype: gguf.GGMLQuantizationType
) -> None:
    """Register every tensor's name, shape and type, write the header, then stream the data in the same order."""
    names = gguf_tensor_names(config)
    with safe_open(checkpoint_dir / WEIGHTS_FILE, framework="pt") as weights:
        if missing := sorted(set(names) - set(weights.keys())):
            raise LitQAError(f"{checkpoint_dir / WEIGHTS_FILE}: missing tensors {', '.join(missing[:5])}")
        shapes = {lit: tuple(weights.get_slice(lit).get_shape()) for lit in names}
        plan = [(lit, name, _tensor_type(list(shapes[lit]), qtype)) for lit, name in names.items()]
        for lit, name, kind in plan:
            _add_info(writer, name, shapes[lit], kind)
        if config.rope_scaling:
            _add_info(writer, _ROPE_FREQS, (config.head_size // 2,), gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for lit, _, kind in plan:
            writer.write_tensor_data(_encoded(gguf_weight(lit, weights.get_tensor(lit), config), kind))
        if config.rope_scaling:
            writer.write_tensor_data(_rope_divisors(config))


def gguf_tensor_names(config: Config) -> dict[str, str]:
    """lit-qa tensor name -> llama.cpp's, in model order (no ``output.weight`` with tied embeddings)."""
    names = {lit: name for name, lit in _GLOBAL_NAMES.items()}
    for i in range(config.n_layer):
        names.update({lit.format(i): name.format(i) for name, lit in _LAYER_NAMES.items()})
    if config.tie_embeddings:
        del names["lm_head.weight"]
    order = ["transformer.wte.weight", *(k for k in names if k.startswith("transformer.h.")),
             "transformer.ln_f.weight", "lm_head.weight"]  # fmt: skip
    return {key: names[key] for key in order if key in names}


def gguf_weight(key: str, weight: torch.Tensor, config: Config) -> torch.Tensor:
    """A lit-qa weight as llama.cpp stores it: float32, q and k rows permuted for interleaved RoPE."""
    weight = weight.float()
    if key.endswith("attn.q_proj.weight"):
        return _permute(weight, config.n_head)
    if key.endswith("attn.k_proj.weight"):
        return _permute(weight, config.n_query_groups)
    return weight


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``permute``: each head's rotate-half rows into interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_type(shape: list[int], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32  # norms: tiny, and llama.cpp computes them in F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _add_info(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> None:
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
    writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)


def _encoded(weight: torch.Tensor, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    array = weight.numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return array
    if kind == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind).view(np.uint8)


def _rope_divisors(config: Config) -> np.ndarray:
    """Llama-3.1 RoPE scaling as llama.cpp stores it: per-frequency divisors (`gguf_reader._read_rope_scaling`)."""
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, config.head_size, 2).double() / config.head_size))
    return (inv_freq / apply_llama3_rope_scaling(inv_freq, **config.rope_scaling)).float().numpy()
