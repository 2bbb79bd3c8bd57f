# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Full fine-tuning for SQuAD 2.0 on prepared data (see scripts/prepare_squad.py): every weight trains.

One GPU or CPU (small models):

    python finetune/full.py --data_dir data/squad2 --checkpoint_dir checkpoints/SmolLM2-135M-Instruct

A 7B sharded over 8 GPUs (FSDP2: parameters, gradients and optimizer states split over the devices),
bf16 compute with fp32 master weights, activations recomputed to save memory:

    python finetune/full.py --devices 8 --strategy fsdp --precision bf16-mixed \\
        --train.activation_checkpointing true --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b-hf

Several nodes: launch the same command on each with ``torchrun --nnodes 2 --nproc_per_node 8 ...`` (or
``fabric run``, or under SLURM) and add ``--num_nodes 2``. Continue a stopped run with ``--resume auto``.
Outputs in ``--out_dir``: ``step-*/`` and ``final/`` hold a complete lit checkpoint (weights, config,
tokenizer, prompt settings, and with ``--eval.f1_questions`` the tuned no-answer threshold ``na_threshold.json``)
that evaluate/base.py and scripts/convert_checkpoint.py load; ``step-*/`` also
holds the resume state (``training_state.pt``, or ``sharded_state/`` with one file per rank under FSDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lit_qa.checkpoints.convert_hf import tokenizer_files
from lit_qa.checkpoints.folder import save_checkpoint
from lit_qa.checkpoints.na_head import split_na_head
from lit_qa.data.dataset import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.errors import run_cli
from lit_qa.models.model import GPT
from lit_qa.training.args import TrainArgs
from lit_qa.training.distributed import full_state_dict
from lit_qa.training.finetune import Run, finetune, start, with_shared_flags
from lit_qa.training.launch import launch


@with_shared_flags
def setup(
    out_dir: Path = Path("out/finetune/full"),
    train: TrainArgs = TrainArgs(learning_rate=3e-5),
    **flags: Any,
) -> None:
    """Fine-tune every weight. Defaults follow the known-good 7B full recipe (AdamW lr 3e-5, global batch 128,
    100 warm-up steps then cosine decay, gradient clipping at 1.0).

    Args:
        precision: "auto" (bf16-true on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "bf16-mixed" (fp32 master weights, bf16 compute: the better choice for full
            fine-tuning on GPUs when memory allows), "16-mixed".
        strategy: "auto", "ddp" (a whole model, its gradients and optimizer states on every device) or "fsdp"
            (FSDP2: all three sharded over the devices; what a 7B and up needs).
        train: Training hyperparameters (micro batch x accumulation x devices = global batch).
        seed: Random seed for dropout and data order.
    """
    fabric, run = start(out_dir=out_dir, train=train, **flags)  # the flags every finetune script takes: see start
    launch(fabric, main, run)


def main(fabric: L.Fabric, run: Run) -> None:
    extra_files = {**tokenizer_files(run.checkpoint_dir), PREPARE_CONFIG_FILE: run.data_dir / PREPARE_CONFIG_FILE}

    def make_trainable(model: GPT) -> None:
        model.requires_grad_(True)

    def save(folder: Path, model: GPT, head_files: dict[str, bytes]) -> None:
        # A complete, consolidated checkpoint: evaluate/base.py and the converter load it as they load a base.
        # The head goes into files of its own beside it: the model's weights file stays a plain checkpoint.
        state = full_state_dict(model.state_dict(), keep=fabric.global_rank == 0)  # a collective
        if fabric.global_rank == 0:
            weights, _ = split_na_head(state)
            save_checkpoint(folder, model.config, weights, {**extra_files, **head_files}, overwrite=True)

    finetune(fabric, run, make_trainable, save, "fine-tuned model")


if __name__ == "__main__":
    run_cli(setup)
