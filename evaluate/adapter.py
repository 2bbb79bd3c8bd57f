# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Evaluate a base model with a fine-tuned LLaMA-Adapter (v1 or v2) on SQuAD 2.0.

    python evaluate/adapter.py --adapter_dir out/finetune/adapter/final --eval_file data/squad2/dev-v2.0.json

The adapter folder says which base model it belongs to (``base_checkpoint.json``), which adapter it is
(``adapter_config.json``) and how its training prompts were built (``prepare_config.json``), so by default
nothing has to be repeated here. Unlike LoRA, an adapter cannot be merged into the weights (its prompts are
attention inputs), so the model decodes with the adapter layers in place, in the chosen precision.

Quantized: ``--quantize bnb.nf4`` (bnb.fp4, bnb.int8) quantizes the base's linear layers after loading, and
``--quantize gptq.int4 --gptq_checkpoint FOLDER`` loads the base from the GPTQ folder scripts/quantize_gptq.py
made of it; either way the adapter (prompts, gates, v2's scales and biases) stays in the model's dtype and
computes on the quantized layers' outputs, which is exactly the model one would serve.
Outputs are those of ``evaluate/base.py``: ``predictions.json``, ``metrics.json`` and ``na_probs.json`` in
``--out_dir``; the no-answer threshold is chosen as in ``evaluate/lora.py`` (``--na_threshold auto``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from lit_qa.checkpoints.adapter import check_adapter_dir, load_adapter_checkpoint, read_adapter_base_record
from lit_qa.checkpoints.folder import check_not_inside
from lit_qa.checkpoints.na_head import load_na_head
from lit_qa.data.squad import load_squad, subset_selector
from lit_qa.errors import run_cli
from lit_qa.evaluation.calibration import load_calibration_questions, resolve_na_threshold
from lit_qa.evaluation.results import check_evaluation_out_dir, format_summary
from lit_qa.evaluation.run import check_chat_template, prompt_settings, run_evaluation
from lit_qa.models.tokenizer import Tokenizer, check_vocab_matches
from lit_qa.precision import autocast, inference_precision, resolve_device, weights_dtype
from lit_qa.quantize import check_quantize_args, weights_size_bytes


def main(
    adapter_dir: Path = Path("out/finetune/adapter/final"),
    checkpoint_dir: Path | None = None,
    eval_file: Path = Path("data/squad2/dev-v2.0.json"),
    out_dir: Path = Path("out/evaluate/adapter"),
    limit: int | None = None,
    seed: int = 1234,
    subset: str = "questions",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    na_threshold: float | Literal["auto", "off"] | None = "auto",
    calibration_file: Path | None = None,
    precision: str = "auto",
    device: str = "auto",
    prompt_style: str | None = None,
    no_answer: str | None = None,
    allow_different_base: bool = False,
    extractive: bool = True,
    quantize: str | None = None,
    gptq_checkpoint: Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Answer SQuAD 2.0 questions with a base model plus LLaMA-Adapter and score them.

    Args:
        adapter_dir: The adapter folder written by finetune/adapter.py or finetune/adapter_v2.py (``final`` or a
            ``step-*`` folder).
        checkpoint_dir: The base checkpoint folder; None uses the path recorded in the adapter's base_checkpoint.json.
        eval_file: A SQuAD 2.0 (or 1.1) file in the official format.
        out_dir: Where predictions.json and metrics.json go.
        limit: Evaluate a fixed random subset of this many questions (drawn as ``subset`` says); None evaluates all.
        seed: Seed of the subset.
        subset: What ``limit`` draws: "questions" (that many questions, keeping the share of unanswerable ones) or
            "paragraphs" (whole paragraphs, every question about each drawn context, the last one cut to make
            ``limit``; each paragraph is then prefilled once for all its questions, so a large subset is quicker).
        batch_size: Questions decoded together (longest prompts first).
        max_new_tokens: Longest answer in tokens.
        na_threshold: When to answer "no answer". Each question's best span (the no-answer string forbidden) and
            the no-answer string are scored by their mean log-probability (tokens + EOS); the model abstains when
            p_na = sigmoid(s_na - s_span) reaches the threshold; with a no-answer head saved beside the weights
            (na_head.safetensors) p_na is the head's probability, or both combined, whichever rule tuning picked
            (lit_qa/evaluation/answers.py). "auto": the threshold (and rule) saved with the weights
            (adapter_dir/na_threshold.json, written by training with --eval.f1_questions), else tuned for F1 on
            ``calibration_file``, else 0.5 with a warning; a number in [0, 1]: that threshold; "off" (or null): plain
            greedy decoding, the model says the no-answer string or a span as it likes.
        calibration_file: Held-out SQuAD questions to tune ``--na_threshold auto`` on, e.g. the validation
            split that scripts/prepare_squad.py writes (val-v2.0.json). Never the evaluation file.
        precision: "auto" (bf16 on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "16-true", "bf16-mixed", "16-mixed".
        device: "auto", "cpu" or "cuda".
        prompt_style: The prompt template; defaults to the one the adapter was trained with.
        no_answer: The no-answer reply; defaults to the one the adapter was trained with.
        allow_different_base: Evaluate even if the base weights are not those the adapter was trained on.
        extractive: Span-constrained decoding: every answer is a substring of the context or the no-answer string
            (``--extractive false``: free greedy decoding).
        quantize: Quantize the base: "bnb.int8", "bnb.nf4", "bnb.fp4" (bitsandbytes, after loading), "int8" / "int4"
            (weight-only, for fast decoding) or "gptq.int4" (the base loaded from ``gptq_checkpoint``); the adapter
            stays unquantized. None: full precision.
        gptq_checkpoint: A folder scripts/quantize_gptq.py wrote from the base; only with ``--quantize gptq.int4``.
        overwrite: Replace the results of a finished evaluation in ``out_dir``; without it such a folder is refused.
            (A folder holding only predictions.partial.jsonl, an interrupted run, is resumed either way.)
    """
    check_evaluation_out_dir(out_dir, overwrite)  # before anything is loaded: a refusal should cost nothing
    inputs = {"--adapter_dir": adapter_dir, "--checkpoint_dir": checkpoint_dir, "--eval_file": eval_file}
    check_not_inside(out_dir, inputs, replaces_folder=False)  # its results may not land in what it reads
    select = subset_selector(subset)  # a bad --subset too
    check_adapter_dir(adapter_dir)
    check_quantize_args(quantize, gptq_checkpoint)
    prompt_style, no_answer = prompt_settings(adapter_dir, prompt_style, no_answer)
    questions = select(load_squad(eval_file), limit, seed)  # a bad file fails before the model loads
    calibration = load_calibration_questions(calibration_file, eval_file, questions)
    # A bad --na_threshold or saved threshold file fails here, before the model loads.
    resolve_na_threshold(na_threshold, adapter_dir, calibration is not None, extractive, verbose=False)
    base = Path(read_adapter_base_record(adapter_dir)["path"]) if checkpoint_dir is None else checkpoint_dir
    device = resolve_device(device)
    precision = inference_precision(precision, device)

    t0 = time.perf_counter()
    model, config, adapter_config = load_adapter_checkpoint(
        adapter_dir, base, device, weights_dtype(precision), allow_different_base, quantize, gptq_checkpoint
    )
    if load_na_head(model, adapter_dir) is not None:  # trained with --na_head true: abstain by its probability
        print(f"no-answer head on blocks {list(model.na_head.layers)} from {adapter_dir}", file=sys.stderr)
    tokenizer = Tokenizer(base)
    check_vocab_matches(tokenizer, config.padded_vocab_size, base)
    check_chat_template(adapter_dir, prompt_style, tokenizer)
    layers = f"layers {adapter_config.start_layer}..{config.n_layer - 1}"
    print(f"loaded {config.name or base} + LLaMA-Adapter v{adapter_config.version} ({layers}) from {adapter_dir} "
          f"({precision}, {device}, {quantize or 'not quantized'}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip

    info = dict(checkpoint_dir=str(base), adapter_dir=str(adapter_dir), eval_file=str(eval_file), precision=precision,
                device=device, limit=limit, seed=seed, subset=subset, quantize=quantize,
                weights_bytes=weights_size_bytes(model))  # fmt: skip
    if gptq_checkpoint is not None:
        info["gptq_checkpoint"] = str(gptq_checkpoint)
    with autocast(precision, device):
        metrics = run_evaluation(
            model, tokenizer, questions, out_dir, prompt_style, no_answer, batch_size, max_new_tokens, info,
            na_threshold=na_threshold, calibration_questions=calibration, extractive=extractive,
            threshold_dir=adapter_dir,
        )
    print(format_summary(metrics, out_dir))
    return metrics


if __name__ == "__main__":
    run_cli(main)
