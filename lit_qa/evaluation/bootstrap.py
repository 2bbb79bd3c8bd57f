# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""How sure a difference in score is: the paired bootstrap over questions.

Two systems answered the same questions; each question's score difference is one draw of what the question set
could have been. Resampling the questions with replacement, and the two systems' scores of each question
together, gives the spread of the mean difference over question sets of the same size (`paired_bootstrap`).
Pairing matters: most of the spread between two runs is which questions are easy, and it cancels in the
per-question difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Rows of resampled indices drawn at once: about 32 MiB of int64 whatever the number of questions, so that
# 10,000 resamples of the full dev set (11,873 questions) never need a gigabyte at once.
_CHUNK_ELEMENTS = 1 << 22


def paired_bootstrap(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    samples: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """The mean of ``scores_a - scores_b`` with its paired bootstrap (percentile) confidence interval.

    Args:
        scores_a, scores_b: Per-question scores of two systems on the same questions, in the same order.
        samples: Bootstrap resamples of the questions (with replacement, as many as there are questions).
        seed: Seed of the resampling: the same scores, samples and seed always give the same interval.
        level: Coverage of the interval, e.g. 0.95 for the 2.5th to the 97.5th percentile of the resampled means.

    Returns:
        ``(mean, low, high)``: the mean difference over all questions and the interval's bounds, in the scores'
        units. A constant difference gives ``low == high`` at that value.

    Raises:
        ValueError: If the score lists differ in length or are empty, ``samples`` < 1, or ``level`` not in (0, 1).
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:  # checked first: numpy would broadcast a single score
        raise ValueError(f"need two equally long, non-empty lists of scores, got shapes {a.shape} and {b.shape}")
    diffs = a - b
    if samples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"samples must be >= 1 and level in (0, 1), got {samples} and {level}")
    n = diffs.size
    rng = np.random.default_rng(seed)  # private, so the draw neither depends on nor disturbs a global RNG
    chunk = max(1, _CHUNK_ELEMENTS // n)
    means = np.concatenate([
        diffs[rng.integers(0, n, size=(min(chunk, samples - start), n))].mean(axis=1)
        for start in range(0, samples, chunk)
    ])  # fmt: skip
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(low), float(high)
