# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LoRA fine-tuning for SQuAD 2.0 on prepared data (see scripts/prepare_squad.py).

One GPU or CPU:

    python finetune/lora.py --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b

Several GPUs, one or more nodes (every rank agrees on the data order; rank 0 writes):

    python finetune/lora.py --devices 8 --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b
    torchrun --nproc_per_node 8 --nnodes 2 ... finetune/lora.py --devices 8 --num_nodes 2 ...

The CPU demo on the embedded default: ``python finetune/lora.py --config configs/lora-smollm2-cpu.yaml``.
Continue a stopped run with ``--resume auto`` (or ``--resume out/finetune/lora/step-000200``).
QLoRA: ``--quantize bnb.nf4`` (or bnb.fp4, bnb.int8) quantizes the frozen base before LoRA is applied; one device
or DDP, not FSDP. The adapter folder records the mode in ``quantize.json``.
Outputs in ``--out_dir``: ``step-*/`` checkpoints (LoRA weights + resume state), ``final/``, ``best/`` (with
``--eval.f1_questions``: the step with the best validation F1; ``best/`` and ``final/`` then also hold the
no-answer threshold tuned at that validation, ``na_threshold.json``, which evaluate/lora.py uses by default) and
TensorBoard/CSV logs under ``logs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lit_qa.checkpoints.lora import save_lora_checkpoint
from lit_qa.errors import run_cli
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.quantize import check_qlora_args, quantize_model, quantize_record
from lit_qa.training.distributed import full_state_dict
from lit_qa.training.finetune import Run, finetune, start, with_shared_flags
from lit_qa.training.launch import launch


@with_shared_flags
def setup(
    out_dir: Path = Path("out/finetune/lora"),
    lora: LoRAConfig = LoRAConfig(),
    quantize: str | None = None,
    **flags: Any,
) -> None:
    """Fine-tune a LoRA adapter. Defaults follow the known-good 7B recipe (lr 3e-4, global batch 128,
    100 warm-up steps, LoRA r 8 / alpha 16 / dropout 0.05 on the query and value projections).

    Args:
        lora: LoRA rank, alpha, dropout and target layers.
        seed: Random seed for LoRA initialisation, dropout and data order.
        quantize: QLoRA: "bnb.nf4", "bnb.fp4" or "bnb.int8" quantizes the frozen base (not with --strategy fsdp);
            None keeps it in full precision.
    """
    fabric, run = start(out_dir=out_dir, **flags)  # the flags every finetune script takes: see start
    check_qlora_args(quantize, fabric)
    launch(fabric, main, run, lora, quantize)


def main(fabric: L.Fabric, run: Run, lora_config: LoRAConfig, quantize: str | None = None) -> None:
    def make_trainable(model: GPT) -> None:
        if quantize:  # QLoRA: quantize the frozen base first; LoRA then calls the quantized layers
            quantize_model(model, quantize, for_training=True)
        apply_lora(model, lora_config)
        mark_only_lora_as_trainable(model)

    def save(folder: Path, model: GPT, head_files: dict[str, bytes]) -> None:
        # The adapter, its config, the base's identity, the prompt settings evaluation must reuse and the head.
        tensors = full_state_dict(lora_state_dict(model))  # every rank: a collective under FSDP
        if fabric.global_rank == 0:
            extra = {"prepare_config.json": run.prepare_config, **quantize_record(quantize), **head_files}
            save_lora_checkpoint(folder, model, lora_config, run.checkpoint_dir, tensors=tensors, extra=extra,
                                 overwrite=True)  # fmt: skip

    finetune(fabric, run, make_trainable, save, "LoRA adapter", quantize=quantize, lora=lora_config)


if __name__ == "__main__":
    run_cli(setup)
