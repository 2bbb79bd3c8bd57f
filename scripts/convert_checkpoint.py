# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Convert a model into a lit-qa checkpoint folder, or export a lit-qa folder to Hugging Face format.

The kind of source is read from its contents, not its name:

* a folder with ``config.json``: a Hugging Face ``LlamaForCausalLM`` snapshot
  (``model.safetensors``, sharded safetensors, or ``pytorch_model*.bin``)::

      python scripts/convert_checkpoint.py --source hf/SmolLM2-135M-Instruct \\
          --out_dir checkpoints/SmolLM2-135M-Instruct

* a folder with ``params.json`` and ``consolidated.*.pth``: Meta's original release::

      python scripts/convert_checkpoint.py --source llama/llama-2-7b --out_dir checkpoints/Llama-2-7b \\
          --name Llama-2-7b --dtype bfloat16

* a ``.gguf`` file (dequantized to float32 unless ``--dtype`` says otherwise)::

      python scripts/convert_checkpoint.py --source SmolLM2-135M-Instruct.Q4_1.gguf \\
          --out_dir checkpoints/SmolLM2-135M-Instruct

* a Hugging Face GPTQ folder (AutoGPTQ / GPTQModel / transformers, ``quantization_config`` with
  ``quant_method: gptq``): imported as a lit-qa GPTQ folder for ``--quantize gptq.int4 --gptq_checkpoint``,
  packed tensors unchanged::

      python scripts/convert_checkpoint.py --source hf/Llama-2-7B-GPTQ --out_dir checkpoints/Llama-2-7b-gptq-int4

* a lit-qa folder exported back to Hugging Face (loadable with ``LlamaForCausalLM.from_pretrained``; a GPTQ
  folder from scripts/quantize_gptq.py is exported in the AutoGPTQ layout)::

      python scripts/convert_checkpoint.py --to hf --source out/finetune/full/final --out_dir out/hf

* a lit-qa LoRA folder exported as a Hugging Face PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, for ``peft.PeftModel.from_pretrained`` on the base exported with ``--to hf``),
  and a PEFT LoRA folder imported back as a lit-qa LoRA folder on a lit-qa base (`lit_qa.checkpoints.peft`)::

      python scripts/convert_checkpoint.py --to peft --source out/finetune/lora/final --out_dir out/peft
      python scripts/convert_checkpoint.py --source out/peft --base_checkpoint_dir checkpoints/SmolLM2-135M-Instruct \
          --out_dir out/lora-from-peft

* a lit-qa checkpoint folder (a base, or a fine-tune merged by scripts/merge_lora.py) exported as a GGUF file for
  llama.cpp and Ollama (`lit_qa.checkpoints.export_gguf`; howto/export.md)::

      python scripts/convert_checkpoint.py --to gguf --source out/merged --out_dir out/gguf --gguf_type Q8_0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from lit_qa.checkpoints.folder import check_not_inside
