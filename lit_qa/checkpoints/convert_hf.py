# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Convert Hugging Face ``LlamaForCausalLM`` checkpoints to lit-qa folders and back.

lit-qa names its layers like Hugging Face does below the block level and keeps HF's "rotate half"
RoPE layout, so the conversion is a rename table (one entry per tensor, ``{}`` standing for the layer
number) and no tensor is changed. The table is used in both directions, the idea of gpt-fast's
``weight_map`` and torchtune's ``_FROM_HF``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_qa.checkpoints.folder import (
    TIED_KEY,
    check_checkpoint_dir,
    check_state_dict,
    load_state_dict,
    load_torch_file,
    save_checkpoint,
)
from lit_qa.errors import LitQAError
from lit_qa.files import check_out_dir, read_json_object, write_folder_atomically
from lit_qa.models.config import Config
from lit_qa.models.tokenizer import TOKENIZER_FILES, Tokenizer

HF_CONFIG_FILE = "config.json"

HF_TO_LIT = {
    "model.embed_tokens.weight": "transformer.wte.weight",
    "model.layers.{}.input_layernorm.weight": "transformer.h.{}.norm_1.weight",
    "model.layers.{}.self_attn.q_proj.weight": "transformer.h.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "transformer.h.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "transformer.h.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "transformer.h.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "transformer.h.{}.norm_2.weight",
    "model.layers.{}.mlp.gate_proj.weight": "transformer.h.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "transformer.h.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "transformer.h.{}.mlp.down_proj.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}

LIT_TO_HF = {lit: hf for hf, lit in HF_TO_LIT.items()}
# Older HF Llama checkpoints saved the RoPE frequencies as a buffer; they are recomputed from the config.
_IGNORED_HF_SUFFIX = ".rotary_emb.inv_freq"
_LAYER = re.compile(r"\.(\d+)\.")


def _map_key(key: str, table: dict[str, str]) -> str | None:
    # Replace the first ".<number>." by ".{}." to find the template, then put the number back.
    match = _LAYER.search(key)
    template = key if match is None else key[: match.start()] + ".{}." + key[match.end() :]
    target = table.get(template)
    if target is None or match is None:
        return target
    return target.format(match.group(1))


def hf_to_lit_key(key: str) -> str:
    """Name of an HF ``LlamaForCausalLM`` tensor in lit-qa, e.g. ``model.layers.3.mlp.up_proj.weight``.

    Raises:
        LitQAError: If the key is not part of a LLaMA model.
    """
    mapped = _map_key(key, HF_TO_LIT)
    if mapped is None:
        raise LitQAError(f"unexpected tensor {key!r} in a Hugging Face Llama checkpoint")
    return mapped


def lit_to_hf_key(key: str) -> str:
    """Name of a lit-qa tensor in HF ``LlamaForCausalLM``, e.g. ``transformer.h.3.mlp.up_proj.weight``.

    Raises:
        LitQAError: If the key is not part of the lit-qa model.
    """
    mapped = _map_key(key, LIT_TO_HF)
    if mapped is None:
        raise LitQAError(f"unexpected tensor {key!r} in a lit-qa checkpoint")
    return mapped


def config_from_hf(hf_config: dict[str, Any], name: str, source: str | Path = HF_CONFIG_FILE) -> Config:
    """Translate an HF ``config.json`` (``model_type: llama``) into a `Config`.

    Both the ``rope_theta``/``rope_scaling`` keys of transformers 4 and the ``rope_parameters`` of
    transformers 5 are understood.

    Args:
        hf_config: The parsed ``config.json``.
        name: Name recorded in the `Config`.
        source: File named in error messages.

    Raises:
        LitQAError: For a non-LLaMA model or a feature lit-qa's model does not have (biases, other RoPE types).
    """
    model_type = hf_config.get("model_type")
    if model_type != "llama":
        raise LitQAError(f"{source}: model_type is {model_type!r}; only 'llama' (LlamaForCausalLM) is supported")
    unsupported = [k for k in ("attention_bias", "mlp_bias") if hf_config.get(k)]
    if hf_config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf_config['hidden_act']}")
    if unsupported:
        raise LitQAError(f"{source}: unsupported Llama options: {', '.join(unsupported)}")
    try:
        n_head, n_embd = hf_config["num_attention_heads"], hf_config["hidden_size"]
        # lit-qa derives the head size as n_embd // n_head; a model with another head_dim cannot be expressed.
        # (A zero or non-integer head count is left to Config's checks, which name the field.)
        sizes_valid = isinstance(n_head, int) and isinstance(n_embd, int) and n_head > 0
        if sizes_valid and hf_config.get("head_dim") not in (None, n_embd // n_head):
            raise LitQAError(f"head_dim={hf_config['head_dim']} differs from hidden_size / num_attention_heads")
        rope = hf_config.get("rope_parameters") or {}
        return Config(
            name=name,
            block_size=hf_config["max_position_embeddings"],
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["num_hidden_layers"],
            n_head=n_head,
            n_embd=n_embd,
            n_query_groups=hf_config.get("num_key_value_heads") or n_head,
            intermediate_size=hf_config["intermediate_size"],
            rope_base=float(hf_config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=_rope_scaling_from_hf(hf_config.get("rope_scaling") or rope),
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise LitQAError(f"{source}: missing field {e.args[0]!r}") from None
    except (LitQAError, TypeError, ValueError) as e:
        raise LitQAError(f"{source}: {e}") from None


def _rope_scaling_from_hf(scaling: dict[str, Any]) -> dict[str, float] | None:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise LitQAError(f"rope type {rope_type!r} is not supported (only default and llama3)")
    return dict(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_seq_len=int(scaling["original_max_position_embeddings"]),
    )


def config_to_hf(config: Config, dtype: torch.dtype, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """The HF ``config.json`` for a lit-qa `Config`; BOS/EOS ids come from the tokenizer in ``checkpoint_dir``."""
    hf = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups,
        head_dim=config.head_size,
        intermediate_size=config.intermediate_size,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        rope_scaling=None,
        max_position_embeddings=config.block_size,
        # HF's vocab_size is the number of embedding rows, i.e. our padded size.
        vocab_size=config.padded_vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = dict(
            rope_type="llama3",
            factor=s["factor"],
            low_freq_factor=s["low_freq_factor"],
            high_freq_factor=s["high_freq_factor"],
            original_max_position_embeddings=s["original_max_seq_len"],
        )
    # Written even when unknown: without them transformers would assume LLaMA 1's ids 1 and 2.
    hf["bos_token_id"] = hf["eos_token_id"] = None
    if checkpoint_dir is not None and _has_tokenizer(checkpoint_dir):
        tokenizer = Tokenizer(checkpoint_dir)
        hf["bos_token_id"], hf["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    return hf


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """The tokenizer files in ``folder`` (see `lit_qa.models.tokenizer.TOKENIZER_FILES`), ready for
    `save_checkpoint`."""
    folder = Path(folder)
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def _weight_files(hf_dir: Path) -> list[Path]:
    """The weight shards of an HF folder, safetensors preferred over pickled ``.bin`` files."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (hf_dir / single).is_file():
            return [hf_dir / single]
        if (hf_dir / index).is_file():
            try:
                weight_map = read_json_object(hf_dir / index)["weight_map"]
            except (KeyError, TypeError) as e:
                raise LitQAError(f"{hf_dir / index}: not a valid weight index ({e})") from None
            shards = [hf_dir / name for name in sorted(set(weight_map.values()))]
            if missing := [s.name for s in shards if not s.is_file()]:
                raise LitQAError(f"{hf_dir / index} lists shards that are missing: {', '.join(missing)}")
            return shards
    present = sorted(p.name for p in hf_dir.iterdir())
    raise LitQAError(
        f"no model.safetensors, pytorch_model.bin or shard index in {hf_dir} (it has: {', '.join(present)})"
    )


def _read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one weight file, one at a time."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise LitQAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    else:
        # Memory-mapped: a tensor is read from disk only when it is copied or cast below.
        shard = load_torch_file(path)
        while shard:
            yield shard.popitem()


def load_hf_checkpoint(
    hf_dir: str | Path, name: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Config, dict[str, torch.Tensor]]:
    """Read an HF ``LlamaForCausalLM`` folder into a `Config` and a lit-qa state dict.

    Shards are converted one after another and each tensor moves into the result as it is read, so the
    weights are never held twice in memory.

    Args:
        hf_dir: Folder with ``config.json`` and ``model.safetensors``, sharded ``model-*.safetensors`` with
            their index, or ``pytorch_model*.bin`` (read with ``weights_only=True``).
        name: Name for the `Config`; defaults to the folder name.
        dtype: Cast the weights to this dtype; None keeps the source's.

    Returns:
        The config and the weights with lit-qa names (no ``lm_head.weight`` for tied embeddings).

    Raises:
        LitQAError: If the folder is not a readable LLaMA checkpoint or its weights do not fit its config.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / HF_CONFIG_FILE
    if not config_path.is_file():
        raise LitQAError(f"{config_path} not found; is {hf_dir} a Hugging Face model folder?")
    hf_config = read_json_object(config_path, "Hugging Face config")
    config = config_from_hf(hf_config, name or hf_dir.name, config_path)
    state_dict = {}
    for path in _weight_files(hf_dir):
        for key, tensor in _read_shard(path):
            if key.endswith(_IGNORED_HF_SUFFIX) or (config.tie_embeddings and key == TIED_KEY):
                continue  # some tied checkpoints store the head anyway; HF ignores it and so do we
            state_dict[hf_to_lit_key(key)] = tensor if dtype is None else tensor.to(dtype)
    check_state_dict(state_dict, config, hf_dir)
    return config, state_dict


def convert_hf_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an HF ``LlamaForCausalLM`` folder into a lit-qa checkpoint folder (weights, config, tokenizer).

    Args:
        hf_dir: The HF model folder (see `load_hf_checkpoint`).
        out_dir: Folder to write.
        name: Name recorded in ``lit_config.json``; defaults to ``hf_dir``'s name.
        dtype: Cast the weights; None keeps the source's dtype.
        overwrite: Replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        LitQAError: If the source is not a readable LLaMA checkpoint, or ``out_dir`` is not empty without ``overwrite``.
    """
    check_out_dir(out_dir, overwrite)  # fail before the slow part
    config, state_dict = load_hf_checkpoint(hf_dir, name, dtype)
    return save_checkpoint(out_dir, config, state_dict, tokenizer_files(hf_dir), overwrite)


def convert_lit_to_hf(checkpoint_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Export a lit-qa checkpoint folder as one ``transformers.LlamaForCausalLM.from_pretrained`` can load.

    Writes ``config.json``, ``model.safetensors`` (for tied embeddings only ``embed_tokens``, as HF does)
    and the tokenizer files, including ``generation_config.json`` when the checkpoint has one.

    Args:
        checkpoint_dir: A lit-qa checkpoint folder.
        out_dir: Folder to write.
        overwrite: Replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        LitQAError: If the checkpoint is missing or broken, or ``out_dir`` is not empty without ``overwrite``.
    """
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    check_out_dir(out_dir, overwrite)
    config = Config.from_checkpoint(checkpoint_dir)
    state_dict = load_state_dict(checkpoint_dir)
    check_state_dict(state_dict, config, checkpoint_dir)
    # Tied: HF also stores only embed_tokens and re-ties lm_head when it loads.
    skip = TIED_KEY if config.tie_embeddings else None
    hf_state_dict = {lit_to_hf_key(k): v for k, v in state_dict.items() if k != skip}
    hf_config = config_to_hf(config, hf_state_dict["model.embed_tokens.weight"].dtype, checkpoint_dir)
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(hf_state_dict, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        for name, source in tokenizer_files(checkpoint_dir).items():
            shutil.copyfile(source, tmp / name)
    return Path(out_dir)
