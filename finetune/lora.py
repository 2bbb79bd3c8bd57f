# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LoRA fine-tuning for SQuAD 2.0 on prepared data (see scripts/prepare_squad.py).

One GPU or CPU:

    python finetune/lora.py --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b

Several GPUs, one or more nodes (every rank agrees on the data order; rank 0 writes):

    python finetune/lora.py --devices 8 --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b
    torchrun --nproc_per_node 8 --nnodes 2 ... finetune/lora.py --devices 8 --num_nodes 2 ...

The CPU demo on the embedded default: ``python finetune/lora.py --config configs/lora-smollm2-cpu.yaml``.
Continue a stopped run with ``--resume auto`` (or ``--resume out/finetune/lora/step-000200``).
Outputs in ``--out_dir``: ``step-*/`` checkpoints (LoRA weights + resume state), ``final/``, and
TensorBoard/CSV logs under ``logs/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

from lit_qa.args import EvalArgs, TrainArgs
from lit_qa.checkpoint import check_checkpoint_dir, load_model
from lit_qa.data import load_prepared, read_prepare_config
from lit_qa.errors import LitQAError, run_cli
from lit_qa.distributed import FSDPArgs, Strategy, full_state_dict, make_strategy
from lit_qa.lora import (LoRAConfig, apply_lora, count_parameters, lora_state_dict, mark_only_lora_as_trainable,
                         save_lora_checkpoint)  # fmt: skip
from lit_qa.precision import resolve_precision, weights_dtype
from lit_qa.tokenizer import Tokenizer, check_vocab_matches
from lit_qa.training import fit, latest_checkpoint, save_hyperparameters, setup_model


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
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    seed: int = 42,
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
        resume: Continue from the latest checkpoint in out_dir (True / "auto") or from a given step folder.
        overwrite: Start over in an out_dir that already holds checkpoints (they are deleted).
        seed: Random seed for LoRA initialisation, dropout and data order.
    """
    check_checkpoint_dir(checkpoint_dir)
    prepare_config = read_prepare_config(data_dir)
    if resume is False and latest_checkpoint(out_dir) is not None:
        if not overwrite:
            raise LitQAError(f"{out_dir} already holds checkpoints; pass --resume auto to continue or --overwrite to start over")
        for old in [*out_dir.glob("step-*"), out_dir / "final"]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(precision, accelerator)
    loggers = [TensorBoardLogger(out_dir / "logs", name="tensorboard"), CSVLogger(out_dir / "logs", name="csv")]
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                      strategy=make_strategy(strategy, devices * num_nodes, fsdp), precision=precision, loggers=loggers)  # fmt: skip
    train.validate(devices * num_nodes)
    fabric.launch(main, data_dir, checkpoint_dir, out_dir, precision, lora, train, eval, resume, seed, prepare_config)


def main(
    fabric: L.Fabric,
    data_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str,
    lora_config: LoRAConfig,
    train_args: TrainArgs,
    eval_args: EvalArgs,
    resume: bool | str | Path,
    seed: int,
    prepare_config: dict,
) -> None:
    fabric.seed_everything(seed)  # the same seed on every rank: identical LoRA initialisation
    tokenizer = Tokenizer(checkpoint_dir)
    with fabric.rank_zero_first():
        train_data, val_data = load_prepared(data_dir, "train"), load_prepared(data_dir, "val")

    model, config = load_model(checkpoint_dir, dtype=weights_dtype(precision))
    check_vocab_matches(tokenizer, config.padded_vocab_size, checkpoint_dir)
    prepared_vocab = prepare_config["tokenizer"]["vocab_size"]
    if prepared_vocab != tokenizer.vocab_size:
        raise LitQAError(f"{data_dir} was prepared with another tokenizer ({prepared_vocab} tokens, "
                         f"{checkpoint_dir} has {tokenizer.vocab_size}); run scripts/prepare_squad.py again")  # fmt: skip
    # Room for the longest sample, and for the sample answers generated at each validation.
    longest = max(len(s["input_ids"]) for s in train_data + val_data)
    model.max_seq_length = min(config.block_size, longest + eval_args.max_new_tokens)
    apply_lora(model, lora_config)
    mark_only_lora_as_trainable(model)
    fabric.print(f"{config.name}: {count_parameters(model, trainable_only=True):,} trainable of "
                 f"{count_parameters(model):,} parameters; precision {precision}")  # fmt: skip

    model = setup_model(fabric, model, train_args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(train_args.beta1, train_args.beta2), fused=fabric.device.type == "cuda")  # fmt: skip
    optimizer = fabric.setup_optimizers(optimizer)
    if fabric.global_rank == 0:
        save_hyperparameters(out_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir, precision=precision,
                             lora=lora_config, train=train_args, eval=eval_args, seed=seed)  # fmt: skip

    def save_fn(folder: Path) -> None:
        # The adapter, its config, the base's identity and the prompt settings evaluation must reuse.
        tensors = full_state_dict(lora_state_dict(model.module))  # every rank: a collective under FSDP
        if fabric.global_rank == 0:
            save_lora_checkpoint(folder, model.module, lora_config, checkpoint_dir, tensors=tensors,
                                 extra={"prepare_config.json": prepare_config}, overwrite=True)  # fmt: skip

    fit(fabric, model, optimizer, train_data, val_data, train_args, eval_args, out_dir, save_fn, tokenizer,
        resume=resume, seed=seed)  # fmt: skip
    save_fn(out_dir / "final")
    fabric.barrier()
    fabric.print(f"Saved the LoRA adapter to {out_dir / 'final'}")


if __name__ == "__main__":
    run_cli(setup)
