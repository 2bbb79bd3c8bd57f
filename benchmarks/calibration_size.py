# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""How many validation articles the no-answer rule and threshold need: tune on k articles, score on evaluation.

    python -m benchmarks.calibration_size --lora_dir out/finetune/lora-smollm2/final \\
        --calibration_file data/squad2-demo/val-v2.0.json --eval_file ../shared/data/squad2/demo-eval-v2.0.json

The fine-tuned reader answers every calibration question and a fixed subset of evaluation paragraphs once, as the
evaluators do (extractive spans, every no-answer rule's score kept). Then, for k = 1 .. n calibration articles,
``draws`` random sets of k articles each: the rule and threshold are tuned on their questions (`best_na_rule`, what
``--na_threshold auto --calibration_file`` does) and applied to the evaluation answers. Per k it reports the
questions tuned on, how often each rule won, the threshold's mean and spread, and the evaluation F1 this gives (mean,
spread, worst); the evaluation questions are never tuned on (the best F1 in hindsight is printed for reference).
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.checkpoints.lora import load_lora_checkpoint, read_lora_base_record
from lit_qa.checkpoints.na_head import load_na_head
from lit_qa.data.squad import Question, load_squad, select_paragraphs
from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.answers import Answers
from lit_qa.evaluation.calibration import apply_na_threshold, best_na_rule
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.run import prompt_settings
from lit_qa.evaluation.squad_metric import evaluate_predictions
from lit_qa.models.lora import merge_lora_weights
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import autocast, inference_precision, weights_dtype


def main(
    lora_dir: Path,
    calibration_file: Path = Path("data/squad2-demo/val-v2.0.json"),
    eval_file: Path = Path("../shared/data/squad2/demo-eval-v2.0.json"),
    limit: int = 2000,
    draws: int = 200,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    precision: str = "auto",
    out: Path = Path("out/benchmarks/calibration_size.json"),
) -> list[dict[str, Any]]:
    """Tune the no-answer rule on growing sets of calibration articles and score each choice on evaluation.

    Args:
        lora_dir: A LoRA folder trained with the no-answer head (``final/`` or ``best/``).
        calibration_file: The held-out questions to tune on (the prepared data's ``val-v2.0.json``).
        eval_file: The evaluation file; a fixed subset of its paragraphs is answered (``limit``).
        limit: Evaluation questions, drawn as whole paragraphs (``evaluate/*.py --subset paragraphs``).
        draws: Random article sets per size k.
        batch_size: Questions decoded together.
        max_new_tokens: Longest answer in tokens.
        precision: "auto" (bf16 where native, else fp32), "32-true" or "bf16-true".
        out: Where the numbers go as JSON.
    """
    calibration = load_squad(calibration_file)
    questions = select_paragraphs(load_squad(eval_file), limit, seed=1234)
    titles = list(dict.fromkeys(q.title for q in calibration))
    if len(titles) < 2:
        raise LitQAError(f"{calibration_file} has {len(titles)} article; the measurement needs at least two")
    start = time.perf_counter()
    tuned_on, evaluated = answer(lora_dir, calibration + questions, batch_size, max_new_tokens, precision)
    print(f"answered {len(calibration)} calibration and {len(questions)} evaluation questions in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    rows = []
    rng = random.Random(0)
    for k in range(1, len(titles) + 1):
        choices = [rng.sample(titles, k) for _ in range(draws if k < len(titles) else 1)]
        results = []
        for chosen in choices:
            subset = [q for q in calibration if q.title in set(chosen)]
            rule, threshold, _ = best_na_rule(subset, tuned_on)
            predictions = apply_na_threshold(evaluated.with_source(rule, questions), threshold, questions)
            results.append((rule, threshold, evaluate_predictions(questions, predictions)["f1"], len(subset)))
        f1s = [f1 for _, _, f1, _ in results]
        thresholds = [threshold for _, threshold, _, _ in results]
        rules = Counter(rule for rule, _, _, _ in results)
        rows.append({"articles": k, "questions (mean)": round(statistics.mean(r[3] for r in results)),
                     "rules chosen": ", ".join(f"{rule} {count}" for rule, count in rules.most_common()),
                     "threshold mean": f"{statistics.mean(thresholds):.3f}",
                     "threshold sd": f"{statistics.pstdev(thresholds):.3f}",
                     "eval F1 mean": f"{statistics.mean(f1s):.2f}", "eval F1 sd": f"{statistics.pstdev(f1s):.2f}",
                     "eval F1 worst": f"{min(f1s):.2f}"})  # fmt: skip
        print(rows[-1], flush=True)
    hindsight = max(best_na_rule(questions, evaluated)[2], 0.0)
    print_table(rows)
    print(f"best rule and threshold in hindsight on the evaluation questions: F1 {hindsight:.2f}")
    write_results(out, {"machine": describe_machine(), "lora_dir": str(lora_dir), "eval_questions": len(questions),
                        "draws": draws, "rows": rows, "hindsight_f1": hindsight})  # fmt: skip
    return rows


def answer(lora_dir: Path, questions: list[Question], batch_size: int, max_new_tokens: int,
           precision: str) -> tuple[Answers, Answers]:  # fmt: skip
    """Every question answered once by the merged adapter and its head, extractively, every rule's score kept
    (the same `Answers` twice: tuning and scoring read different questions of it)."""
    base = Path(read_lora_base_record(lora_dir)["path"])
    precision = inference_precision(precision, "cpu")
    model, _, _ = load_lora_checkpoint(lora_dir, base, "cpu", weights_dtype(precision))
    merge_lora_weights(model)
    if load_na_head(model, lora_dir) is None:
        raise LitQAError(f"{lora_dir} has no no-answer head; train with --na_head true")
    prompt_style, no_answer = prompt_settings(lora_dir, None, None)
    with autocast(precision, "cpu"):
        decoding = DecodingSettings(prompt_style, no_answer, batch_size, max_new_tokens, 1.0, extractive=True)
        scored = score_questions(model.eval(), Tokenizer(base), questions, decoding)
    return scored, scored


if __name__ == "__main__":
    run_cli(main)