from lit_qa.data.dataset import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.errors import LitQAError, run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_source_kind(source: Path) -> Literal["hf", "meta", "gguf"]:
    """Tell what ``source`` is from its contents: a GGUF file, a Meta folder or a Hugging Face folder.

    Raises:
        LitQAError: If ``source`` does not exist or is none of these; the message lists what it holds.
    """
    if source.is_file():
        with source.open("rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LitQAError(f"{source} is a file but not a GGUF file; pass a model folder or a .gguf file")
    if not source.is_dir():
        raise LitQAError(f"source {source} does not exist")
    if (source / "params.json").is_file() and any(source.glob("consolidated.*.pth")):
        return "meta"
    if (source / "config.json").is_file():
        return "hf"
    present = sorted(p.name for p in source.iterdir())
    raise LitQAError(
        f"cannot tell what {source} holds: expected config.json (Hugging Face), params.json + consolidated.*.pth "
        f"(Meta) or a .gguf file (it has: {', '.join(present) or 'nothing'})"
    )


def main(
    source: Path,
    out_dir: Path,
    name: str | None = None,
    dtype: Literal["float32", "bfloat16", "float16"] | None = None,
    to: Literal["lit", "hf", "peft", "gguf"] = "lit",
    overwrite: bool = False,
    base_checkpoint_dir: Path | None = None,
    gguf_type: Literal["F32", "F16", "BF16", "Q8_0"] | None = None,
) -> Path:
    """Convert a checkpoint.

    Arguments:
        source: A Hugging Face model folder, a Meta-format folder, a .gguf file or a PEFT LoRA folder; with
            ``--to hf``, a lit-qa checkpoint folder; with ``--to peft``, a lit-qa LoRA folder.
        out_dir: The folder to write. It must not exist or be empty, unless ``--overwrite`` is given.
        name: Model name recorded in lit_config.json. Defaults to the source's folder or file name.
        dtype: Cast the weights. Defaults to the source's dtype (float32 for GGUF, which is dequantized).
        to: ``lit`` converts into a lit-qa folder; ``hf`` exports a lit-qa folder to Hugging Face format;
            ``peft`` exports a lit-qa LoRA folder as a PEFT adapter; ``gguf`` exports a lit-qa checkpoint folder
            (a base, or a fine-tune merged by scripts/merge_lora.py) as a GGUF file for llama.cpp / Ollama.
        overwrite: Replace a non-empty out_dir (the old one is removed only once the new one is complete).
        base_checkpoint_dir: For a PEFT source: the lit-qa checkpoint folder of its base model.
        gguf_type: With ``--to gguf``: the weight matrices' type (default F16; norms stay F32).

    Returns:
        The folder written (with ``--to gguf``: the file).
    """
    from lit_qa.checkpoints.peft import is_peft_folder

    peft_source = to == "lit" and source.is_dir() and is_peft_folder(source)
    if base_checkpoint_dir is not None and not peft_source:
        raise LitQAError("--base_checkpoint_dir applies only to converting a PEFT adapter folder into lit-qa")
    if to != "lit" and (dtype is not None or name is not None):
        raise LitQAError(f"--dtype and --name apply to conversion into lit-qa, not to --to {to}")
    if gguf_type is not None and to != "gguf":
        raise LitQAError("--gguf_type applies only to --to gguf")
    check_not_inside(out_dir, {"--source": source, "--base_checkpoint_dir": base_checkpoint_dir})
    if peft_source:
        written = _import_peft(source, out_dir, base_checkpoint_dir, overwrite)
    elif to == "lit":
        written = _convert_to_lit(source, out_dir, name, DTYPES[dtype] if dtype else None, overwrite)
    else:
        written = {"hf": _export_hf, "peft": _export_peft, "gguf": _export_gguf}[to](source, out_dir, overwrite,
                                                                                  gguf_type)  # fmt: skip
    _print_contents(written if written.is_dir() else written.parent)
    return written


def _import_peft(source: Path, out_dir: Path, base_checkpoint_dir: Path | None, overwrite: bool) -> Path:
    from lit_qa.checkpoints.peft import import_peft

    if base_checkpoint_dir is None:
        raise LitQAError(f"{source} is a PEFT adapter: pass --base_checkpoint_dir, the lit-qa folder of its base")
    return import_peft(source, out_dir, base_checkpoint_dir, overwrite=overwrite)


def _export_hf(source: Path, out_dir: Path, overwrite: bool, gguf_type: str | None) -> Path:
    if is_gptq_folder(source):
        from lit_qa.checkpoints.gptq import export_hf_gptq

        return export_hf_gptq(source, out_dir, overwrite=overwrite)
    from lit_qa.checkpoints.convert_hf import convert_lit_to_hf

    return convert_lit_to_hf(source, out_dir, overwrite=overwrite)


def _export_peft(source: Path, out_dir: Path, overwrite: bool, gguf_type: str | None) -> Path:
    from lit_qa.checkpoints.peft import export_peft

    return export_peft(source, out_dir, overwrite=overwrite)


def _export_gguf(source: Path, out_dir: Path, overwrite: bool, gguf_type: str | None) -> Path:
    """The GGUF file, with the SQuAD prompt the folder was fine-tuned with (its ``prepare_config.json``) if any."""
    from lit_qa.checkpoints.export_gguf import export_gguf
    from lit_qa.data.prompts import PLAIN_TEMPLATE, USER_TEMPLATE
    from lit_qa.evaluation.run import prompt_settings

    prompt = None
    if (source / PREPARE_CONFIG_FILE).is_file():
        style, no_answer = prompt_settings(source, None, None, warn_if_unknown=False)
        template = (PLAIN_TEMPLATE if style == "plain" else USER_TEMPLATE).replace("{no_answer}", no_answer)
        prompt = {"prompt_style": style, "no_answer": no_answer, "prompt_template": template}
    path = export_gguf(source, out_dir, gguf_type or "F16", overwrite=overwrite, prompt=prompt)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path


def _convert_to_lit(source: Path, out_dir: Path, name: str | None, dtype: torch.dtype | None, overwrite: bool) -> Path:
    kind = detect_source_kind(source)
    if kind == "gguf":
        from lit_qa.checkpoints.convert_gguf import convert_gguf

        return convert_gguf(source, out_dir, name=name, dtype=dtype or torch.float32, overwrite=overwrite)
    if kind == "meta":
        from lit_qa.checkpoints.convert_meta import convert_meta_checkpoint

        return convert_meta_checkpoint(source, out_dir, name=name, dtype=dtype, overwrite=overwrite)
    if is_gptq_folder(source):
        from lit_qa.checkpoints.gptq import import_hf_gptq

        if dtype is not None:
            raise LitQAError(f"{source} holds GPTQ-quantized weights: --dtype does not apply")
        return import_hf_gptq(source, out_dir, name=name, overwrite=overwrite)
    from lit_qa.checkpoints.convert_hf import convert_hf_checkpoint

    return convert_hf_checkpoint(source, out_dir, name=name, dtype=dtype, overwrite=overwrite)


def is_gptq_folder(folder: Path) -> bool:
    """Whether ``folder`` holds GPTQ-quantized weights: a ``quantize_config.json``, or a Hugging Face
    ``config.json`` whose ``quantization_config`` says ``quant_method: gptq``."""
    if (folder / "quantize_config.json").is_file():
        return True
    config_path = folder / "config.json"
    if not config_path.is_file():
        return False
    try:
        quantization = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False  # the regular converter reports what is wrong with the file
    return isinstance(quantization, dict) and quantization.get("quant_method") == "gptq"


def _print_contents(folder: Path) -> None:
    print(f"wrote {folder}:")
    for path in sorted(Path(folder).iterdir()):
        print(f"  {path.name:32} {path.stat().st_size / 1e6:10.2f} MB")


if __name__ == "__main__":
    run_cli(main)
