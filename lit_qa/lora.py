# Copyright lit-qa authors. Licensed under the Apache License 2.0.
r"""Low-Rank Adaptation (LoRA) for `lit_qa.model.GPT`: inject, train, save, load and merge adapters.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W and learns a
low-rank update B @ A next to it. Only A and B are trained and saved, a few MB instead of GBs.
Diagram adapted from lit-llama's ``lit_llama/lora.py`` (Apache 2.0)::

                 ┌───────────────────┐
                 ┆         h         ┆      h = W x + (alpha / r) * B A dropout(x)
                 └───────────────────┘
                           ▲
                           |
                           +
                        /     \
    ┌─────────────────┐    ╭───────────────╮     Initialization:
    ┆                 ┆     \      B      /      B = 0 (so training starts from the base model)
    ┆   pretrained    ┆      \   out*r   /       A = Kaiming-uniform
    ┆    weights      ┆       ╰─────────╯
    ┆                 ┆       |    r    |        r = rank, e.g. 8
    ┆  W (out x in)   ┆       | ◀─────▶ |
    ┆     frozen      ┆       ╭─────────╮
    └─────────────────┘      /     A     \
              ▲             /    r*in     \
               \           ╰───────────────╯
                \                ▲
                 \              /
                  ┌───────────────────┐
                  ┆         x         ┆
                  └───────────────────┘

Typical use::

    model, config = load_model(checkpoint_dir)
    apply_lora(model, LoRAConfig(r=8, alpha=16, query=True, value=True))
    mark_only_lora_as_trainable(model)
    ...  # train
    save_lora_checkpoint(out_dir, model, lora_config, checkpoint_dir)

A LoRA folder holds ``lit_lora.safetensors`` (only the A/B tensors), ``lora_config.json`` (r, alpha, targets:
what is needed to rebuild the layers) and ``base_checkpoint.json`` (which base model the adapter belongs to).
``scripts/merge_lora.py`` folds the adapter into a full checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lit_qa.checkpoint import WEIGHTS_FILE, check_checkpoint_dir, load_model, load_state_dict, write_folder_atomically
from lit_qa.config import Config
from lit_qa.errors import LitQAError
from lit_qa.model import GPT

LORA_WEIGHTS_FILE = "lit_lora.safetensors"
LORA_CONFIG_FILE = "lora_config.json"
BASE_RECORD_FILE = "base_checkpoint.json"
LORA_FILES = (LORA_WEIGHTS_FILE, LORA_CONFIG_FILE, BASE_RECORD_FILE)

# LoRAConfig flag -> the linear layers it targets inside each block (names as in lit_qa.model).
BLOCK_TARGETS = {
    "query": ("attn.q_proj",),
    "key": ("attn.k_proj",),
    "value": ("attn.v_proj",),
    "projection": ("attn.o_proj",),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}


@dataclass
class LoRAConfig:
    """Rank, scaling and target layers of a LoRA adapter; saved next to the adapter weights.

    Attributes:
        r: Rank of the update B @ A. The paper finds r = 4..8 enough for attention weights (§7.2).
        alpha: The update is scaled by alpha / r, so changing r does not require retuning the learning rate (§4.1).
        dropout: Dropout on the input of the LoRA path only (the frozen path sees x unchanged).
        query: Adapt the attention query projection ``attn.q_proj``.
        key: Adapt the key projection ``attn.k_proj``.
        value: Adapt the value projection ``attn.v_proj``.
        projection: Adapt the attention output projection ``attn.o_proj``.
        mlp: Adapt the three MLP layers ``mlp.gate_proj``, ``mlp.up_proj`` and ``mlp.down_proj``.
        head: Adapt the output head ``lm_head``. With tied embeddings only the output path changes; the
            input embedding stays as it is.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.r < 1:
            problems.append(f"LoRA rank must be >= 1, got r={self.r}")
        if self.alpha <= 0:
            problems.append(f"LoRA alpha must be > 0, got alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"LoRA dropout must be in [0, 1), got dropout={self.dropout}")
        if not any(getattr(self, flag) for flag in (*BLOCK_TARGETS, "head")):
            problems.append("LoRA needs at least one target: set query, key, value, projection, mlp or head")
        if problems:
            raise LitQAError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def target_names(self, n_layer: int) -> list[str]:
        """Full names of the linear layers to adapt, e.g. ``transformer.h.0.attn.q_proj``."""
        names = [
            f"transformer.h.{i}.{layer}"
            for i in range(n_layer)
            for flag, layers in BLOCK_TARGETS.items()
            if getattr(self, flag)
            for layer in layers
        ]
        return names + ["lm_head"] if self.head else names

    @classmethod
    def from_file(cls, path: str | Path) -> LoRAConfig:
        """Read a ``lora_config.json``, failing with the file name on bad content."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise LitQAError(f"{path}: LoRA config not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LitQAError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise LitQAError(f"{path}: expected a JSON object")
        if unknown := sorted(set(values) - {f.name for f in fields(cls)}):
            raise LitQAError(f"{path}: unknown LoRA config fields {unknown}")
        try:
            return cls(**values)
        except (LitQAError, TypeError) as e:
            raise LitQAError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685, §4.1).

    ``h = W x + (alpha / r) * B A dropout(x)``, with A (r, in) Kaiming-uniform and B (out, r) zero, so a
    fresh adapter leaves the model's output unchanged. The base weight is registered on this module as
    ``weight`` (the very Parameter of the replaced `nn.Linear`), so the base checkpoint's key names and
    weight tying stay as they are: ``attn.q_proj.weight``, not litgpt's ``attn.q_proj.linear.weight``.

    Merging is explicit (`merge`), never a side effect of ``train()``/``eval()``: lit-llama merged on
    ``eval()`` and unmerged on ``train()``, and W + BA - BA drifted away from W over many evaluations.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        """Wrap ``base``'s weight (and bias); the LoRA tensors are created on its device and in its dtype.

        Args:
            base: The linear layer to adapt. Its parameters are shared, not copied.
            r: Rank of the update.
            alpha: Scale numerator: the update is multiplied by alpha / r.
            dropout: Dropout probability on the LoRA path's input.
        """
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.r, self.scaling = r, alpha / r
        w = base.weight
        # On the meta device these are shape-only placeholders, initialised after `to_empty`.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise A and B only; the frozen weight always comes from the base checkpoint.

        Named like `nn.Linear.reset_parameters` so that FSDP's meta-device materialisation calls it.
        """
        # nn.Linear's own init for A (as the reference implementation, microsoft/LoRA, does); B = 0 makes
        # the initial update zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # (..., in) @ (in, r) @ (r, out): never materialises the (out, in) product B @ A.
        return out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B @ A, shape (out, in), computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into ``weight`` in place, once; later calls do nothing.

        The sum is formed in float32 and rounded once to the weight's dtype. With a tied head, untie
        first (`merge_lora_weights` does) or the input embedding changes too.
        """
        if self.merged:
            return
        self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, merged={self.merged}"


def apply_lora(model: GPT, lora_config: LoRAConfig) -> GPT:
    """Replace the targeted `nn.Linear` layers of ``model`` by `LoRALinear` in place.

    The new layers share the old weight Parameters, so loaded weights, tying and the state-dict names
    stay. On the meta device the LoRA tensors are created on meta as well; after ``model.to_empty(...)``
    call `reset_lora_parameters` (FSDP materialisation calls `LoRALinear.reset_parameters` itself).

    Args:
        model: The model to adapt.
        lora_config: Rank, scaling and targets.

    Returns:
        ``model``, for chaining.

    Raises:
        LitQAError: If a target already is a `LoRALinear` (LoRA applied twice).
    """
    for name in lora_config.target_names(model.config.n_layer):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        if isinstance(layer, LoRALinear):
            raise LitQAError(f"{name} already has LoRA; apply_lora was called twice")
        lora_layer = LoRALinear(layer, lora_config.r, lora_config.alpha, lora_config.dropout)
        # New modules start in training mode; an eval-mode model must not start applying LoRA dropout.
        setattr(parent, child_name, lora_layer.train(layer.training))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def reset_lora_parameters(model: nn.Module) -> None:
    """Initialise every LoRA A/B afresh, e.g. after ``model.to_empty(device=...)`` on a meta-built model."""
    for layer in lora_layers(model):
        layer.reset_parameters()


def lora_filter(key: str, value: Any = None) -> bool:
    """Whether a state-dict entry belongs to a LoRA adapter (``...lora_A`` or ``...lora_B``)."""
    return key.rpartition(".")[2] in ("lora_A", "lora_B")


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA A/B tensors (``requires_grad``), including a tied embedding."""
    for name, param in model.named_parameters():
        param.requires_grad = lora_filter(name)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors of ``model`` by state-dict name; what an adapter checkpoint holds."""
    return {key: value for key, value in model.state_dict().items() if lora_filter(key, value)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (a tied embedding counted once), or of its trainable ones only."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def merge_lora_weights(model: GPT) -> bool:
    """Merge every `LoRALinear` of ``model`` into its weight; calling it again does nothing.

    A LoRA on a tied head would also change the input embedding when merged in place, so the head first
    gets a weight of its own and ``model.config`` is replaced by a copy with ``tie_embeddings=False``.
    A config object the caller holds is not changed: save ``model.config`` (or set the flag yourself).

    Returns:
        Whether the head was untied.
    """
    untied = False
    head = model.lm_head
    if isinstance(head, LoRALinear) and not head.merged and head.weight is model.transformer.wte.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config = replace(model.config, tie_embeddings=False)
        untied = True
    for layer in lora_layers(model):
        layer.merge()
    return untied


def weights_fingerprint(checkpoint_dir: str | Path, sample_bytes: int = 4096) -> str:
    """A cheap identity of a checkpoint's weights file, to tell which base model an adapter belongs to.

    Hashes the safetensors header (names, dtypes, shapes), the file size, and the first and last
    ``sample_bytes`` of every tensor. The header alone is not enough: two models of the same architecture
    have identical headers. A 7B model costs ~2 MB of reads instead of hashing 13 GB. A base that differs
    only in the middle of some tensors would not be told apart; that is an accepted blind spot.

    Raises:
        LitQAError: If the file is missing or not a safetensors file.
    """
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length_bytes = f.read(8)
            header_length = int.from_bytes(length_bytes, "little")
            if len(length_bytes) < 8 or header_length > size - 8:
                raise ValueError("bad header length")
            header_bytes = f.read(header_length)
            digest.update(length_bytes + header_bytes + str(size).encode())
            header = json.loads(header_bytes)
            for name in sorted(k for k in header if k != "__metadata__"):
                begin, end = header[name]["data_offsets"]
                for start in (begin, max(begin, end - sample_bytes)):
                    f.seek(8 + header_length + start)
                    digest.update(f.read(min(sample_bytes, end - start)))
    except OSError as e:
        raise LitQAError(f"cannot read {path}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise LitQAError(f"{path} is not a readable safetensors file ({e})") from None
    return f"sha256:{digest.hexdigest()}"


def save_lora_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    lora_config: LoRAConfig,
    base_checkpoint_dir: str | Path,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an adapter folder: LoRA tensors, `LoRAConfig` and the base model's identity, all or nothing.

    Call it on one process only (rank 0). Under FSDP the LoRA tensors are shards: gather them on every rank
    first (``lit_qa.distributed.full_state_dict(lora_state_dict(model))``) and pass them as ``tensors``.

    Args:
        out_dir: Folder to create.
        model: A model with LoRA applied.
        lora_config: The config the LoRA was applied with, saved as ``lora_config.json``.
        base_checkpoint_dir: The base checkpoint folder; its path (as given), ``lit_config`` and a weights
            fingerprint (`weights_fingerprint`) go to ``base_checkpoint.json``.
        extra: More files for the folder, ``{file name: content}``: a `Path` is copied, anything else
            written as JSON (e.g. ``{"hyperparameters.json": asdict(train_args)}``).
        overwrite: Replace a non-empty ``out_dir``.
        tensors: The LoRA tensors to write; None takes them from ``model``.

    Returns:
        ``out_dir`` as a `Path`.

    Raises:
        LitQAError: If ``model`` has no LoRA, the base folder is not a checkpoint, an ``extra`` name is
            invalid, or ``out_dir`` is not empty without ``overwrite``.
    """
    if tensors is None:
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in lora_state_dict(model).items()}
    if not tensors:
        raise LitQAError("the model has no LoRA layers to save; call apply_lora first")
    base = check_checkpoint_dir(base_checkpoint_dir)
    record = dict(
        path=str(base_checkpoint_dir),
        lit_config=asdict(Config.from_checkpoint(base)),
        fingerprint=weights_fingerprint(base),
    )
    extra = extra or {}
    for name in extra:
        if name in LORA_FILES or not name or Path(name).name != name:
            raise LitQAError(f"extra file name {name!r} is not a plain file name or is reserved")
    with write_folder_atomically(out_dir, overwrite) as tmp:
        save_file(tensors, tmp / LORA_WEIGHTS_FILE, metadata={"format": "pt"})
        lora_config.save(tmp / LORA_CONFIG_FILE)
        (tmp / BASE_RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for name, content in extra.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, default=str) + "\n")
    return Path(out_dir)


