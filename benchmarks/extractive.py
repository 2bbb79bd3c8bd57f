# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Span-constrained ("extractive") vs free greedy decoding on a LoRA fine-tune of SmolLM2: speed and SQuAD scores.

    python -m benchmarks.extractive
    python -m benchmarks.extractive --lora_dir null          # the base model instead of a fine-tune

Both answer the same fixed subset of questions (`select_subset`) with `score_questions`, the evaluator the
evaluate scripts use, in the same run on the same model (the adapter merged into the weights), with the
scripts' defaults: ``--na_threshold 0.5`` and 32 new tokens at most. The only difference is ``extractive``.
After a warm-up on two questions, the two modes take turns on chunks of ``2 * batch_size`` questions (which
one goes first alternates), so a change in the load of a shared machine falls on both alike. The table shows
questions/s, the time relative to free decoding, the seconds spent inside the constraint, and EM/F1 of both.
Building the vocabulary trie (once per tokenizer) is timed apart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import load_lora_checkpoint
from lit_qa.data.squad import load_squad, question_ids_sha256, select_subset
from lit_qa.errors import run_cli
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.run import prompt_settings
from lit_qa.evaluation.squad_metric import evaluate_predictions
from lit_qa.generation.extractive import SpanConstraint, vocab_trie
from lit_qa.models.lora import merge_lora_weights
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import resolve_precision, weights_dtype


@contextlib.contextmanager
def time_constraint() -> Iterator[list[float]]:
    """Add up the seconds spent in `SpanConstraint.__call__` (the whole per-step cost of the constraint)."""
    spent = [0.0]
    original = SpanConstraint.__call__

    def timed(self, logits, last_tokens):
        start = time.perf_counter()
        try:
            return original(self, logits, last_tokens)
        finally:
            spent[0] += time.perf_counter() - start

    SpanConstraint.__call__ = timed
    try:
        yield spent
    finally:
        SpanConstraint.__call__ = original


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    lora_dir: Path | None = Path("out/exp2/final"),
    eval_file: Path = Path("../shared/data/squad2/demo-eval-v2.0.json"),
    limit: int | None = 100,
    seed: int = 1234,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    na_threshold: float | None = 0.5,
    precision: str = "auto",
    device: str = "cpu",
    out: Path = Path("out/benchmarks/extractive.json"),
) -> dict[str, Any]:
    """Print questions/s and SQuAD metrics of free and extractive decoding on the same questions; write them as JSON.

    Args:
        checkpoint_dir: The base checkpoint folder.
        lora_dir: A LoRA adapter folder (merged before decoding); None evaluates the base model.
        eval_file: A SQuAD 2.0 file in the official format.
        limit: Answer a fixed stratified subset of this many questions; None answers all.
        seed: Seed of the subset.
        batch_size: Questions decoded together.
        max_new_tokens: Longest answer in tokens.
        na_threshold: As in the evaluate scripts; None for plain greedy decoding.
        precision: "auto" (bf16 where the CPU or GPU has it natively), "32-true", "bf16-true".
        device: "cpu" or "cuda".
        out: Where to write the JSON results.
    """
    questions = select_subset(load_squad(eval_file), limit, seed)
    precision = resolve_precision(precision, device)
    dtype = weights_dtype(precision)
    if lora_dir is None:
        model, config = load_model(checkpoint_dir, device=device, dtype=dtype)
    else:
        model, config, _ = load_lora_checkpoint(lora_dir, checkpoint_dir, device, dtype)
        merge_lora_weights(model)
    model.eval()
    tokenizer = Tokenizer(checkpoint_dir)
    prompt_style, no_answer = prompt_settings(lora_dir or checkpoint_dir, None, None, warn_if_unknown=False)
    start = time.perf_counter()
    vocab_trie(tokenizer)
    trie_seconds = time.perf_counter() - start

    def run(qs: list, extractive: bool) -> dict[str, str]:
        decoding = DecodingSettings(prompt_style, no_answer, batch_size, max_new_tokens, na_threshold, extractive)
        return score_questions(model, tokenizer, qs, decoding, progress=False).final

    modes = {"free": False, "extractive": True}
    for extractive in modes.values():
        run(questions[:2], extractive)  # warm-up: first-call allocations and kernel selection
    results = {name: {"seconds": 0.0, "constraint_seconds": 0.0, "predictions": {}} for name in modes}
    # Both modes answer each chunk in turn, the first one alternating, so a change in the machine's load
    # falls on both alike.
    chunk = 2 * batch_size
    for i, start in enumerate(range(0, len(questions), chunk)):
        for name, extractive in sorted(modes.items(), reverse=i % 2 == 1):
            with time_constraint() as spent:
                start_time = time.perf_counter()
                results[name]["predictions"].update(run(questions[start : start + chunk], extractive))
                results[name]["seconds"] += time.perf_counter() - start_time
            results[name]["constraint_seconds"] += spent[0]

    free_seconds = results["free"]["seconds"]
    rows = []
    for name, result in results.items():
        metrics = evaluate_predictions(questions, result["predictions"])
        spans = sum(result["predictions"][q.id] in q.context for q in questions)  # "" (no answer) counts
        rows.append({
            "": name,
            "seconds": result["seconds"],
            "questions/s": len(questions) / result["seconds"],
            "time vs free": f"{result['seconds'] / free_seconds:.2f}x",
            "in constraint s": result["constraint_seconds"],
            "EM": metrics["exact"],
            "F1": metrics["f1"],
            "HasAns F1": metrics.get("HasAns_f1"),
            "NoAns accuracy": metrics.get("NoAns_exact"),
            "answers in context": f"{spans}/{len(questions)}",
        })  # fmt: skip
    free, spans = results["free"]["predictions"], results["extractive"]["predictions"]
    differ = [q.id for q in questions if free[q.id] != spans[q.id]]
    machine = describe_machine()
    print(f"{config.name} + {lora_dir or 'no adapter'}, {precision} on {device}, {len(questions)} questions from "
          f"{eval_file}, batch {batch_size}, {max_new_tokens} new tokens at most, na_threshold {na_threshold}, "
          f"vocabulary trie built in {trie_seconds:.2f} s, {machine}")  # fmt: skip
    print_table(rows)
    print(f"identical predictions: {len(questions) - len(differ)} of {len(questions)}")
    for qid in differ[:5]:
        print(f"  {qid}: free {free[qid]!r} vs extractive {spans[qid]!r}")
    payload = {"machine": machine, "config": config.name, "lora_dir": str(lora_dir), "precision": precision,
               "device": device, "eval_file": str(eval_file), "num_questions": len(questions),
               "question_ids_sha256": question_ids_sha256(questions), "batch_size": batch_size,
               "max_new_tokens": max_new_tokens, "na_threshold": na_threshold,
               "trie_seconds": trie_seconds, "rows": rows,
               "differ": {qid: [free[qid], spans[qid]] for qid in differ}}  # fmt: skip
    write_results(out, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
