# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Fold a LoRA adapter into its base model and write a full lit-qa checkpoint folder.

The adapter folder says which base it was trained on (``base_checkpoint.json``) and with which rank,
alpha and targets (``lora_config.json``), so nothing has to be repeated on the command line::

    python scripts/merge_lora.py --lora_dir out/finetune/lora/final --out_dir out/merged

The result loads like any converted model, and can be exported to Hugging Face format::

    python scripts/convert_checkpoint.py --to hf --source out/merged --out_dir out/merged-hf

A LoRA on the output head of a model with tied embeddings is merged into an untied copy of the head
(the input embedding stays as it was), so the written ``lit_config.json`` then says ``tie_embeddings: false``.

The adapter's ``prepare_config.json`` (prompt style, no-answer string), ``na_threshold.json`` (the tuned
no-answer threshold) and no-answer head (``na_head.safetensors``, ``na_head_config.json``) are copied beside the
merged weights, where `evaluate/base.py` looks for them.
"""

from __future__ import annotations

from pathlib import Path

from lit_qa.checkpoints.convert_hf import tokenizer_files
from lit_qa.checkpoints.folder import check_not_inside, save_checkpoint
from lit_qa.checkpoints.lora import load_lora_checkpoint, read_lora_base_record
from lit_qa.checkpoints.na_head import NA_HEAD_FILES, load_na_head
from lit_qa.data.dataset import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.errors import run_cli
from lit_qa.evaluation.calibration import NA_THRESHOLD_FILE, read_na_threshold
from lit_qa.files import check_out_dir
from lit_qa.models.lora import lora_filter, merge_lora_weights


def main(
    lora_dir: Path,
    out_dir: Path,
    base_checkpoint_dir: Path | None = None,
    overwrite: bool = False,
    allow_different_base: bool = False,
) -> Path:
    """Merge a LoRA adapter into its base model.

    Arguments:
        lora_dir: The adapter folder written by fine-tuning (lit_lora.safetensors, lora_config.json,
            base_checkpoint.json).
        out_dir: The folder to write. It must not exist or be empty, unless ``--overwrite`` is given.
        base_checkpoint_dir: The base checkpoint folder. Defaults to the path recorded in base_checkpoint.json.
        overwrite: Replace a non-empty out_dir (the old one is removed only once the new one is complete).
        allow_different_base: Merge even if the base weights are not those the adapter was trained on
            (e.g. the same model re-converted in another dtype); the architecture must still match.
    """
    check_out_dir(out_dir, overwrite)  # fail before loading anything
    base = Path(read_lora_base_record(lora_dir)["path"]) if base_checkpoint_dir is None else base_checkpoint_dir
    check_not_inside(out_dir, {"--lora_dir": lora_dir, "--base_checkpoint_dir": base})
    model, _, lora_config = load_lora_checkpoint(lora_dir, base, allow_different_base=allow_different_base)
    untied = merge_lora_weights(model)
    state_dict = {key: value for key, value in model.state_dict().items() if not lora_filter(key, value)}
    # Copied files are checked as evaluation will read them, so a broken head fails here and not later.
    load_na_head(model, lora_dir)
    read_na_threshold(Path(lora_dir))
    # model.config, not the loaded config: merging a tied head's LoRA unties it.
    # The prompt settings, the tuned no-answer threshold and the no-answer head travel with the weights, so
    # evaluate/base.py on the merged folder asks and abstains exactly as evaluate/lora.py does on the adapter.
    trained_with = {name: Path(lora_dir) / name for name in (PREPARE_CONFIG_FILE, NA_THRESHOLD_FILE, *NA_HEAD_FILES)}
    extra_files = tokenizer_files(base) | {name: path for name, path in trained_with.items() if path.is_file()}
    save_checkpoint(out_dir, model.config, state_dict, extra_files, overwrite)
    print(f"merged LoRA (r={lora_config.r}, alpha={lora_config.alpha}) from {lora_dir} into {base}")
    if untied:
        print("the LoRA adapted the tied output head: the merged model has an untied head (tie_embeddings=false)")
    print(f"wrote {out_dir}:")
    for path in sorted(Path(out_dir).iterdir()):
        print(f"  {path.name:32} {path.stat().st_size / 1e6:10.2f} MB")
    return Path(out_dir)


if __name__ == "__main__":
    run_cli(main)