def check_lora_dir(lora_dir: str | Path) -> Path:
    """Make sure a folder holds an adapter written by `save_lora_checkpoint`.

    Raises:
        LitQAError: If the folder is missing or lacks one of its files; the message lists what it has.
    """
    path = Path(lora_dir)
    if not path.is_dir():
        raise LitQAError(f"LoRA folder {path} does not exist")
    if missing := [name for name in LORA_FILES if not (path / name).is_file()]:
        present = sorted(p.name for p in path.iterdir())
        raise LitQAError(
            f"{path} is not a LoRA checkpoint: missing {', '.join(missing)} (it has: {', '.join(present) or 'nothing'})"
        )
    return path


def read_base_record(lora_dir: str | Path) -> dict[str, Any]:
    """The contents of an adapter's ``base_checkpoint.json``: ``path``, ``lit_config`` and ``fingerprint``.

    Raises:
        LitQAError: If the file is missing or malformed.
    """
    path = check_lora_dir(lora_dir) / BASE_RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LitQAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not {"path", "lit_config", "fingerprint"} <= record.keys():
        raise LitQAError(f"{path}: expected an object with path, lit_config and fingerprint")
    return record


def load_lora_checkpoint(
    lora_dir: str | Path,
    base_checkpoint_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_different_base: bool = False,
) -> tuple[GPT, Config, LoRAConfig]:
    """Load a base checkpoint with an adapter on top (unmerged), after checking they belong together.

    Args:
        lora_dir: A folder written by `save_lora_checkpoint`.
        base_checkpoint_dir: The base checkpoint folder; None uses the path recorded in ``base_checkpoint.json``.
        device: Where the model should live.
        dtype: Cast the base weights (and the LoRA tensors with them); None keeps the base's dtype.
        allow_different_base: Load even if the base weights are not those the adapter was trained on
            (e.g. the same model converted again in another dtype). The architecture must still match.

    Returns:
        The model (in eval mode), its config and the `LoRAConfig`.

    Raises:
        LitQAError: If a file is missing or malformed, the base has another architecture or (unless
            ``allow_different_base``) other weights, or a LoRA tensor is missing, unexpected or misshapen.
    """
    lora_dir = check_lora_dir(lora_dir)
    lora_config = LoRAConfig.from_file(lora_dir / LORA_CONFIG_FILE)
    record = read_base_record(lora_dir)
    if base_checkpoint_dir is None and not Path(record["path"]).is_dir():
        raise LitQAError(
            f"base checkpoint {record['path']} recorded in {lora_dir / BASE_RECORD_FILE} does not exist; "
            "pass the base checkpoint folder explicitly"
        )
    base = check_checkpoint_dir(record["path"] if base_checkpoint_dir is None else base_checkpoint_dir)
    _check_same_base(lora_dir, base, record, allow_different_base)

    model, config = load_model(base, device=device, dtype=dtype)
    apply_lora(model, lora_config)
    weights_path = lora_dir / LORA_WEIGHTS_FILE
    tensors = load_state_dict(weights_path)
    expected = {key: value.shape for key, value in lora_state_dict(model).items()}
    problems = []
    if missing := sorted(expected.keys() - tensors.keys()):
        problems.append(f"missing LoRA tensors {_names(missing)}")
    if unexpected := sorted(tensors.keys() - expected.keys()):
        problems.append(f"unexpected tensors {_names(unexpected)}")
    for key in sorted(tensors.keys() & expected.keys()):
        if tensors[key].shape != expected[key]:
            shape, needed = tuple(tensors[key].shape), tuple(expected[key])
            problems.append(f"{key} has shape {shape} but {LORA_CONFIG_FILE} and the base need {needed}")
    if problems:
        raise LitQAError(f"{weights_path} does not match {LORA_CONFIG_FILE} and the base model: " + "; ".join(problems))
    # Copies into the LoRA parameters, casting to their device and dtype; the base keys are checked above.
    model.load_state_dict(tensors, strict=False)
    return model.eval(), config, lora_config


def _check_same_base(lora_dir: Path, base: Path, record: dict[str, Any], allow_different_base: bool) -> None:
    recorded, actual = record["lit_config"], asdict(Config.from_checkpoint(base))
    if not isinstance(recorded, dict):
        raise LitQAError(f"{lora_dir / BASE_RECORD_FILE}: lit_config must be an object")
    # The name is only a label; every other field changes the computation.
    differences = [
        f"{key} {recorded.get(key)!r} vs {actual.get(key)!r}"
        for key in sorted(recorded.keys() | actual.keys())
        if key != "name" and recorded.get(key) != actual.get(key)
    ]
    if differences:
        raise LitQAError(
            f"LoRA in {lora_dir} was trained on another architecture than {base}: {', '.join(differences)}"
        )
    fingerprint = weights_fingerprint(base)
    if fingerprint != record["fingerprint"] and not allow_different_base:
        raise LitQAError(
            f"LoRA in {lora_dir} was trained on a different base checkpoint ({record['path']}, "
            f"{str(record['fingerprint'])[:19]}...) than {base} ({fingerprint[:19]}...); "
            "pass allow_different_base=True (--allow_different_base) to load it anyway"
        )


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
