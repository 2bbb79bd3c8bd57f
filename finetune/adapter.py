# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LLaMA-Adapter fine-tuning for SQuAD 2.0 on prepared data (see scripts/prepare_squad.py).

Trains a gated adaption prompt in the upper layers (v1, arXiv 2303.16199; lit_qa/models/adapter.py explains it), or
with ``--adapter.version 2`` also a scale and bias per linear layer and the norms (v2, arXiv 2304.15010;
``finetune/adapter_v2.py`` is this script with v2's defaults).

One GPU or CPU:

    python finetune/adapter.py --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b

Several GPUs, one or more nodes (every rank agrees on the data order; rank 0 writes):

    python finetune/adapter.py --devices 8 --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b
    torchrun --nproc_per_node 8 --nnodes 2 ... finetune/adapter.py --devices 8 --num_nodes 2 ...

Continue a stopped run with ``--resume auto``. Outputs in ``--out_dir``: ``step-*/`` checkpoints (adapter
weights + resume state), ``final/``, and TensorBoard/CSV logs under ``logs/``. Evaluate with evaluate/adapter.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L

from lit_qa.checkpoints.adapter import save_adapter_checkpoint
from lit_qa.checkpoints.na_head import na_head_files
from lit_qa.errors import run_cli
from lit_qa.models.adapter import AdapterConfig, adapter_state_dict, apply_adapter, mark_only_adapter_as_trainable
from lit_qa.models.na_head import NAHeadConfig, na_head_state_dict
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
    out_dir: Path = Path("out/finetune/adapter"),
    precision: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    fsdp: FSDPArgs = FSDPArgs(),
    adapter: AdapterConfig = AdapterConfig(),
    train: TrainArgs = TrainArgs(learning_rate=9e-3, global_batch_size=64, warmup_steps=100, weight_decay=0.02),
    eval: EvalArgs = EvalArgs(),
    na_head: bool = True,
    na: NAHeadConfig = NAHeadConfig(),
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    seed: int = 42,
) -> None:
    """Fine-tune a LLaMA-Adapter. Defaults follow lit-llama's adapter recipe (AdamW lr 9e-3, weight decay 0.02,
    global batch 64, prompts of 10 embeddings from layer 2 up), with 100 warm-up steps instead of 2 epochs.

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
        adapter: Adapter version (1 or 2), prompt length and first adapted layer.
        train: Training hyperparameters.
        eval: Validation hyperparameters.
        na_head: Train a no-answer head with the model (lit_qa/models/na_head.py): a linear layer on middle layers'
            hidden states at the prompt's last token, trained on "is this question unanswerable?"; evaluation
            abstains by its probability. Saved beside the weights (na_head.safetensors, na_head_config.json).
        na: The head's layers, size, loss weight, learning-rate scale and feature standardisation.
        resume: Continue from the latest checkpoint in out_dir (True / "auto") or from a given step folder.
        overwrite: Start over in an out_dir that already holds checkpoints (they are deleted).
        seed: Random seed for the prompts' initialisation and the data order.
    """
    prepare_config = check_inputs(data_dir, checkpoint_dir, out_dir, resume, overwrite)
    fabric, precision = make_fabric(out_dir, precision, devices, num_nodes, strategy, fsdp, train)
    launch(fabric, main, data_dir, checkpoint_dir, out_dir, precision, adapter, train, eval, na_head, na, resume, seed,
           prepare_config)  # fmt: skip


def main(
    fabric: L.Fabric,
    data_dir: Path,
    checkpoint_dir: Path,
    out_dir: Path,
    precision: str,
    adapter_config: AdapterConfig,
    train_args: TrainArgs,
    eval_args: EvalArgs,
    na_head: bool,
    na_config: NAHeadConfig,
    resume: bool | str | Path,
    seed: int,
    prepare_config: dict,
) -> None:
    fabric.seed_everything(seed)  # the same seed on every rank: identical prompt initialisation
    tokenizer, train_data, val_data, model, config = load_data_and_model(
        fabric, data_dir, checkpoint_dir, precision, eval_args, prepare_config
    )
    apply_adapter(model, adapter_config)
    mark_only_adapter_as_trainable(model)
    add_na_head(fabric, model, na_head, na_config, train_data)
    print_parameter_counts(fabric, model, precision)
    model = setup_model(fabric, model, train_args)
    optimizer = make_optimizer(fabric, model, train_args)
    if fabric.global_rank == 0:
        save_hyperparameters(out_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir, precision=precision,
                             adapter=adapter_config, train=train_args, eval=eval_args, na_head=na_head,
                             na=na_config, seed=seed)  # fmt: skip

    def save_fn(folder: Path) -> None:
        # The adapter, its config, the base's identity, the prompt settings evaluation must reuse and the head.
        tensors = full_state_dict(adapter_state_dict(model.module))  # every rank: a collective under FSDP
        head_files = na_head_files(model.module, full_state_dict(na_head_state_dict(model.module)))
        if fabric.global_rank == 0:
            save_adapter_checkpoint(folder, model.module, adapter_config, checkpoint_dir, tensors=tensors,
                                    extra={"prepare_config.json": prepare_config, **head_files},
                                    overwrite=True)  # fmt: skip

    val_questions = load_val_questions(data_dir, eval_args, prepare_config)
    progress = fit(fabric, model, optimizer, train_data, val_data, train_args, eval_args, out_dir, save_fn, tokenizer,
                   resume=resume, seed=seed, val_questions=val_questions)  # fmt: skip
    save_final(fabric, out_dir, save_fn, progress, val_questions, f"LLaMA-Adapter v{adapter_config.version}")


if __name__ == "__main__":
    run_cli(setup)
