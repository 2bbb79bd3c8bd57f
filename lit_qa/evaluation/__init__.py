# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Evaluation: answer SQuAD 2.0 questions with a model and score them with the official metric.

- `answering`: prompts built as in training, batched greedy (or span-constrained) decoding, no-answer scores.
- `answers`: what a model answered (`Answers`) and the no-answer rules that turn its scores into p_na.
- `calibration`: choosing the rule and threshold (p_na at which to abstain), ROC AUC, the oracle threshold.
- `squad_metric`: the official SQuAD 2.0 EM/F1.
- `bootstrap`: paired bootstrap confidence intervals of a score difference over questions.
- `results`: the output files, and the partial file an interrupted evaluation resumes from.
- `run`: one evaluation end to end (`run_evaluation`), what every ``evaluate/*.py`` script calls.
"""
