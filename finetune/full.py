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
from typing import Literal

import lightning as L

from lit_qa.checkpoints.convert_hf import tokenizer_files
from lit_qa.checkpoints.folder import save_checkpoint
from lit_qa.checkpoints.na_head import na_head_files, split_na_head
from lit_qa.data.dataset import CONFIG_FILE as PREPARE_CONFIG_FILE
from lit_qa.errors import run_cli
from lit_qa.models.na_head import NAHeadConfig
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.distributed import FSDPArgs, Strategy, full_state_dict
from lit_qa.training.launch import (
    add_na_head,
    check_inputs,
    launch,
    load_data_and_model,
    load_val_questions,
    make_fabric,
    make_optimizer,
    print_parameter_counts,
    save_hyperparameters,
)
from lit_qa.training.loop import fit, setup_model
from lit_qa.training.selection import save_final


def setup(
    data_dir: Path = Path("data/squad2"),
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune/full"),
    precision: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    fsdp: FSDPArgs = FSDPArgs(),
    train: TrainArgs = TrainArgs(learning_rate=3e-5),
    eval: EvalArgs = EvalArgs(),
    na_head: bool = True,
    na: NAHeadConfig = NAHeadConfig(),
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    seed: int = 42,
) -> None:
    """Fine-tune every weight. Defaults follow the known-good 7B full recipe (AdamW lr 3e-5, global batch 128,
    100 warm-up steps then cosine decay, gradient clipping at 1.0).

    Args:
        data_dir: Folder written by scripts/prepare_squad.py (train.pt, val.pt, prepare_config.json).
        checkpoint_dir: The base model, a lit checkpoint folder (scripts/convert_checkpoint.py).
        out_dir: Where checkpoints and logs go.
        precision: "auto" (bf16-true on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "bf16-mixed" (fp32 master weights, bf16 compute: the better choice for full
            fine-tuning on GPUs when memory allows), "16-mixed".
        devices: Devices per node.
        num_nodes: Number of nodes.
        strategy: "auto", "ddp" (a whole model, its gradients and optimizer states on every device) or "fsdp"
            (FSDP2: all three sharded over the devices; what a 7B and up needs).
        fsdp: CPU offload and resharding under ``--strategy fsdp``.
        train: Training hyperparameters (micro batch x accumulation x devices = global batch).
        eval: Validation hyperparameters.
        na_head: Train a no-answer head with the model (lit_qa/models/na_head.py): a linear layer on middle layers'
            hidden states at the prompt's last token, trained on "is this question unanswerable?"; evaluation
            abstains by its probability. Saved beside the weights (na_head.safetensors, na_head_config.json).
        na: The head's layers, size, loss weight, learning-rate scale and feature standardisation.
        resume: Continue from the latest checkpoint in out_dir (True / "auto") or from a given step folder.
        overwrite: Start over in an out_dir that already holds checkpoints (they are deleted).
        seed: Random seed for dropout and data order.
    """
    prepare_config = check_inputs(data_dir, checkpoint_dir, out_dir, resume, overwrite)
    fabric, precision = make_fabric(out_dir, precision, devices, num_nodes, strategy, fsdp, train)
    launch(fabric, main, data_dir, checkpoint_dir, out_dir, precision, train, eval, na_head, na, resume, seed,
           prepare_config)  # fmt: skip


def main(
    fabric: L.Fabric,
    data_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str,
    train_args: TrainArgs,
    eval_args: EvalArgs,
    na_head: bool,
    na_config: NAHeadConfig,
    resume: bool | str | Path,
    seed: int,
    prepare_config: dict,
) -> None:
    fabric.seed_everything(seed)
    tokenizer, train_data, val_data, model, config = load_data_and_model(
        fabric, data_dir, checkpoint_dir, precision, eval_args, prepare_config
    )
    model.requires_grad_(True)
    add_na_head(fabric, model, na_head, na_config, train_data)
    print_parameter_counts(fabric, model, precision)
    model = setup_model(fabric, model, train_args)
    optimizer = make_optimizer(fabric, model, train_args)
    if fabric.global_rank == 0:
        save_hyperparameters(out_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir, precision=precision,
                             train=train_args, eval=eval_args, na_head=na_head, na=na_config, seed=seed)  # fmt: skip
    extra_files = {**tokenizer_files(checkpoint_dir), PREPARE_CONFIG_FILE: data_dir / PREPARE_CONFIG_FILE}

    def save_fn(folder: Path) -> None:
        # A complete, consolidated checkpoint: evaluate/base.py and the converter load it as they load a base.
        # The head goes into files of its own beside it: the model's weights file stays a plain checkpoint.
        state = full_state_dict(model.module.state_dict(), keep=fabric.global_rank == 0)  # a collective
        if fabric.global_rank == 0:
            weights, head = split_na_head(state)
            extra = {**extra_files, **na_head_files(model.module, head)}
            save_checkpoint(folder, config, weights, extra, overwrite=True)

    val_questions = load_val_questions(data_dir, eval_args, prepare_config)
    progress = fit(fabric, model, optimizer, train_data, val_data, train_args, eval_args, out_dir, save_fn, tokenizer,
                   resume=resume, seed=seed, val_questions=val_questions)  # fmt: skip
    save_final(fabric, out_dir, save_fn, progress, val_questions, "fine-tuned model")


if __name__ == "__main__":
    run_cli(setup)
