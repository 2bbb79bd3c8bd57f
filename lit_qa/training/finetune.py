# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""One fine-tuning run, the same for every method: the flags every script in ``finetune/`` takes and the checks and
Fabric before any process starts (`start`), then everything from loading the base to ``out_dir/final`` (`finetune`).

A script adds only what is its own: its method's flags, what it makes trainable and what it saves. It reads

    @with_shared_flags                          # setup's command line: start's flags and the method's
    def setup(lora: LoRAConfig = LoRAConfig(), **flags) -> None:
        fabric, run = start(**flags)
        launch(fabric, main, run, lora)

    def main(fabric, run, lora_config) -> None:
        finetune(fabric, run, make_trainable, save, "LoRA adapter", lora=lora_config)

with ``make_trainable(model)`` and ``save(folder, model, head_files)`` defined in ``main``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L

from lit_qa.checkpoints.na_head import na_head_files
from lit_qa.models.model import GPT
from lit_qa.models.na_head import NAHeadConfig, na_head_state_dict
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.distributed import FSDPArgs, Strategy, full_state_dict
from lit_qa.training.launch import (
    add_na_head,
    check_inputs,
    load_data_and_model,
    load_val_questions,
    make_fabric,
    make_optimizer,
    print_parameter_counts,
    save_hyperparameters,
)
from lit_qa.training.loop import fit, setup_model
from lit_qa.training.selection import save_final


@dataclass
class Run:
    """What every process of a run is given: the shared flags, checked by `start` (``precision`` resolved, never
    "auto"), and the prepared data's ``prepare_config.json``."""

    data_dir: Path
    checkpoint_dir: Path
    out_dir: Path
    precision: str
    train: TrainArgs
    eval: EvalArgs
    na_head: bool
    na: NAHeadConfig
    resume: bool | str | Path
    seed: int
    prepare_config: dict[str, Any]


def start(
    data_dir: Path = Path("data/squad2"),
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    out_dir: Path = Path("out/finetune"),
    precision: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Strategy = "auto",
    fsdp: FSDPArgs = FSDPArgs(),
    train: TrainArgs = TrainArgs(),
    eval: EvalArgs = EvalArgs(),
    na_head: bool = True,
    na: NAHeadConfig = NAHeadConfig(),
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    seed: int = 42,
) -> tuple[L.Fabric, Run]:
    """The flags every finetune script takes, checked before any process starts (`check_inputs`), and the Fabric
    that will run it (`make_fabric`). Returns that Fabric and the `Run` for ``launch(fabric, main, run, ...)``.

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
        train: Training hyperparameters.
        eval: Validation hyperparameters.
        na_head: Train a no-answer head with the model (lit_qa/models/na_head.py): a linear layer on middle layers'
            hidden states at the prompt's last token, trained on "is this question unanswerable?"; evaluation
            abstains by its probability. Saved beside the weights (na_head.safetensors, na_head_config.json).
        na: The head's layers, size, loss weight, learning-rate scale and feature standardisation.
        resume: Continue from the latest checkpoint in out_dir (True / "auto") or from a given step folder.
        overwrite: Start over in an out_dir that already holds checkpoints (they are deleted).
        seed: Random seed for the added weights' initialisation, dropout and data order.
    """
    prepare_config = check_inputs(data_dir, checkpoint_dir, out_dir, resume, overwrite)
    fabric, precision = make_fabric(out_dir, precision, devices, num_nodes, strategy, fsdp, train)
    return fabric, Run(data_dir, checkpoint_dir, out_dir, precision, train, eval, na_head, na, resume, seed,
                       prepare_config)  # fmt: skip


