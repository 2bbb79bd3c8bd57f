# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""What every fine-tuning script does before and around the loop: check the output folder, build Fabric,
load the prepared data and the base model, build the optimizer.

`lit_qa.training.finetune` calls these in order for every script in ``finetune/``, which differ only in what they
make trainable and what they save; the loop itself is `lit_qa.training.loop.fit`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

from lit_qa.checkpoints.folder import check_checkpoint_dir, check_not_inside, load_model
from lit_qa.data.dataset import VAL_SQUAD_FILE, collate, load_prepared, mark_unanswerable, read_prepare_config
from lit_qa.data.prompts import NO_ANSWER
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import count_parameters
from lit_qa.models.model import GPT
from lit_qa.models.na_head import NAHeadConfig, attach_na_head, last_prompt_positions
from lit_qa.models.tokenizer import Tokenizer, check_vocab_matches
from lit_qa.precision import resolve_precision, weights_dtype
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.distributed import (
    FSDPArgs,
    make_strategy,
)
from lit_qa.training.replace import begin_replacement, cancel_replacement, staged
from lit_qa.training.resume import latest_checkpoint
from lit_qa.training.validation import ValQuestions


@torch.no_grad()
def standardize_na_head(model: nn.Module, samples: list[dict[str, Any]], count: int, batch_size: int = 8) -> int:
    """Fit the head's feature standardisation on the last prompt token of ``count`` training samples spread evenly
    over ``samples`` (so always the same ones), with the model as it is before training. Returns how many.

    Before the first step, so a resumed run computes the same values again; they are saved with the head.
    """
    if count == 0 or not samples:
        return 0
    chosen = samples[:: max(1, len(samples) // count)][:count]
    was_training = model.training
    model.eval()
    per_layer: list[list[torch.Tensor]] = [[] for _ in model.na_head.layers]
    device = model.transformer.wte.weight.device
    for start in range(0, len(chosen), batch_size):
        # Lengths rounded to 64: a few shapes for CPU bf16 kernels (never past what the model takes).
        batch = collate(chosen[start : start + batch_size], 0, model.max_seq_length, pad_multiple=64)
        positions = last_prompt_positions(batch["labels"]).to(device)
        _, kept = model._forward_blocks(batch["input_ids"].to(device), na_positions=positions)
        for states, layer_states in zip(per_layer, kept, strict=True):
            states.append(layer_states.float())
    model.train(was_training)
    model.na_head.fit_standardization([torch.cat(states) for states in per_layer])
    return len(chosen)


def save_hyperparameters(out_dir: Path, **sections: Any) -> None:
    """Write every setting of the run to ``out_dir/hyperparameters.yaml`` (dataclasses become mappings)."""
    import yaml

    values = {key: asdict(value) if hasattr(value, "__dataclass_fields__") else value for key, value in sections.items()}
    values = {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}
    staged(out_dir, "hyperparameters.yaml").parent.mkdir(parents=True, exist_ok=True)
    staged(out_dir, "hyperparameters.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


# Fixed rather than --seed: runs with different seeds validate on the same questions, so their F1s compare.
VAL_SUBSET_SEED = 1234


def check_inputs(data_dir: Path, checkpoint_dir: Path, out_dir: Path, resume: Any, overwrite: bool) -> dict[str, Any]:
    """Fail before any process starts: the base checkpoint and the prepared data exist, and ``out_dir`` holds
    no run unless resuming. ``overwrite`` replaces an earlier run once this one has written its first checkpoint
    (`lit_qa.training.replace`); until then the old run stays as it is. Returns the data's ``prepare_config.json``."""
    check_checkpoint_dir(checkpoint_dir)
    prepare_config = read_prepare_config(data_dir)
    check_not_inside(out_dir, {"--checkpoint_dir": checkpoint_dir, "--data_dir": data_dir})
    if out_dir.exists() and not out_dir.is_dir():
        raise LitQAError(f"--out_dir {out_dir} is a file, not a folder")
    holds_run = latest_checkpoint(out_dir) is not None or (out_dir / "final").is_dir()
    if resume is False and holds_run and not overwrite:
        raise LitQAError(f"{out_dir} already holds a run; pass --resume auto to continue or --overwrite to replace "
                         "it (once the new run has written its first checkpoint)")  # fmt: skip
    if launcher_rank() == 0:  # under torchrun / SLURM every process runs this; one of them keeps the books
        cancel_replacement(out_dir)  # one an earlier --overwrite run left unfinished: its old run is intact
        if resume is False and holds_run:
            begin_replacement(out_dir)
    return prepare_config


def launcher_rank() -> int:
    """This process's global rank as torchrun or SLURM set it before Fabric exists (0 when started alone)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def make_fabric(
    out_dir: Path, precision: str, devices: int, num_nodes: int, strategy: str, fsdp_args: FSDPArgs, train_args: TrainArgs
) -> tuple[L.Fabric, str]:
    """A Fabric with TensorBoard and CSV loggers under ``out_dir/logs``; returns it and the resolved precision."""
    devices, num_nodes, strategy, precision = fabric_cli_overrides(devices, num_nodes, strategy, precision)
    if devices < 1 or num_nodes < 1:
        raise LitQAError(f"--devices and --num_nodes must be >= 1, got devices={devices}, num_nodes={num_nodes}")
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(precision, accelerator)
    train_args.validate(devices * num_nodes)
    loggers = [TensorBoardLogger(out_dir / "logs", name="tensorboard"), CSVLogger(out_dir / "logs", name="csv")]
    strategy = make_strategy(strategy, devices * num_nodes, fsdp_args, precision)
    fabric = L.Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                      precision=precision, loggers=loggers)  # fmt: skip
    return fabric, precision


def fabric_cli_overrides(devices: int, num_nodes: int, strategy: str, precision: str) -> tuple[int, int, str, str]:
    """Under ``fabric run``, the launcher's ``--devices``, ``--num_nodes``, ``--strategy`` and ``--precision``
    win: it started the processes (and it takes those flags even when written after the script). Its strategy
    name is taken over here (and removed from the environment, where Fabric would read it) because its
    "fsdp" would mean FSDP1, which refuses CPUs; ours is FSDP2."""
    if os.environ.get("LT_CLI_USED") != "1":
        return devices, num_nodes, strategy, precision
    if os.environ.get("LT_DEVICES", "").isdigit():
        devices = int(os.environ["LT_DEVICES"])
    num_nodes = int(os.environ.get("LT_NUM_NODES", num_nodes))
    strategy = os.environ.pop("LT_STRATEGY", strategy)
    precision = os.environ.get("LT_PRECISION", precision)
    return devices, num_nodes, strategy, precision


def launch(fabric: L.Fabric, main: Callable[..., Any], *args: Any) -> Any:
    """Run ``main(fabric, *args)`` on every process: ``fabric.launch`` starts the processes itself unless
    ``fabric run`` (or torchrun, SLURM) already did."""
    if os.environ.get("LT_CLI_USED") == "1":  # Fabric's own CLI forbids a second launch
        return main(fabric, *args)
    return fabric.launch(main, *args)


def load_data_and_model(
    fabric: L.Fabric,
    data_dir: Path,
    checkpoint_dir: Path,
    precision: str,
    eval_args: EvalArgs,
    prepare_config: dict[str, Any],
) -> tuple[Tokenizer, list[dict], list[dict], GPT, Config]:
    """The tokenizer, the prepared train and validation samples and the base model (on the CPU; Fabric moves
    or shards it), checking that data, tokenizer and weights belong together."""
    tokenizer = Tokenizer(checkpoint_dir)
    with fabric.rank_zero_first():
        train_data, val_data = load_prepared(data_dir, "train"), load_prepared(data_dir, "val")
    # Labels for the no-answer head, read off each sample's target (data prepared before the head works too).
    no_answer_ids = tokenizer.encode(prepare_config.get("no_answer", NO_ANSWER), bos=False, eos=True)
    for samples in (train_data, val_data):
        mark_unanswerable(samples, no_answer_ids)
    model, config = load_model(checkpoint_dir, dtype=weights_dtype(precision))
    check_vocab_matches(tokenizer, config.padded_vocab_size, checkpoint_dir)
    prepared = prepare_config["tokenizer"]
    if prepared["vocab_size"] != tokenizer.vocab_size:
        raise LitQAError(f"{data_dir} was prepared with another tokenizer ({prepared['vocab_size']} tokens, "
                         f"{checkpoint_dir} has {tokenizer.vocab_size}); run scripts/prepare_squad.py again")  # fmt: skip
    if prepared.get("sha256") not in (None, tokenizer.file_sha256()):  # same size, other token ids
        raise LitQAError(f"{data_dir} was prepared with another tokenizer (its vocabulary file differs from "
                         f"{checkpoint_dir}'s); run scripts/prepare_squad.py again")  # fmt: skip
    # Room for the longest sample, and for the sample answers generated at each validation.
    longest = max(len(s["input_ids"]) for s in train_data + val_data)
    model.max_seq_length = min(config.block_size, longest + eval_args.max_new_tokens)
    return tokenizer, train_data, val_data, model, config


def load_val_questions(data_dir: Path, eval_args: EvalArgs, prepare_config: dict[str, Any]) -> ValQuestions | None:
    """The validation questions answered at each validation for EM/F1 (``--eval.f1_questions`` of them, a fixed
    subset of the val articles that scripts/prepare_squad.py wrote to ``val-v2.0.json``), with the data's prompt
    settings; None when ``f1_questions`` is 0. (The evaluation file is never read during training.)"""
    if eval_args.f1_questions == 0:
        return None
    path = Path(data_dir) / VAL_SQUAD_FILE
    if not path.is_file():
        raise LitQAError(f"{path} does not exist (--eval.f1_questions needs it); prepare {data_dir} again with "
                         "scripts/prepare_squad.py --overwrite")  # fmt: skip
    questions = select_subset(questions=load_squad(path), limit=eval_args.f1_questions, seed=VAL_SUBSET_SEED)
    prompt_style, no_answer = prepare_config.get("prompt_style", "plain"), prepare_config.get("no_answer", NO_ANSWER)
    return ValQuestions(questions, prompt_style, no_answer, source=str(data_dir))


def add_na_head(fabric: L.Fabric, model: GPT, enabled: bool, config: NAHeadConfig, train_data: list[dict]) -> None:
    """Attach a trainable no-answer head (``--na_head true``, `lit_qa.models.na_head`) after the method marked what it
    trains; skipped with a note when the training data has only one kind of question (e.g. SQuAD 1.1)."""
    if not enabled:
        return
    unanswerable = sum(sample["unanswerable"] for sample in train_data)
    if unanswerable in (0, len(train_data)):
        fabric.print(f"note: no no-answer head: {unanswerable} of {len(train_data)} training samples are "
                     "unanswerable, so there is nothing to tell apart (--na_head false silences this)")  # fmt: skip
        return
    head = attach_na_head(model, config)
    start = time.perf_counter()
    standardized = standardize_na_head(model, train_data, config.standardize_samples)
    fabric.print(f"no-answer head on blocks {list(head.layers)} ({sum(p.numel() for p in head.parameters()):,} "
                 f"parameters, loss weight {head.config.loss_weight}, learning rate x{head.config.lr_scale}; "
                 f"features standardised on {standardized} training prompts in {time.perf_counter() - start:.1f} s); "
                 f"{unanswerable} of {len(train_data)} training samples are unanswerable")  # fmt: skip


def print_parameter_counts(fabric: L.Fabric, model: torch.nn.Module, precision: str) -> None:
    name = model.config.name
    fabric.print(f"{name}: {count_parameters(model, trainable_only=True):,} trainable of "
                 f"{count_parameters(model):,} parameters; precision {precision}")  # fmt: skip


def make_optimizer(fabric: L.Fabric, model: torch.nn.Module, train_args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused kernels on GPU), set up by Fabric. A no-answer head's parameters
    get the learning rate times its ``lr_scale`` (a freshly initialised classifier on a pretrained model)."""
    module = getattr(model, "module", model)
    head = getattr(module, "na_head", None)
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    trainable = [p for p in module.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": trainable}]
    if head is not None and any(p.requires_grad for p in head.parameters()):
        groups.append({"params": [p for p in head.parameters() if p.requires_grad],
                       "lr": train_args.learning_rate * head.config.lr_scale})  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=train_args.learning_rate, weight_decay=train_args.weight_decay,
                                  betas=(train_args.beta1, train_args.beta2), fused=fabric.device.type == "cuda")  # fmt: skip
    return fabric.setup_optimizers(optimizer)
