# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Multi-device strategies: DDP, and FSDP2 (``fully_shard`` per transformer block) through Fabric.

Fabric's ``FSDPStrategy`` (FSDP1) refuses CPU; FSDP2 through ``ModelParallelStrategy`` runs on CPU with gloo
and on GPUs with NCCL, shards each parameter on its own (so frozen and trainable parameters may share a block
— LoRA and adapters need that), and keeps state-dict keys unchanged.

Under FSDP every parameter is a ``DTensor`` shard. Gathering one (`full_state_dict`) is a collective, so
every rank must call it, in the same order, even though only rank 0 writes files. Resume state is saved
sharded (`save_sharded_state`): each rank writes its own shard of the trained parameters and of the optimizer
state, frozen weights are skipped, and nothing is gathered on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lit_qa.errors import LitQAError

STRATEGIES = ("auto", "ddp", "fsdp")
Strategy = Literal["auto", "ddp", "fsdp"]
SHARDED_STATE_DIR = "sharded_state"


@dataclass
class FSDPArgs:
    """Settings of ``--strategy fsdp`` (activation checkpointing is ``--train.activation_checkpointing``).

    Attributes:
        cpu_offload: Keep sharded parameters, gradients and optimizer states in CPU memory (GPU only;
            slower, for models that do not fit otherwise).
        reshard_after_forward: Free the gathered parameters after each block's forward (saves memory,
            costs a second all-gather in the backward pass).
    """

    cpu_offload: bool = False
    reshard_after_forward: bool = True


def make_strategy(strategy: str, world_size: int, fsdp_args: FSDPArgs | None = None, precision: str = "32-true") -> Any:
    """The Fabric strategy for ``--strategy``: "auto" and "ddp" pass through, "fsdp" becomes FSDP2 sharding
    over all ``world_size`` (devices x nodes) processes. Under "bf16-mixed", FSDP keeps fp32 shards (the
    optimizer's master weights) but gathers and computes in bf16 and reduces gradients in fp32."""
    if strategy not in STRATEGIES:
        raise LitQAError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy != "fsdp":
        return strategy
    from lightning.fabric.strategies import ModelParallelStrategy

    fsdp_args = fsdp_args or FSDPArgs()

    def parallelize(model: nn.Module, device_mesh: Any) -> nn.Module:
        return shard_model(model, device_mesh["data_parallel"], fsdp_args, mixed_bf16=precision == "bf16-mixed")

    return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=world_size, tensor_parallel_size=1)


def shard_model(model: nn.Module, mesh: Any, fsdp_args: FSDPArgs, mixed_bf16: bool = False) -> nn.Module:
    """Apply FSDP2 to each transformer block, then to the root (embedding, final norm and head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if fsdp_args.cpu_offload else OffloadPolicy()
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    common = dict(mesh=mesh, offload_policy=offload, mp_policy=mixed or MixedPrecisionPolicy())
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=fsdp_args.reshard_after_forward, **common)
    # The root's parameters (embedding, head) are needed right after the last block: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **common)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True if ``model`` holds FSDP2 (``DTensor``) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Gather ``DTensor`` shards into whole CPU tensors; plain tensors are just moved to the CPU.

    A collective under FSDP: call it on every rank with the same keys. Ranks that will not write pass
    ``keep=False`` and get an empty dict, so a whole model is never held in CPU memory on every rank.
    """
    gathered = {}
    for key, value in state.items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value  # one tensor at a time
        if keep:
            gathered[key] = value.detach().to("cpu").contiguous()
    return gathered


def save_sharded_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, metadata: dict[str, Any], rank: int
) -> None:
    """Write the trained parameters' and the optimizer's shards with ``torch.distributed.checkpoint``, one file
    per rank, plus ``metadata`` (rank 0's, e.g. progress counters). Frozen parameters are skipped: they are
    already on disk in the base checkpoint. Call on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path / SHARDED_STATE_DIR)
    if rank == 0:
        torch.save(metadata, path / SHARDED_STATE_DIR / "metadata.pt")


def load_sharded_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load what `save_sharded_state` wrote into ``model`` and ``optimizer``; returns the metadata.

    The number of ranks may differ from the run that saved it: ``torch.distributed.checkpoint`` reshards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from lit_qa.checkpoints.trusted import (
        TrustedFileSystemReader,
        TrustedLoadPlanner,
        first_line,
        load_tensors,
        read_dcp_metadata,
    )

    folder = path / SHARDED_STATE_DIR
    if not (folder / "metadata.pt").is_file():
        raise LitQAError(f"{path}: not a sharded training checkpoint ({SHARDED_STATE_DIR}/metadata.pt is missing)")
    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    # Refused before dcp starts (its own reader would unpickle the file with plain pickle.load); the trusted
    # reader and planner keep every later read to the same allow-lists.
    read_dcp_metadata(folder / ".metadata")
    try:
        dcp.load(state, checkpoint_id=folder, storage_reader=TrustedFileSystemReader(folder),
                 planner=TrustedLoadPlanner())  # fmt: skip
    except (Exception, CheckpointException) as e:  # dcp wraps every failure (missing keys, shapes, files) in its
        # CheckpointException, which is a BaseException: `except Exception` alone lets it through as a traceback
        raise wrapped_lit_qa_error(e) or LitQAError(
            f"{folder}: cannot load the sharded training state ({first_line(e)})") from None
    # dcp.load above already refused a checkpoint lacking a trained key; frozen ones are absent by design.
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)  # fmt: skip
    metadata = load_tensors(folder / "metadata.pt", "training state")
    if not isinstance(metadata, dict):
        raise LitQAError(f"{folder / 'metadata.pt'} is not a lit-qa training state (it holds a {type(metadata).__name__})")
    return metadata


def wrapped_lit_qa_error(error: BaseException) -> LitQAError | None:
    """The `LitQAError` that ``torch.distributed.checkpoint`` wrapped into its ``CheckpointException`` (one per
    failed rank), if any: raised by the trusted reader or planner, it already names the file and the problem."""
    for failure in getattr(error, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback) per rank
        if isinstance(inner, LitQAError):
            return inner
    return error if isinstance(error, LitQAError) else None


def one_cpu_process(fabric: Any) -> bool:
    """Whether a run is a single process on the CPU: there packed rows go through the model one at a time
    (`lit_qa.training.loop.RunPlan.row_passes`); with several processes every rank must run as many passes."""
    return fabric.world_size == 1 and fabric.device.type == "cpu"
