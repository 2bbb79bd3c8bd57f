# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GPTQ checkpoint folders: AutoGPTQ's packed tensors (`lit_qa.quantize.int4`) with lit-qa tensor names
(`save_gptq_checkpoint`, `load_gptq_model`), and Hugging Face GPTQ folders that AutoGPTQ/GPTQModel/transformers
read and write (`export_hf_gptq`, `import_hf_gptq`). The algorithm is `lit_qa.quantize.gptq`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lit_qa.checkpoints.convert_hf import (
    HF_CONFIG_FILE,
    _read_shard,
    _weight_files,
    config_from_hf,
    config_to_hf,
    hf_to_lit_key,
    lit_to_hf_key,
    tokenizer_files,
)
from lit_qa.checkpoints.folder import EMBEDDING_KEY, TIED_KEY
from lit_qa.errors import LitQAError, not_found
from lit_qa.files import read_json, write_folder_atomically
from lit_qa.models.config import CONFIG_FILE, Config
from lit_qa.models.model import GPT
from lit_qa.quantize.int4 import SUPPORTED_BITS, Int4Linear

GPTQ_WEIGHTS_FILE = "model.safetensors"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
PACKED_NAMES = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------------------------------------------------
# Checkpoint folders in lit-qa naming


def gptq_state_dict(model: GPT, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a GPTQ checkpoint: packed ``<layer>.qweight`` etc. for quantized layers, everything else as is.

    The tied output head (``lm_head.weight`` when the embeddings are tied) is left out, as in `save_checkpoint`.
    """
    state = {
        key: value
        for key, value in model.state_dict().items()
        if key.removesuffix(".weight") not in packed and not (key == TIED_KEY and model.config.tie_embeddings)
    }
    for name, tensors in packed.items():
        state.update({f"{name}.{suffix}": tensor for suffix, tensor in tensors.items()})
    return state


def save_gptq_checkpoint(
    out_dir: str | Path,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    quantize_config: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a GPTQ checkpoint folder with lit-qa tensor names, all or nothing.

    The folder holds ``model.safetensors`` (`gptq_state_dict`), ``lit_config.json``, ``quantize_config.json``
    (AutoGPTQ's fields) and the ``extra_files`` (tokenizer). `load_gptq_model` reads it; `export_hf_gptq`
    turns it into a folder AutoGPTQ, GPTQModel and transformers load.

    Args:
        out_dir: Folder to create.
        config: The model config.
        state_dict: The tensors, e.g. from `gptq_state_dict`.
        quantize_config: E.g. ``GPTQConfig.to_quantize_config(base_checkpoint_dir)``.
        extra_files: Files to copy in, as ``{name in the folder: source path}``.
        overwrite: Replace a non-empty ``out_dir``.

    Raises:
        LitQAError: If ``out_dir`` is not empty and ``overwrite`` is False.
    """
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / GPTQ_WEIGHTS_FILE, metadata={"format": "pt"})
        config.save(tmp / CONFIG_FILE)
        (tmp / QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def load_gptq_state(gptq_dir: str | Path) -> tuple[Config, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a folder written by `save_gptq_checkpoint`: (model config, quantize config, tensors on the CPU).

    Raises:
        LitQAError: If the folder or one of its three files is missing or unreadable, or the quantize config
            describes a format lit-qa cannot read.
    """
    path = Path(gptq_dir)
    if not path.is_dir():
        raise LitQAError(f"GPTQ checkpoint folder {path} {not_found(path)}")
    missing = [name for name in (CONFIG_FILE, QUANTIZE_CONFIG_FILE, GPTQ_WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise LitQAError(f"{path} is not a GPTQ checkpoint: missing {', '.join(missing)} (it has: {present})")
    config = Config.from_checkpoint(path)
    quantize_config = read_json(path / QUANTIZE_CONFIG_FILE)
    check_quantize_config(quantize_config, path / QUANTIZE_CONFIG_FILE)
    return config, quantize_config, _read_safetensors(path / GPTQ_WEIGHTS_FILE)


def check_quantize_config(values: Any, source: str | Path) -> tuple[int, int]:
    """Check a GPTQ quantization config (ours, AutoGPTQ's or transformers') describes a readable format.

    Returns:
        ``(bits, group_size)``.

    Raises:
        LitQAError: For another method (AWQ ...), another packing (marlin, GPTQModel's gptq_v2), or bits other than 4/8.
    """
    if not isinstance(values, dict):
        raise LitQAError(f"{source}: expected a JSON object with the quantization settings")
    method = str(values.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise LitQAError(f"{source}: quant_method {method!r} is not supported (only 'gptq')")
    # AutoGPTQ assumes "gptq" when the field is missing; is_marlin_format is its older marker for marlin.
    fmt = str(values.get("checkpoint_format", "gptq")).lower()
    if fmt != "gptq" or values.get("is_marlin_format"):
        fmt = fmt if fmt != "gptq" else "marlin"
        raise LitQAError(f"{source}: checkpoint_format {fmt!r} is not supported (only 'gptq', the v1 packing)")
    bits, group_size = values.get("bits"), values.get("group_size", -1)
    if bits not in SUPPORTED_BITS:
        raise LitQAError(f"{source}: bits={bits} is not supported (only {' or '.join(map(str, SUPPORTED_BITS))})")
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise LitQAError(f"{source}: group_size={group_size!r} must be -1 or a positive integer")
    return bits, group_size


def load_gptq_model(
    gptq_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Config]:
    """Build a `GPT` whose quantized linear layers are `Int4Linear` modules from a GPTQ checkpoint folder.

    Reads a folder written by `save_gptq_checkpoint`, or a Hugging Face GPTQ folder (``config.json`` with a
    ``quantization_config``, as AutoGPTQ/GPTQModel/transformers write them; see `load_hf_gptq`).

    Args:
        gptq_dir: The folder.
        device: Where the model should live.
        dtype: dtype of the activations and the unquantized weights (None keeps the saved dtype). On CPU,
            ``torch.bfloat16`` uses torch's int4 kernel; other dtypes keep a dequantized copy of each weight.

    Returns:
        The model (in eval mode) and its config.

    Raises:
        LitQAError: One line naming the folder and the problem: missing files, missing or unexpected tensors,
            wrong shapes, an unsupported format or bit width.
    """
    path = Path(gptq_dir)
    is_hf = (path / HF_CONFIG_FILE).is_file() and not (path / CONFIG_FILE).is_file()
    config, quantize_config, state = load_hf_gptq(path) if is_hf else load_gptq_state(path)
    model = check_gptq_state(config, quantize_config, state, path)
    if config.tie_embeddings:
        state[TIED_KEY] = state[EMBEDDING_KEY]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_rope_cache(device=torch.device("cpu"))  # the RoPE buffers were created on meta
    model.to(device=device, dtype=dtype)
    model.reset_rope_cache(device=torch.device(device))
    activation_dtype = model.transformer.wte.weight.dtype
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.prepare(activation_dtype)  # once here, not in the first forward
    return model.eval(), config


def check_gptq_state(
    config: Config, quantize_config: dict[str, Any], state: dict[str, torch.Tensor], source: str | Path
) -> GPT:
    """Check GPTQ tensors against the model they claim to be, and return that model (`Int4Linear` layers) on meta.

    A layer counts as quantized when its ``qweight`` is present; any linear layer may be (GPTQModel can quantize
    the head too).

    Raises:
        LitQAError: One line listing missing and unexpected tensors, wrong shapes and g_idx out of range, or an
            unsupported quantization config.
    """
    bits, group_size = check_quantize_config(quantize_config, source)
    quantized = sorted(key.removesuffix(".qweight") for key in state if key.endswith(".qweight"))
    model = _build_quantized_model(config, quantized, bits, group_size, source)
    _check_shapes(state, model, config, source)
    return model


def _build_quantized_model(config: Config, quantized: list[str], bits: int, group_size: int, source: str | Path) -> GPT:
    """A GPT on the meta device with `Int4Linear` in place of each layer named in ``quantized``."""
    with torch.device("meta"):
        model = GPT(config)
        for name in quantized:
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                linear = None
            if not isinstance(linear, nn.Linear):
                raise LitQAError(f"{source}: {name}.qweight does not belong to a linear layer of the model")
            if name == "lm_head" and config.tie_embeddings:
                raise LitQAError(f"{source}: the output head is quantized but tied to the (unquantized) embeddings")
            try:
                has_bias = linear.bias is not None
                layer = Int4Linear(linear.in_features, linear.out_features, bits, group_size, bias=has_bias)
            except ValueError as e:
                raise LitQAError(f"{source}: {name}: {e}") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def _check_shapes(state: dict[str, torch.Tensor], model: GPT, config: Config, source: str | Path) -> None:
    expected = {key: value.shape for key, value in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop(TIED_KEY)
    problems = []
    if missing := sorted(expected.keys() - state.keys()):
        problems.append(f"missing tensors {_short_list(missing)}")
    if unexpected := sorted(state.keys() - expected.keys()):
        problems.append(f"unexpected tensors {_short_list(unexpected)}")
    for key in sorted(state.keys() & expected.keys()):
        if state[key].shape != expected[key]:
            problems.append(f"{key} has shape {tuple(state[key].shape)}, expected {tuple(expected[key])}")
        elif key.endswith(".g_idx") and len(state[key]):
            n_groups = expected[key.removesuffix("g_idx") + "scales"][0]
            if int(state[key].min()) < 0 or int(state[key].max()) >= n_groups:
                problems.append(f"{key} refers to groups outside 0..{n_groups - 1}")
    if problems:
        raise LitQAError(f"{source} does not match its config ({config.name or 'unnamed'}): " + "; ".join(problems))


def _short_list(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LitQAError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Hugging Face / AutoGPTQ naming
#
# Only names change. lit-qa's q_proj/k_proj rows are already in Hugging Face's "rotate half" RoPE layout
# (lit_qa/checkpoints/convert_hf.py copies them unchanged), so no row permutation, and hence no permutation of qweight
# columns, scales or qzeros, is needed in either direction.


def _lit_to_hf_gptq_key(key: str) -> str:
    base, _, suffix = key.rpartition(".")
    if suffix in PACKED_NAMES or (suffix == "bias" and base):
        return lit_to_hf_key(f"{base}.weight").removesuffix(".weight") + f".{suffix}"
    return lit_to_hf_key(key)


def _hf_to_lit_gptq_key(key: str) -> str:
    base, _, suffix = key.rpartition(".")
    if suffix in PACKED_NAMES or suffix == "bias":
        return hf_to_lit_key(f"{base}.weight").removesuffix(".weight") + f".{suffix}"
    return hf_to_lit_key(key)


def export_hf_gptq(gptq_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a lit-qa GPTQ folder with Hugging Face names, the layout AutoGPTQ, GPTQModel and transformers load.

    The folder gets ``model.safetensors`` (``model.layers.0.self_attn.q_proj.qweight`` ...), ``config.json``
    with a ``quantization_config``, ``quantize_config.json`` and the tokenizer files. Tensors are not changed.

    Raises:
        LitQAError: If the source is not a readable GPTQ folder, or ``out_dir`` is not empty without ``overwrite``.
    """
    config, quantize_config, state = load_gptq_state(gptq_dir)
    check_gptq_state(config, quantize_config, state, gptq_dir)
    hf_state = {_lit_to_hf_gptq_key(key): value.contiguous() for key, value in state.items()}
    # float16 is what GPTQ kernels compute in (the scales are float16); unquantized tensors keep their dtype.
    hf_config = config_to_hf(config, torch.float16, Path(gptq_dir))
    hf_config["quantization_config"] = quantize_config
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(hf_state, tmp / GPTQ_WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / QUANTIZE_CONFIG_FILE).write_text(json.dumps(quantize_config, indent=2) + "\n")
        for name, source in tokenizer_files(gptq_dir).items():
            shutil.copyfile(source, tmp / name)
    return Path(out_dir)


def load_hf_gptq(hf_dir: str | Path, name: str | None = None) -> tuple[Config, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a Hugging Face GPTQ folder (AutoGPTQ, GPTQModel, transformers) with lit-qa tensor names.

    The quantization settings come from ``config.json``'s ``quantization_config``, else ``quantize_config.json``.

    Returns:
        The model config, the quantization config (as found) and the tensors (on the CPU).

    Raises:
        LitQAError: If the folder is not a LLaMA model quantized with GPTQ in the v1 ("gptq") format.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / HF_CONFIG_FILE
    if not config_path.is_file():
        raise LitQAError(f"{config_path} not found; is {hf_dir} a Hugging Face model folder?")
    hf_config = read_json(config_path)
    if not isinstance(hf_config, dict):
        raise LitQAError(f"{config_path}: expected a JSON object")
    config = config_from_hf(hf_config, name or hf_dir.name, config_path)
    quantize_config, source = hf_config.get("quantization_config"), config_path
    if quantize_config is None and (hf_dir / QUANTIZE_CONFIG_FILE).is_file():
        quantize_config, source = read_json(hf_dir / QUANTIZE_CONFIG_FILE), hf_dir / QUANTIZE_CONFIG_FILE
    if quantize_config is None:
        raise LitQAError(
            f"{hf_dir} is not a quantized model: no quantization_config in config.json and no quantize_config.json"
        )
    check_quantize_config(quantize_config, source)
    state = {}
    for path in _weight_files(hf_dir):
        for key, tensor in _read_shard(path):
            if key.endswith(".rotary_emb.inv_freq") or (config.tie_embeddings and key == TIED_KEY):
                continue
            state[_hf_to_lit_gptq_key(key)] = tensor
    return config, quantize_config, state


def import_hf_gptq(hf_dir: str | Path, out_dir: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Turn a Hugging Face GPTQ folder into a lit-qa GPTQ folder (names change, tensors do not).

    Args:
        hf_dir: The Hugging Face folder (see `load_hf_gptq`).
        out_dir: Folder to write.
        name: Name for the `Config`; defaults to ``hf_dir``'s name.
        overwrite: Replace a non-empty ``out_dir``.

    Raises:
        LitQAError: If the source is unreadable or does not fit its config, or ``out_dir`` is not empty without
            ``overwrite``.
    """
    config, quantize_config, state = load_hf_gptq(hf_dir, name)
    check_gptq_state(config, quantize_config, state, hf_dir)
    return save_gptq_checkpoint(out_dir, config, state, quantize_config, tokenizer_files(hf_dir), overwrite)
