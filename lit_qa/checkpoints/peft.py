# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LoRA folders in Hugging Face PEFT's format, both ways.

A PEFT LoRA folder is ``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``) and
``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B.weight`` tensors. Both
projects compute ``W x + (alpha / r) B A x``, and lit-qa's module names are Hugging Face's under a rename table
(`lit_qa.checkpoints.convert_hf`), so the conversion renames tensors and nothing else::

    python scripts/convert_checkpoint.py --to peft --source out/finetune/lora/final --out_dir out/peft
    # peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(<the base exported with --to hf>), "out/peft")

    python scripts/convert_checkpoint.py --to lit --source hub/my-peft-lora \\
        --base_checkpoint_dir checkpoints/SmolLM2-135M-Instruct --out_dir out/lora-from-peft

A no-answer head (`lit_qa.checkpoints.na_head`) has no PEFT form: it stays in the lit-qa folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lit_qa.checkpoints.adapter import ADAPTER_WEIGHTS_FILE
from lit_qa.checkpoints.convert_hf import hf_to_lit_key, lit_to_hf_key
from lit_qa.checkpoints.finetuned import read_base_record
from lit_qa.checkpoints.folder import load_state_dict
from lit_qa.checkpoints.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, check_lora_dir, save_lora_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.files import read_json_object, write_folder_atomically
from lit_qa.models.lora import BLOCK_TARGETS, LoRAConfig

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Which Hugging Face modules each `LoRAConfig` flag adapts (PEFT's ``target_modules``): lit-qa's block layer names
# end in Hugging Face's module names.
HF_TARGETS = {flag: tuple(layer.rpartition(".")[2] for layer in layers) for flag, layers in BLOCK_TARGETS.items()}
HF_TARGETS["head"] = ("lm_head",)


def is_peft_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like a PEFT adapter: ``adapter_config.json``, which lit-qa's adapter (v1/v2)
    folders also have, without their ``lit_adapter.safetensors``."""
    return (folder / PEFT_CONFIG_FILE).is_file() and not (folder / ADAPTER_WEIGHTS_FILE).is_file()


def export_peft(lora_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a lit-qa LoRA folder (`lit_qa.checkpoints.lora`) as a PEFT LoRA folder.

    Raises:
        LitQAError: If ``lora_dir`` is not a LoRA folder (an adapter v1/v2 folder has no PEFT form), or
            ``out_dir`` is not empty without ``overwrite``.
    """
    lora_dir = Path(lora_dir)
    if (lora_dir / ADAPTER_WEIGHTS_FILE).is_file():
        raise LitQAError(f"{lora_dir} is a lit-qa adapter (v1/v2) folder: only LoRA folders convert to PEFT")
    lora_config = LoRAConfig.from_file(check_lora_dir(lora_dir) / LORA_CONFIG_FILE)
    tensors = load_state_dict(lora_dir / LORA_WEIGHTS_FILE)
    peft_tensors = {_lit_to_peft_key(key): value.contiguous() for key, value in tensors.items()}
    base = read_base_record(lora_dir)
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(peft_tensors, tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        config = peft_config(lora_config, base_model=base.get("path"))
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def peft_config(lora_config: LoRAConfig, base_model: str | None = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``lora_config``."""
    targets = [module for flag, modules in HF_TARGETS.items() if getattr(lora_config, flag) for module in modules]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora_config.r,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def import_peft(
    peft_dir: str | Path, out_dir: str | Path, base_checkpoint_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write a PEFT LoRA folder as a lit-qa LoRA folder on top of ``base_checkpoint_dir`` (a lit-qa checkpoint
    folder of the model the adapter was trained on).

    Raises:
        LitQAError: If the folder is not a plain LoRA that lit-qa's layers can express (another PEFT method,
            DoRA, rsLoRA, per-layer ranks, biases, some layers only, ...), a tensor is unexpected, or
            ``out_dir`` is not empty without ``overwrite``.
    """
    peft_dir = Path(peft_dir)
    config_path = peft_dir / PEFT_CONFIG_FILE
    config = read_json_object(config_path, "PEFT adapter config")
    lora_config = lora_config_from_peft(config, config_path)
    weights_path = peft_dir / PEFT_WEIGHTS_FILE
    if not weights_path.is_file():
        raise LitQAError(f"{peft_dir}: {PEFT_WEIGHTS_FILE} is missing (only safetensors PEFT folders are read)")
    tensors = {_peft_to_lit_key(key, weights_path): value for key, value in load_state_dict(weights_path).items()}
    return save_lora_checkpoint(out_dir, None, lora_config, base_checkpoint_dir, overwrite=overwrite,
                                tensors=tensors)  # fmt: skip


def lora_config_from_peft(config: dict[str, Any], path: Path) -> LoRAConfig:
    """The `LoRAConfig` of a PEFT ``adapter_config.json``.

    Raises:
        LitQAError: If the adapter is not a plain LoRA over whole Llama modules.
    """
    unsupported = {
        "peft_type": config.get("peft_type") not in ("LORA", None),
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    if problems := [f"{key}={config.get(key)!r}" for key, bad in unsupported.items() if bad]:
        raise LitQAError(f"{path}: lit-qa's LoRA cannot express {', '.join(problems)} (a plain LoRA only)")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    flags = {flag: any(m in targets for m in modules) for flag, modules in HF_TARGETS.items()}
    known = {module for modules in HF_TARGETS.values() for module in modules}
    partial_mlp = 0 < sum(m in targets for m in HF_TARGETS["mlp"]) < 3
    unknown = sorted(set(targets) - known)
    if unknown or partial_mlp:
        what = f"unknown modules {unknown}" if unknown else "only some of gate_proj/up_proj/down_proj"
        raise LitQAError(f"{path}: target_modules {targets} cannot be expressed in lit-qa's LoRA ({what})")
    try:
        return LoRAConfig(r=int(config["r"]), alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0)),
                          **flags)  # fmt: skip
    except KeyError as missing:
        raise LitQAError(f"{path}: {missing.args[0]!r} is missing") from None


def _lit_to_peft_key(key: str) -> str:
    module, _, part = key.rpartition(".")  # "transformer.h.0.attn.q_proj", "lora_A"
    hf_module = lit_to_hf_key(module + ".weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{hf_module}.{part}.weight"


def _peft_to_lit_key(key: str, path: Path) -> str:
    name = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    module, _, part = name.rpartition(".")
    if not key.startswith(PEFT_PREFIX) or part not in ("lora_A", "lora_B"):
        raise LitQAError(f"{path}: unexpected tensor {key!r} in a PEFT LoRA of a Llama model")
    return hf_to_lit_key(module + ".weight").removesuffix(".weight") + "." + part
