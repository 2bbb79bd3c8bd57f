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
from typing import Literal

import lightning as L

from lit_qa.checkpoints.lora import save_lora_checkpoint
from lit_qa.checkpoints.na_head import na_head_files
from lit_qa.errors import run_cli
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_qa.models.na_head import NAHeadConfig, na_head_state_dict
from lit_qa.quantize import check_qlora_args, quantize_model, quantize_record
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
    out_dir: Path = Path("out/finetune/lora"),
    precision: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    fsdp: FSDPArgs = FSDPArgs(),
    lora: LoRAConfig = LoRAConfig(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    na_head: bool = True,
    na: NAHeadConfig = NAHeadConfig(),
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    seed: int = 42,
    quantize: str | None = None,
) -> None:
    """Fine-tune a LoRA adapter. Defaults follow the known-good 7B recipe (lr 3e-4, global batch 128,
    100 warm-up steps, LoRA r 8 / alpha 16 / dropout 0.05 on the query and value projections).

    Args:
        data_dir: Folder written by scripts/prepare_squad.py (train.pt, val.pt, prepare_config.json).
        checkpoint_dir: The base model, a lit checkpoint folder (scripts/convert_checkpoint.py).
        out_dir: Where checkpoints and logs go.
        precision: "auto" (bf16 on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "bf16-mixed", "16-mixed".
        devices: Devices per node.
        num_nodes: Number of nodes.
        strategy: "auto", "ddp" (a full frozen copy of the base on every device) or "fsdp" (FSDP2: the base
            sharded over the devices, for models that do not fit one device).
        fsdp: CPU offload and resharding under ``--strategy fsdp``.
        lora: LoRA rank, alpha, dropout and target layers.
        train: Training hyperparameters.
        eval: Validation hyperparameters.
        na_head: Train a no-answer head with the model (lit_qa/models/na_head.py): a linear layer on middle layers'
            hidden states at the prompt's last token, trained on "is this question unanswerable?"; evaluation
            abstains by its probability. Saved beside the weights (na_head.safetensors, na_head_config.json).
        na: The head's layers, size, loss weight, learning-rate scale and feature standardisation.
        resume: Continue from the latest checkpoint in out_dir (True / "auto") or from a given step folder.
        overwrite: Start over in an out_dir that already holds checkpoints (they are deleted).
        seed: Random seed for LoRA initialisation, dropout and data order.
        quantize: QLoRA: "bnb.nf4", "bnb.fp4" or "bnb.int8" quantizes the frozen base (not with --strategy fsdp);
            None keeps it in full precision.
    """
    prepare_config = check_inputs(data_dir, checkpoint_dir, out_dir, resume, overwrite)
    fabric, precision = make_fabric(out_dir, precision, devices, num_nodes, strategy, fsdp, train)
    check_qlora_args(quantize, fabric)
    launch(fabric, main, data_dir, checkpoint_dir, out_dir, precision, lora, train, eval, na_head, na, resume, seed,
           prepare_config, quantize)  # fmt: skip


def main(
    fabric: L.Fabric,
    data_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str,
    lora_config: LoRAConfig,
    train_args: TrainArgs,
    eval_args: EvalArgs,
    na_head: bool,
    na_config: NAHeadConfig,
    resume: bool | str | Path,
    seed: int,
    prepare_config: dict,
    quantize: str | None = None,
) -> None:
    fabric.seed_everything(seed)  # the same seed on every rank: identical LoRA initialisation
    tokenizer, train_data, val_data, model, config = load_data_and_model(
        fabric, data_dir, checkpoint_dir, precision, eval_args, prepare_config
    )
    if quantize:  # QLoRA: quantize the frozen base first; LoRA then calls the quantized layers
        quantize_model(model, quantize, for_training=True)
    apply_lora(model, lora_config)
    mark_only_lora_as_trainable(model)
    add_na_head(fabric, model, na_head, na_config, train_data)
    print_parameter_counts(fabric, model, precision)
    model = setup_model(fabric, model, train_args)
    optimizer = make_optimizer(fabric, model, train_args)
    if fabric.global_rank == 0:
        save_hyperparameters(out_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir, precision=precision,
                             quantize=quantize, lora=lora_config, train=train_args, eval=eval_args,
                             na_head=na_head, na=na_config, seed=seed)  # fmt: skip

    def save_fn(folder: Path) -> None:
        # The adapter, its config, the base's identity, the prompt settings evaluation must reuse and the head.
        tensors = full_state_dict(lora_state_dict(model.module))  # every rank: a collective under FSDP
        head_files = na_head_files(model.module, full_state_dict(na_head_state_dict(model.module)))
        if fabric.global_rank == 0:
            extra = {"prepare_config.json": prepare_config, **quantize_record(quantize), **head_files}
            save_lora_checkpoint(folder, model.module, lora_config, checkpoint_dir, tensors=tensors, extra=extra,
                                 overwrite=True)  # fmt: skip

    val_questions = load_val_questions(data_dir, eval_args, prepare_config)
    progress = fit(fabric, model, optimizer, train_data, val_data, train_args, eval_args, out_dir, save_fn, tokenizer,
                   resume=resume, seed=seed, val_questions=val_questions)  # fmt: skip
    save_final(fabric, out_dir, save_fn, progress, val_questions, "LoRA adapter")


if __name__ == "__main__":
    run_cli(setup)
