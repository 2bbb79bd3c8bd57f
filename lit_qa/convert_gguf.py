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

`_unpermute` undoes ``LlamaModel.permute`` of llama.cpp's ``convert_hf_to_gguf.py`` (MIT license,
https://github.com/ggml-org/llama.cpp). The tokenizer rebuild follows the ideas of transformers'
``integrations/gguf/gguf_tokenizer_mapping.py`` (Apache 2.0) and the pre-tokenizer regexes of
llama.cpp's ``src/llama-vocab.cpp``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lit_qa.checkpoint import WEIGHTS_FILE, check_out_dir, expected_shapes, write_folder_atomically
from lit_qa.config import CONFIG_FILE, Config
from lit_qa.errors import LitQAError
from lit_qa.model import apply_llama3_rope_scaling

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
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_REQUIRED = object()


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
    source = _GGUFFile(gguf_path)
    config = _read_config(source, name)
    plan = _plan_tensors(source, config)
    tokenizer_files = _tokenizer_files(source, config)
    with write_folder_atomically(out_dir, overwrite) as tmp:

        def load(key: str) -> torch.Tensor:
            return _converted_tensor(source, key, plan[key], config)

        shapes = {key: _torch_shape(tensor) for key, tensor in plan.items()}
        _write_safetensors(tmp / WEIGHTS_FILE, shapes, load, dtype)
        config.save(tmp / CONFIG_FILE)
        for file_name, content in tokenizer_files.items():
            (tmp / file_name).write_text(content, encoding="utf-8")
    return Path(out_dir)


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
    return _read_config(_GGUFFile(gguf_path), name)


class _GGUFFile:
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

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise self.error(f"metadata key {key!r} is missing")
            return default
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # Print float32 values at their shortest (1e-05, not 9.999999747378752e-06); same float32 value.
            value = float(str(np.float32(value)))
        return value

    def error(self, message: str) -> LitQAError:
        return LitQAError(f"{self.path}: {message}")


def _read_config(source: _GGUFFile, name: str | None) -> Config:
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


def _read_rope_scaling(source: _GGUFFile, config: Config) -> dict[str, float] | None:
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


def _plan_tensors(source: _GGUFFile, config: Config) -> dict[str, gguf.ReaderTensor]:
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
        shape = _torch_shape(tensor)
        if shape != tuple(shapes[lit_name]):
            raise source.error(f"tensor {gguf_name} has shape {shape}, the config expects {tuple(shapes[lit_name])}")
        plan[lit_name] = tensor
    # Write in model order (embedding, blocks, final norm, head), which is what a reader of the file expects.
    return {key: plan[key] for key in shapes if key in plan}


def _torch_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ggml ne order -> (out, in)


