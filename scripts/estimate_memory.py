# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Estimate the per-GPU memory of a fine-tuning run before renting GPUs: weights, gradients, optimizer states,
activations, transient buffers and a fixed overhead, from the model config alone (no weights are read).

    python scripts/estimate_memory.py --model Llama-2-7b --method lora --micro_batch_size 4 --gpu_memory_gb 24
    python scripts/estimate_memory.py --model Llama-2-70b --method full --devices 8 --strategy fsdp \\
        --activation_checkpointing --gpu_memory_gb 80
    python scripts/estimate_memory.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --precision 32-true \\
        --accelerator cpu

``--gpu_memory_gb`` adds whether the run fits and the largest micro batch that does. GB are 1e9 bytes, so an
"80 GB" card (80 GiB) has about 7 % more room than ``--gpu_memory_gb 80`` assumes. The accounting rules, and
how the estimate compares with measured runs, are in the docstring of `lit_qa.training.memory`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.config import Config
from lit_qa.training.memory import (
    GB,
    MemoryEstimate,
    TrainingSetup,
    estimate_memory,
    largest_micro_batch,
    parameter_counts,
)


def main(
    model: str | None = None,
    checkpoint_dir: Path | None = None,
    method: str = "lora",
    precision: str = "bf16-true",
    micro_batch_size: int = 4,
    seq_length: int = 512,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "ddp",
    activation_checkpointing: bool = False,
    lora_r: int = 8,
    lora_targets: str = "q,v",
    lora_dropout: float = 0.05,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
    answer_tokens: int = 8,
    gpu_memory_gb: float | None = None,
    accelerator: str = "cuda",
) -> MemoryEstimate:
    """Print the expected memory per GPU of fine-tuning a model.

    Arguments:
        model: A registered config name, e.g. Llama-2-7b (see lit_qa/models/config.py).
        checkpoint_dir: Or a checkpoint folder: its lit_config.json describes the model.
        method: full, lora, adapter, adapter_v2 or qlora (4-bit nf4 base weights plus LoRA).
        precision: 32-true, bf16-true, 16-true, bf16-mixed or 16-mixed (fp32 weights, 16-bit compute).
        micro_batch_size: Samples per forward/backward pass on one device.
        seq_length: Tokens per sample.
        devices: GPUs per node.
        num_nodes: Nodes.
        strategy: ddp (every GPU holds everything) or fsdp (weights, gradients and optimizer states sharded
            over all GPUs).
        activation_checkpointing: Recompute each block's activations in the backward pass.
        lora_r: LoRA rank.
        lora_targets: Comma-separated layers LoRA adapts: q, k, v, o, mlp, head.
        lora_dropout: Dropout on the LoRA path.
        adapter_prompt_length: LLaMA-Adapter prompt tokens per adapted layer.
        adapter_start_layer: First layer with an adapter prompt.
        answer_tokens: Average loss (answer) tokens per sample; the output head runs only there.
        gpu_memory_gb: Memory of one GPU; then also say whether it fits and the largest micro batch that does.
        accelerator: cuda, or cpu to estimate the resident memory of a CPU run.
    """
    if (model is None) == (checkpoint_dir is None):
        raise LitQAError("give exactly one of --model (a registered config name) and --checkpoint_dir")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise LitQAError(f"--gpu_memory_gb must be > 0, got {gpu_memory_gb}")
    config = Config.from_name(model) if model is not None else Config.from_checkpoint(checkpoint_dir)
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    setup = TrainingSetup(
        method=method, precision=precision, micro_batch_size=micro_batch_size, seq_length=seq_length,
        devices=devices, num_nodes=num_nodes, strategy=strategy, activation_checkpointing=activation_checkpointing,
        lora_r=lora_r, lora_targets=targets, lora_dropout=lora_dropout, adapter_prompt_length=adapter_prompt_length,
        adapter_start_layer=adapter_start_layer, answer_tokens=answer_tokens, accelerator=accelerator,
    )  # fmt: skip
    estimate = estimate_memory(config, setup)
    print_setup(config.name or str(checkpoint_dir), config, setup)
    print_estimate(config, setup, estimate)
    if gpu_memory_gb is not None:
        print_fit(config, setup, estimate, gpu_memory_gb)
    return estimate


def print_setup(name: str, config: Config, setup: TrainingSetup) -> None:
    """The run described in one line, and its parameter counts."""
    detail = f" (r={setup.lora_r} on {','.join(setup.lora_targets)})" if setup.method in ("lora", "qlora") else ""
    checkpointing = "activation checkpointing" if setup.activation_checkpointing else "no activation checkpointing"
    print(f"{name}: {setup.method}{detail}, {setup.precision}, micro batch {setup.micro_batch_size} x "
          f"{setup.seq_length} tokens, {setup.devices} device(s) x {setup.num_nodes} node(s), {setup.strategy}, "
          f"{checkpointing}")  # fmt: skip
    counts = parameter_counts(config, setup)
    print(f"parameters: {count_text(counts.total)}, trainable {count_text(counts.trainable)}")


def print_estimate(config: Config, setup: TrainingSetup, estimate: MemoryEstimate) -> None:
    """The table of memory per GPU (per process on CPU) by what holds it, with a note on each row."""
    per_sample = (estimate_memory(config, replace(setup, micro_batch_size=2)).activations
                  - estimate_memory(config, replace(setup, micro_batch_size=1)).activations)  # fmt: skip
    transient = []
    if setup.sharded:
        transient.append("FSDP: 2 gathered blocks, 1 block's gradients, the gathered embedding and head")
    if setup.method == "qlora":
        transient.append("one dequantized weight")
    cuda = setup.accelerator == "cuda"
    overhead = "CUDA context, workspaces, allocator slack" if cuda else "process baseline RSS"
    rows = [
        ("weights", estimate.weights, f"sharded over {setup.world_size}" if setup.sharded else ""),
        ("gradients", estimate.gradients, "x2 for DDP's buckets" if setup.world_size > 1 and not setup.sharded else ""),
        ("optimizer states", estimate.optimizer, "AdamW"),
        ("activations", estimate.activations, f"{per_sample / GB:.2f} GB per sample"),
        ("transient", estimate.transient, "; ".join(transient)),
        ("overhead", estimate.overhead, overhead),
        ("total", estimate.total, ""),
    ]  # fmt: skip
    print(f"memory per {'GPU' if cuda else 'process'} (GB = 1e9 bytes):")
    for name, value, note in rows:
        print(f"  {name:18}{value / GB:9.2f} GB" + (f"   ({note})" if note else ""))


def print_fit(config: Config, setup: TrainingSetup, estimate: MemoryEstimate, gpu_memory_gb: float) -> None:
    """Whether the run fits in ``gpu_memory_gb``, and the largest micro batch that does."""
    fits = "yes" if estimate.total <= gpu_memory_gb * GB else "no"
    best = largest_micro_batch(config, setup, gpu_memory_gb * GB)
    best_text = str(best) if best else "none (not even micro batch 1)"
    print(f"fits in {gpu_memory_gb:g} GB: {fits}; largest micro batch that fits: {best_text}")


def count_text(count: int) -> str:
    """A parameter count in millions or billions."""
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.2f} M"


if __name__ == "__main__":
    run_cli(main)
