# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Model configuration: one dataclass for every LLaMA-family model, and a small named registry.

Grouped-query attention, as drawn in litgpt's config (Apache 2.0):

    n_query_groups == n_head        1 < n_query_groups < n_head      n_query_groups == 1
    (multi-head)                    (grouped-query)                   (multi-query)
    v v v v                          v     v                          v
    k k k k                          k     k                          k
    | | | |                          |     |                          |
    q q q q                         q q   q q                       q q q q
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from lit_qa.errors import LitQAError
from lit_qa.files import read_json_object

CONFIG_FILE = "lit_config.json"
# 1M tokens: 8x Llama 3.1's 131,072, and a RoPE cache of at most a few GiB; beyond is a typo, not a model.
MAX_BLOCK_SIZE = 1 << 20
# What a lit_config.json must state (`Config.save` writes every field); the rest have a meaning when absent.
REQUIRED_FILE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "intermediate_size", "rope_base",
                        "norm_eps", "tie_embeddings")


@dataclass
class Config:
    """Hyperparameters of a LLaMA-family decoder.

    Attributes:
        name: Registry name, recorded so a checkpoint says what it is.
        block_size: Longest sequence the model is used with (sizes the RoPE and KV caches).
        vocab_size: Number of tokens the tokenizer knows.
        padded_vocab_size: Rows of the embedding and output head (>= vocab_size). Defaults to vocab_size.
        n_layer: Number of transformer blocks.
        n_head: Number of query heads.
        n_embd: Hidden size.
        n_query_groups: Number of key/value heads (GQA). Defaults to n_head (plain multi-head attention).
        intermediate_size: Hidden size of the SwiGLU MLP.
        rope_base: RoPE theta.
        rope_scaling: Llama-3.1 style frequency scaling: dict with ``factor``, ``low_freq_factor``,
            ``high_freq_factor`` and ``original_max_seq_len``; None for plain RoPE.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: Whether the output head shares the token embedding matrix.
    """

    name: str = ""
    block_size: int = 4096
    vocab_size: int = 32000
    padded_vocab_size: int | None = None
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: int | None = None
    intermediate_size: int = 11008
    rope_base: float = 10000.0
    rope_scaling: dict[str, float] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        problems = self._type_and_range_problems()
        if problems:  # the checks below divide by these sizes
            raise LitQAError(f"invalid model config {self.name!r}: " + "; ".join(problems))
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_query_groups:
            problems.append(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.padded_vocab_size < self.vocab_size:
            problems.append(f"padded_vocab_size={self.padded_vocab_size} < vocab_size={self.vocab_size}")
        if (self.n_embd // self.n_head) % 2:
            problems.append("head size must be even for rotary embeddings")
        if problems:
            raise LitQAError(f"invalid model config {self.name!r}: " + "; ".join(problems))

    def _type_and_range_problems(self) -> list[str]:
        """Each field's type and bounds: sizes are positive integers, ``block_size`` at most `MAX_BLOCK_SIZE`
        (the RoPE cache alone is ``block_size x head_size x 8`` bytes), RoPE base and epsilon positive numbers."""
        problems = []
        for field in ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd",
                      "n_query_groups", "intermediate_size"):  # fmt: skip
            value = getattr(self, field)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                problems.append(f"{field} must be an integer, got {value!r}")
            elif value <= 0:
                problems.append(f"{field} must be positive, got {value}")
        for field in ("rope_base", "norm_eps"):
            value = getattr(self, field)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < float("inf"):
                problems.append(f"{field} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            problems.append(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            problems.append(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if not problems and self.block_size > MAX_BLOCK_SIZE:
            problems.append(f"block_size={self.block_size:,} is beyond {MAX_BLOCK_SIZE:,} tokens (its RoPE cache alone "
                            f"would take {self.block_size * (self.n_embd // self.n_head) * 8 / 2**30:,.1f} GiB)")  # fmt: skip
        return problems

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """Build a registered config, e.g. ``Config.from_name("Llama-2-7b")``; keyword arguments override fields."""
        if name not in configs:
            raise LitQAError(f"unknown model name {name!r}; known names: {', '.join(sorted(configs))}")
        return cls(**{**configs[name], **overrides})

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        """Read a config written by `save`, failing with the file name on bad content."""
        path = Path(path)
        values = read_json_object(path, "config file")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LitQAError(f"{path}: unknown config fields {unknown}")
        if missing := [name for name in REQUIRED_FILE_FIELDS if name not in values]:
            # No defaults here: a missing rope_base would silently be LLaMA's 10000 (SmolLM2's is 100000).
            raise LitQAError(f"{path}: missing config fields {missing} (a lit_config.json names every size of its model)")
        check_field_types(cls, values, path)
        try:
            return cls(**values)
        except LitQAError as e:
            raise LitQAError(f"{path}: {e}") from None
        except TypeError as e:
            raise LitQAError(f"{path}: {e}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> Config:
        """Read ``lit_config.json`` from a converted checkpoint folder."""
        return cls.from_file(Path(checkpoint_dir) / CONFIG_FILE)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


# What the models of a family share; each entry below adds its own sizes.
_LLAMA1 = dict(block_size=2048, vocab_size=32000, norm_eps=1e-6)
_LLAMA31 = dict(block_size=131072, vocab_size=128256, n_query_groups=8, rope_base=500000.0,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192))  # fmt: skip
_SMOLLM2 = dict(block_size=8192, vocab_size=49152, rope_base=100000.0, tie_embeddings=True)

# Only LLaMA-architecture models. Values are from each model's params.json / config.json.
configs: dict[str, dict[str, Any]] = {
    "LLaMA-7B": dict(_LLAMA1, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "LLaMA-13B": dict(_LLAMA1, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "LLaMA-30B": dict(_LLAMA1, n_layer=60, n_head=52, n_embd=6656, intermediate_size=17920),
    "LLaMA-65B": dict(_LLAMA1, n_layer=80, n_head=64, n_embd=8192, intermediate_size=22016),
    "Llama-2-7b": dict(block_size=4096, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008),
    "Llama-2-13b": dict(block_size=4096, n_layer=40, n_head=40, n_embd=5120, intermediate_size=13824),
    "Llama-2-70b": dict(
        block_size=4096, n_layer=80, n_head=64, n_query_groups=8, n_embd=8192, intermediate_size=28672
    ),
    "Llama-3.1-8B": dict(_LLAMA31, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336),
    "Llama-3.1-70B": dict(_LLAMA31, n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672),
    "SmolLM2-135M": dict(_SMOLLM2, n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536),
    "SmolLM2-360M": dict(_SMOLLM2, n_layer=32, n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560),
    "SmolLM2-1.7B": dict(_SMOLLM2, n_layer=24, n_head=32, n_embd=2048, intermediate_size=8192, rope_base=130000.0),
    # Tiny random configs for tests: multi-head, grouped-query and tied-embedding variants.
    "tiny-mha": dict(block_size=128, vocab_size=100, n_layer=2, n_head=4, n_embd=32, intermediate_size=64),
    "tiny-gqa": dict(
        block_size=128, vocab_size=100, n_layer=2, n_head=4, n_query_groups=2, n_embd=32, intermediate_size=64
    ),
    "tiny-tied": dict(
        block_size=128, vocab_size=100, n_layer=2, n_head=4, n_query_groups=1, n_embd=32, intermediate_size=64,
        tie_embeddings=True, rope_base=100000.0,
    ),  # fmt: skip
}


# Fine-tuned variants share their base model's architecture.
for _base in ("Llama-2-7b", "Llama-2-13b", "Llama-2-70b"):
    configs[f"{_base}-chat"] = dict(configs[_base])


for _base in ("Llama-3.1-8B", "Llama-3.1-70B", "SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B"):
    configs[f"{_base}-Instruct"] = dict(configs[_base])


for _name, _values in configs.items():
    _values["name"] = _name


MethodConfig = TypeVar("MethodConfig")


def read_method_config(cls: type[MethodConfig], path: str | Path, kind: str) -> MethodConfig:
    """Build the dataclass ``cls`` (e.g. `LoRAConfig`) from a JSON file, failing with the file name on bad content.

    Args:
        cls: The config dataclass; its own validation runs on construction.
        path: The JSON file.
        kind: The method's name for messages, e.g. "LoRA".

    Raises:
        LitQAError: If the file is missing, not a JSON object, has unknown fields or invalid values.
    """
    path = Path(path)
    values = read_json_object(path, f"{kind} config")
    if unknown := sorted(set(values) - {f.name for f in fields(cls)}):
        raise LitQAError(f"{path}: unknown {kind} config fields {unknown}")
    check_field_types(cls, values, path)
    try:
        return cls(**values)
    except (LitQAError, TypeError) as e:
        raise LitQAError(f"{path}: {e}") from None


# JSON values each annotation accepts: a float field takes 3 as well as 3.0; a bool is not an int here.
_JSON_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_field_types(cls: type, values: dict[str, Any], path: str | Path) -> None:
    """Compare each JSON value with its dataclass field's annotation (``int``, ``float``, ``bool``, ``str``, a
    ``list[...]``, ``dict[...]``, each optionally ``| None``), so that a wrong type is named by its key and not
    by the comparison it later breaks ("'<' not supported between 'str' and 'int'").

    Raises:
        LitQAError: Naming ``path``, the key, the expected type and the value found.
    """
    annotations = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        kinds = [kind.strip() for kind in annotations[key].split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = []
        for kind in kinds:
            base = kind.split("[")[0]
            allowed += {"list": [list], "tuple": [list], "dict": [dict]}.get(base, list(_JSON_TYPES.get(base, ())))
        if not allowed:  # an annotation this check does not know: the dataclass's own validation decides
            continue
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, tuple(allowed)):
            raise LitQAError(f"{path}: {key} must be {annotations[key]}, got {value!r}")
