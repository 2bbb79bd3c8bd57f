# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""`Progress`: where a run is, what `lit_qa.training.loop.fit` returns and every step checkpoint records.

A checkpoint holds it as a plain dict (`Progress.to_state`, the fields by name), so ``training_state.pt`` stays
loadable with ``torch.load(weights_only=True)`` and by runs of earlier versions; `Progress.from_state` reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Progress:
    """The counters of a training run: its position in the data order, and the validations so far.

    Attributes:
        step: Optimizer steps taken.
        epoch: The epoch the next step's micro-batches come from.
        step_in_epoch: Steps of ``epoch`` already taken (where a resumed run continues in its order).
        tokens: Input positions trained on over all ranks, padding included, up to the last logged step.
        val_loss: The last validation's loss; None before the first validation.
        val: The last validation's metrics (``loss``, and with ``--eval.f1_questions`` ``f1``, ``em``,
            ``na_threshold`` ...); None before the first validation.
        best: The best step so far (`lit_qa.training.selection.update_best`): its ``step``, the ``criterion``,
            ``metric`` and ``value`` it was chosen by, and its ``val`` metrics; also written as ``best/best.json``.
            None when no ``best/`` is kept or none was chosen yet.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0
    val_loss: float | None = None
    val: dict[str, Any] | None = None
    best: dict[str, Any] | None = None

    @property
    def best_step(self) -> int | None:
        return self.best["step"] if self.best else None

    def to_state(self) -> dict[str, Any]:
        """The fields by name, as a checkpoint records them."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        """Read back what `to_state` wrote; a field a checkpoint lacks keeps its default, unknown keys are ignored."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in state.items() if name in names})