def with_shared_flags(setup: Callable[..., None]) -> Callable[..., None]:
    """Give a script's ``setup(<flags of its own>, **flags)`` the flags of `start` as well, where jsonargparse reads
    a command line: the signature and the docstring's ``Args:``. ``**flags`` receives them, for ``start(**flags)``.

    ``--help`` lists `start`'s flags in their order with the script's own after ``--fsdp``. A flag of `start` that
    ``setup`` declares itself keeps its place with ``setup``'s default (e.g. its own ``out_dir``), and an ``Args:``
    entry in ``setup``'s docstring replaces `start`'s description of the same flag.
    """
    shared = inspect.signature(start, eval_str=True).parameters
    own = {name: p for name, p in inspect.signature(setup, eval_str=True).parameters.items() if p.kind != p.VAR_KEYWORD}
    parameters = [own.get(name, parameter) for name, parameter in shared.items()]
    at = list(shared).index("fsdp") + 1
    parameters[at:at] = [parameter for name, parameter in own.items() if name not in shared]
    setup.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    setup.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    description, own_docs = split_args_section(setup.__doc__ or "")
    shared_docs = split_args_section(start.__doc__ or "")[1]
    entries = [own_docs.get(p.name) or shared_docs[p.name] for p in parameters]
    setup.__doc__ = description + "\n\nArgs:\n" + "\n".join(entries)
    return setup


def split_args_section(docstring: str) -> tuple[str, dict[str, str]]:
    """A Google-style docstring as (its text before ``Args:``, each ``Args:`` entry with its continuation lines by
    parameter name); the docstring is dedented first (`inspect.cleandoc`), entries keep their own indentation."""
    description, _, section = inspect.cleandoc(docstring).partition("\nArgs:\n")
    entries: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        if not line.startswith("    "):  # the next section (Returns:, Raises: ...)
            break
        if line.startswith("     "):  # a description's next line
            entries[name] += "\n" + line
        else:
            name = line.strip().partition(":")[0]
            entries[name] = line
    return description.rstrip(), entries


def finetune(
    fabric: L.Fabric,
    run: Run,
    make_trainable: Callable[[GPT], None],
    save: Callable[[Path, GPT, dict[str, bytes]], None],
    what: str,
    **settings: Any,
) -> None:
    """Load the data and the base, let the method make it trainable, train with `fit` and save ``out_dir/final``;
    on every process (``launch(fabric, main, run, ...)``, with ``main`` calling this).

    Args:
        fabric: The run's Fabric, from `start`.
        run: The run's settings, from `start`.
        make_trainable: Adds the method's layers to the base model (on the CPU, before Fabric moves or shards it)
            and marks the parameters that train; the same seed on every rank makes them start identical.
        save: Writes one checkpoint folder: ``save(folder, model, head_files)`` with the unwrapped model and the
            no-answer head's files (`na_head_files`, empty without a head). Called on every rank (gathering FSDP
            shards is a collective); only rank 0 may write.
        what: What ``final/`` holds, for the closing message, e.g. "LoRA adapter".
        **settings: The method's own settings, written to ``out_dir/hyperparameters.yaml`` with the shared ones.
    """
    fabric.seed_everything(run.seed)
    tokenizer, train_data, val_data, model, _ = load_data_and_model(
        fabric, run.data_dir, run.checkpoint_dir, run.precision, run.eval, run.prepare_config
    )
    make_trainable(model)
    add_na_head(fabric, model, run.na_head, run.na, train_data)
    print_parameter_counts(fabric, model, run.precision)
    model = setup_model(fabric, model, run.train)
    optimizer = make_optimizer(fabric, model, run.train)
    if fabric.global_rank == 0:
        save_hyperparameters(run.out_dir, data_dir=run.data_dir, checkpoint_dir=run.checkpoint_dir,
                             precision=run.precision, **settings, train=run.train, eval=run.eval,
                             na_head=run.na_head, na=run.na, seed=run.seed)  # fmt: skip

    def save_fn(folder: Path) -> None:
        head = full_state_dict(na_head_state_dict(model.module))  # every rank: a collective under FSDP
        save(folder, model.module, na_head_files(model.module, head))

    val_questions = load_val_questions(run.data_dir, run.eval, run.prepare_config)
    progress = fit(fabric, model, optimizer, train_data, val_data, run.train, run.eval, run.out_dir, save_fn,
                   tokenizer, resume=run.resume, seed=run.seed, val_questions=val_questions)  # fmt: skip
    save_final(fabric, run.out_dir, save_fn, progress, val_questions, what)
