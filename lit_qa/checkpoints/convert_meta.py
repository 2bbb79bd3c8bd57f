# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Convert checkpoints in Meta's original release format (``params.json`` + ``consolidated.NN.pth``).

Meta ships each model split for N-way model parallelism: every ``consolidated.NN.pth`` holds a slice
of each matrix, cut along the dimension its parallel layer splits::

    ColumnParallel (split output rows, dim 0):  wq wk wv w1 w3 output
    RowParallel    (split input cols, dim 1):   wo w2
    ParallelEmbedding (split features, dim 1):  tok_embeddings
    replicated in every shard:                  attention_norm ffn_norm norm

Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... while lit-qa (like HF) rotates the first
half of a head against the second. Permuting the rows of wq and wk converts one into the other;
`permute` is the function of transformers' ``convert_llama_weights_to_hf.py`` (Apache 2.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_qa.checkpoints.convert_hf import tokenizer_files
from lit_qa.checkpoints.folder import check_state_dict, load_torch_file, save_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.files import check_out_dir, read_json_object
from lit_qa.models.config import Config

PARAMS_FILE = "params.json"
SHARD_PATTERN = "consolidated.*.pth"

# Meta name (with {} for the layer) -> (lit-qa name, dimension the shards split, or None if replicated).
META_TO_LIT: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("transformer.wte.weight", 1),
    "layers.{}.attention_norm.weight": ("transformer.h.{}.norm_1.weight", None),
    "layers.{}.attention.wq.weight": ("transformer.h.{}.attn.q_proj.weight", 0),
    "layers.{}.attention.wk.weight": ("transformer.h.{}.attn.k_proj.weight", 0),
    "layers.{}.attention.wv.weight": ("transformer.h.{}.attn.v_proj.weight", 0),
    "layers.{}.attention.wo.weight": ("transformer.h.{}.attn.o_proj.weight", 1),
    "layers.{}.ffn_norm.weight": ("transformer.h.{}.norm_2.weight", None),
    "layers.{}.feed_forward.w1.weight": ("transformer.h.{}.mlp.gate_proj.weight", 0),
    "layers.{}.feed_forward.w3.weight": ("transformer.h.{}.mlp.up_proj.weight", 0),
    "layers.{}.feed_forward.w2.weight": ("transformer.h.{}.mlp.down_proj.weight", 1),
    "norm.weight": ("transformer.ln_f.weight", None),
    "output.weight": ("lm_head.weight", 0),
}

# LLaMA 1 stored its RoPE frequencies; they are recomputed from the config.
_IGNORED_KEYS = {"rope.freqs"}


def permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """Reorder the rows of a Meta wq/wk (dim1, dim2) from interleaved RoPE pairs to HF's rotate-half layout."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size exactly as Meta's ``FeedForward.__init__`` computes it."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def config_from_params(params: dict[str, Any], vocab_size: int, name: str, source: str | Path) -> Config:
    """Translate Meta's ``params.json`` into a `Config`.

    Args:
        params: The parsed ``params.json``.
        vocab_size: Rows of ``tok_embeddings`` (``params.json`` says -1 for LLaMA 1 and Llama-2).
        name: Name recorded in the `Config`.
        source: File named in error messages.

    Raises:
        LitQAError: If a required field is missing.
    """
    try:
        dim = params["dim"]
        rope_base = float(params.get("rope_theta", 10000.0))
        rope_scaling = None
        if params.get("use_scaled_rope"):
            # Llama 3.1 hard-codes these in apply_scaling(); newer llama-models releases may name the factors.
            rope_scaling = dict(
                factor=float(params.get("rope_scaling_factor") or 8.0),
                low_freq_factor=1.0,
                high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
                original_max_seq_len=8192,
            )
        return Config(
            name=name,
            block_size=params.get("max_seq_len") or _default_block_size(params),
            vocab_size=vocab_size,
            n_layer=params["n_layers"],
            n_head=params["n_heads"],
            n_embd=dim,
            n_query_groups=params.get("n_kv_heads") or params["n_heads"],
            intermediate_size=intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
            rope_base=rope_base,
            rope_scaling=rope_scaling,
            norm_eps=params["norm_eps"],
        )
    except KeyError as e:
        raise LitQAError(f"{source}: missing field {e.args[0]!r}") from None
    except (LitQAError, TypeError, ValueError) as e:
        raise LitQAError(f"{source}: {e}") from None


def _default_block_size(params: dict[str, Any]) -> int:
    # params.json has no context length (Meta passes max_seq_len at run time); use the model family's.
    if params.get("use_scaled_rope"):
        return 131072  # Llama 3.1
    return 8192 if params.get("rope_theta", 10000.0) >= 500000 else 4096  # Llama 3 / Llama 2


def load_meta_checkpoint(
    meta_dir: str | Path, name: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Config, dict[str, torch.Tensor]]:
    """Read a Meta-format folder into a `Config` and a lit-qa state dict.

    All shards are opened memory-mapped (``weights_only=True``), so only the tensor being merged is read
    into memory; its slices are concatenated, permuted if needed and cast, then the next one follows.

    Args:
        meta_dir: Folder with ``params.json`` and ``consolidated.00.pth`` ... ``consolidated.NN.pth``.
        name: Name for the `Config`; defaults to the folder name.
        dtype: Cast the weights; None keeps the source's dtype.

    Returns:
        The config and the weights with lit-qa names.

    Raises:
        LitQAError: If the folder is incomplete, a shard cannot be read, or the weights do not fit ``params.json``.
    """
    meta_dir = Path(meta_dir)
    params_path = meta_dir / PARAMS_FILE
    shard_paths = sorted(meta_dir.glob(SHARD_PATTERN))
    if not params_path.is_file() or not shard_paths:
        present = sorted(p.name for p in meta_dir.iterdir()) if meta_dir.is_dir() else []
        raise LitQAError(
            f"{meta_dir} is not a Meta checkpoint: it needs params.json and consolidated.*.pth "
            f"(it has: {', '.join(present) or 'nothing'})"
        )
    params = read_json_object(params_path, "Meta params file")
    shards = [load_torch_file(path) for path in shard_paths]
    keys = [k for k in shards[0] if k not in _IGNORED_KEYS]
    if unequal := [p.name for p, s in zip(shard_paths, shards, strict=True) if set(s) - _IGNORED_KEYS != set(keys)]:
        raise LitQAError(f"{meta_dir}: shards {', '.join(unequal)} hold other tensors than {shard_paths[0].name}")

    vocab_size = params.get("vocab_size") or -1
    if vocab_size < 0:
        # LLaMA 1 and Llama-2 say -1 ("ask the tokenizer"); the embedding has one row per token.
        if "tok_embeddings.weight" not in shards[0]:
            raise LitQAError(f"{shard_paths[0]} has no tok_embeddings.weight")
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
    config = config_from_params(params, vocab_size, name or meta_dir.name, params_path)

    state_dict = {}
    for key in keys:
        lit_key, tensor = _merge(key, [s.pop(key) for s in shards], config, meta_dir)
        state_dict[lit_key] = tensor if dtype is None else tensor.to(dtype)
    del shards
    if "output.weight" not in keys or torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]):
        # Llama 3.2 1B/3B share the head with the embedding.
        config.tie_embeddings = True
        state_dict.pop("lm_head.weight", None)
    check_state_dict(state_dict, config, meta_dir)
    return config, state_dict


def _merge(key: str, pieces: list[torch.Tensor], config: Config, meta_dir: Path) -> tuple[str, torch.Tensor]:
    """Join one tensor's model-parallel slices and give it its lit-qa name and layout."""
    parts = key.split(".")
    layer = parts[1] if parts[0] == "layers" and len(parts) > 2 else None
    template = key.replace(f"layers.{layer}.", "layers.{}.", 1) if layer is not None else key
    if template not in META_TO_LIT:
        raise LitQAError(f"unexpected tensor {key!r} in the Meta checkpoint {meta_dir}")
    lit_template, split_dim = META_TO_LIT[template]
    lit_key = lit_template.format(layer)
    tensor = pieces[0] if split_dim is None or len(pieces) == 1 else torch.cat(pieces, dim=split_dim)
    # Interleaved -> rotate-half RoPE layout, head by head (wk has n_query_groups heads).
    if template.endswith("attention.wq.weight"):
        tensor = permute(tensor, config.n_head, *tensor.shape)
    elif template.endswith("attention.wk.weight"):
        tensor = permute(tensor, config.n_query_groups, *tensor.shape)
    return lit_key, tensor.contiguous()


def convert_meta_checkpoint(
    meta_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Meta-format checkpoint into a lit-qa checkpoint folder.

    ``tokenizer.model`` is copied from ``meta_dir``, or from its parent where the LLaMA 1 and Llama-2
    downloads keep one tokenizer for all sizes.

    Args:
        meta_dir: Folder with ``params.json`` and ``consolidated.*.pth``.
        out_dir: Folder to write.
        name: Name recorded in ``lit_config.json``; defaults to ``meta_dir``'s name.
        dtype: Cast the weights; None keeps the source's dtype (bfloat16 for Meta releases).
        overwrite: Replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        LitQAError: If the source cannot be converted or ``out_dir`` is not empty without ``overwrite``.
    """
    meta_dir = Path(meta_dir)
    check_out_dir(out_dir, overwrite)
    config, state_dict = load_meta_checkpoint(meta_dir, name, dtype)
    files = tokenizer_files(meta_dir)
    if not files and (meta_dir.parent / "tokenizer.model").is_file():
        files = {"tokenizer.model": meta_dir.parent / "tokenizer.model"}
    return save_checkpoint(out_dir, config, state_dict, files, overwrite)
