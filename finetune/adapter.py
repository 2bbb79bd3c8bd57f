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
from typing import Any

import lightning as L

from lit_qa.checkpoints.adapter import save_adapter_checkpoint
from lit_qa.errors import run_cli
from lit_qa.models.adapter import AdapterConfig, adapter_state_dict, apply_adapter, mark_only_adapter_as_trainable
from lit_qa.models.model import GPT
from lit_qa.training.args import TrainArgs
from lit_qa.training.distributed import full_state_dict
from lit_qa.training.finetune import Run, finetune, start, with_shared_flags
from lit_qa.training.launch import launch


@with_shared_flags
def setup(
    out_dir: Path = Path("out/finetune/adapter"),
    adapter: AdapterConfig = AdapterConfig(),
    train: TrainArgs = TrainArgs(learning_rate=9e-3, global_batch_size=64, warmup_steps=100, weight_decay=0.02),
    **flags: Any,
) -> None:
    """Fine-tune a LLaMA-Adapter. Defaults follow lit-llama's adapter recipe (AdamW lr 9e-3, weight decay 0.02,
    global batch 64, prompts of 10 embeddings from layer 2 up), with 100 warm-up steps instead of 2 epochs.

    Args:
        adapter: Adapter version (1 or 2), prompt length and first adapted layer.
        seed: Random seed for the prompts' initialisation and the data order.
    """
    fabric, run = start(out_dir=out_dir, train=train, **flags)  # the flags every finetune script takes: see start
    launch(fabric, main, run, adapter)


def main(fabric: L.Fabric, run: Run, adapter_config: AdapterConfig) -> None:
    def make_trainable(model: GPT) -> None:
        apply_adapter(model, adapter_config)
        mark_only_adapter_as_trainable(model)

    def save(folder: Path, model: GPT, head_files: dict[str, bytes]) -> None:
        # The adapter, its config, the base's identity, the prompt settings evaluation must reuse and the head.
        tensors = full_state_dict(adapter_state_dict(model))  # every rank: a collective under FSDP
        if fabric.global_rank == 0:
            save_adapter_checkpoint(folder, model, adapter_config, run.checkpoint_dir, tensors=tensors,
                                    extra={"prepare_config.json": run.prepare_config, **head_files},
                                    overwrite=True)  # fmt: skip

    finetune(fabric, run, make_trainable, save, f"LLaMA-Adapter v{adapter_config.version}", adapter=adapter_config)


if __name__ == "__main__":
    run_cli(setup)