def _dequantize(source: _GGUFFile, tensor: gguf.ReaderTensor) -> np.ndarray:
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
    return array.reshape(_torch_shape(tensor))


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: interleaved rotary pairs back to rotate-half, per head."""
    rest = w.shape[1:]
    # (n_head * hs, in) -> (n_head, hs/2, 2, in) -> (n_head, 2, hs/2, in) -> (n_head * hs, in)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _converted_tensor(source: _GGUFFile, key: str, tensor: gguf.ReaderTensor, config: Config) -> torch.Tensor:
    w = torch.from_numpy(_dequantize(source, tensor))
    if key.endswith("attn.q_proj.weight"):
        w = _unpermute(w, config.n_head)
    elif key.endswith("attn.k_proj.weight"):
        w = _unpermute(w, config.n_query_groups)
    return w


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
_UNKNOWN, _CONTROL, _USER_DEFINED = gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED

# Llama-3's split regex, as in its tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's: 's|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # StarCoder and SmolLM split every digit off first (llama.cpp's regex list starts with \p{N}).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()])


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> how text is cut into words before the merges run (llama.cpp's llama-vocab.cpp).
_BYTE_LEVEL_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo"), _gpt2_pre_tokenizer),
    **dict.fromkeys(("starcoder", "refact", "smollm", "codeshell"), _digits_gpt2_pre_tokenizer),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe"), _llama3_pre_tokenizer),
}


def _tokenizer_files(source: _GGUFFile, config: Config) -> dict[str, str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` in Hugging Face's formats."""
    kind = source.get("tokenizer.ggml.model", None)
    if kind is None:
        raise source.error("the file has no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    tokens = source.get("tokenizer.ggml.tokens")
    if len(tokens) > config.padded_vocab_size:
        raise source.error(f"{len(tokens)} tokens but the embedding has only {config.padded_vocab_size} rows")
    ids = _special_token_ids(source, len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(source, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(source, tokens, ids.get("unknown"))
    else:
        raise source.error(f"tokenizer model {kind!r} is not supported yet (only 'gpt2' and 'llama')")
    _add_special_tokens(tokenizer, tokens, source.get("tokenizer.ggml.token_type", None))

    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(source.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in ids
    add_eos = bool(source.get("tokenizer.ggml.add_eos_token", False)) and "eos" in ids
    _set_post_processor(tokenizer, kind, tokens, ids, add_bos, add_eos)

    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _to_json(_tokenizer_config(source, config, tokens, ids, add_bos, add_eos)),
        "generation_config.json": _to_json(_generation_config(ids)),
    }


def _tokenizer_config(
    source: _GGUFFile, config: Config, tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool
) -> dict[str, Any]:
    tokenizer_config: dict[str, Any] = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    for hf_name, kind in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if kind in ids:
            tokenizer_config[f"{hf_name}_token"] = tokens[ids[kind]]
    if (chat_template := source.get("tokenizer.chat_template", None)) is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config.update(
        clean_up_tokenization_spaces=False,
        model_max_length=config.block_size,
        tokenizer_class="PreTrainedTokenizerFast",  # lets transformers' AutoTokenizer open the folder too
    )
    return tokenizer_config


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    generation_config: dict[str, Any] = {"bos_token_id": ids.get("bos")}
    # Chat models may end a turn with EOT/EOM rather than EOS (Llama-3); generation stops on any of them.
    stop_ids = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    generation_config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids or None
    if "padding" in ids:
        generation_config["pad_token_id"] = ids["padding"]
    return generation_config


def _to_json(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2, ensure_ascii=False) + "\n"


def _special_token_ids(source: _GGUFFile, n_tokens: int) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        token_id = source.get(f"tokenizer.ggml.{kind}_token_id", None)
        if token_id is None:
            continue
        if not 0 <= token_id < n_tokens:
            raise source.error(f"tokenizer.ggml.{kind}_token_id={token_id} is outside the {n_tokens} tokens")
        ids[kind] = token_id
    return ids


def _bpe_merges(source: _GGUFFile) -> list[tuple[str, str]] | None:
    merges = source.get("tokenizer.ggml.merges", None)
    if merges is None:
        return None
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if bad := [merge for merge, pair in zip(merges, pairs) if len(pair) != 2]:
        raise source.error(f"malformed tokenizer merges, e.g. {bad[0]!r}")
    return pairs


def _byte_level_bpe(source: _GGUFFile, tokens: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE (SmolLM2, Llama-3): tokens are already spelled in GPT-2's byte alphabet."""
    pre = source.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        known = ", ".join(sorted(_BYTE_LEVEL_PRE_TOKENIZERS))
        raise source.error(f"pre-tokenizer {pre!r} is not supported yet (known: {known})")
    merges = _bpe_merges(source)
    if merges is None:
        raise source.error("byte-level BPE tokenizer without 'tokenizer.ggml.merges'")
    tokenizer = Tokenizer(_bpe_model(source, {t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = _BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(source: _GGUFFile, tokens: list[str], unk_id: int | None) -> Tokenizer:
    """SentencePiece BPE (LLaMA 1/2): ``▁`` marks word starts, unknown bytes fall back to ``<0xNN>`` tokens.

    This is the tokenizer.json transformers builds for ``LlamaTokenizer`` (legacy=False).
    """
    merges = _bpe_merges(source)
    if merges is None:
        merges = _merges_from_scores(tokens, source.get("tokenizer.ggml.scores"))
    unk = tokens[unk_id] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = _bpe_model(source, vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    add_prefix = bool(source.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # drop the space the encoder put in front
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary, which keeps a score per piece instead of a merge list.

    Each split of a piece into two known pieces is a merge ranked by the piece's score, best first; ties go to
    shorter left, then right, parts. Same order as transformers' ``generate_merges``, so both tokenize alike.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in pairs]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _bpe_model(source: _GGUFFile, vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs: Any) -> models.BPE:
    try:
        return models.BPE(vocab=vocab, merges=merges, **kwargs)
    except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
        raise source.error(f"cannot build the BPE tokenizer: {e}") from None


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int] | None) -> None:
    """Keep control tokens (``<|im_start|>``, ``<s>``) and user-defined ones whole instead of splitting them."""
    types = token_types or []
    special = [t for t, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL)]
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    # They are in the vocabulary already, so adding them gives no new ids, only whole-token matching.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(
    tokenizer: Tokenizer, kind: str, tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool
) -> None:
    """BOS/EOS as Hugging Face writes them (lit-qa's `Tokenizer` adds them itself and ignores this)."""
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    added = [k for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
    if added:
        bos = [tokens[ids["bos"]]] if add_bos else []
        eos = [tokens[ids["eos"]]] if add_eos else []
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
        special = [(tokens[ids[k]], ids[k]) for k in added]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        tokenizer.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
