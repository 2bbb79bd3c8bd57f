# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Evaluate a full model (a converted base model or a merged fine-tune) on SQuAD 2.0.

    python evaluate/base.py --eval_file data/squad2/dev-v2.0.json --limit 500
    python evaluate/base.py --checkpoint_dir out/merged --out_dir out/evaluate/merged

Writes ``predictions.json`` (official format: id -> answer, "" for no answer), ``metrics.json`` (official
metrics, the always-no-answer baseline on the same questions, the no-answer threshold and where it came from,
speed and settings) and, with a threshold, ``na_probs.json`` (the official script's ``--na-prob-file``) into
``--out_dir``. A fully fine-tuned folder with ``na_threshold.json`` (finetune/full.py --eval.f1_questions N) is
evaluated at that threshold by default.
``--limit`` evaluates a fixed stratified subset (same ``--seed``, same questions); with ``--subset paragraphs`` a
fixed subset of whole paragraphs, every question about each drawn context. Compare runs with
``scripts/compare_results.py``. An ``--out_dir`` holding a finished evaluation is refused unless ``--overwrite
true``; one holding only ``predictions.partial.jsonl`` (an interrupted run) is resumed.

Decoding is span-constrained by default (``lit_qa.generation.extractive``): every answer is a substring of its context
or the no-answer string. ``--extractive false`` decodes freely, as the model would on its own.

Quantized: ``--quantize bnb.nf4`` (bnb.fp4, bnb.int8) quantizes the block linears after loading;
``--quantize gptq.int4 --gptq_checkpoint FOLDER`` evaluates the model scripts/quantize_gptq.py wrote to FOLDER
(tokenizer and prompt settings still come from ``--checkpoint_dir``). For a LoRA: merge it
(scripts/merge_lora.py), quantize the merged folder with scripts/quantize_gptq.py, then evaluate that here.
``metrics.json`` records the mode and the weights' size in bytes (``quantize``, ``weights_bytes``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from lit_qa.checkpoints.inference import load_for_inference
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
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    eval_file: Path = Path("data/squad2/dev-v2.0.json"),
    out_dir: Path = Path("out/evaluate/base"),
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
    quantize: str | None = None,
    gptq_checkpoint: Path | None = None,
    extractive: bool = True,
    overwrite: bool = False,
) -> dict:
    """Answer SQuAD 2.0 questions with a full model and score them.

    Args:
        checkpoint_dir: A lit checkpoint folder (converted, or merged with scripts/merge_lora.py).
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
            (checkpoint_dir/na_threshold.json, written by training with --eval.f1_questions), else tuned for F1 on
            ``calibration_file``, else 0.5 (the no-answer string as likely per token as the best span) with a
            warning; a number in [0, 1]: that threshold; "off" (or null): plain greedy decoding, the model says the
            no-answer string or a span as it likes.
        calibration_file: Held-out SQuAD questions to tune ``--na_threshold auto`` on, e.g. the validation
            split that scripts/prepare_squad.py writes (val-v2.0.json). Never the evaluation file.
        precision: "auto" (bf16 on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "16-true", "bf16-mixed", "16-mixed".
        device: "auto", "cpu" or "cuda".
        prompt_style: The prompt template; defaults to the one recorded in the checkpoint's prepare_config.json
            (written by finetune/full.py), else "plain". For a merged LoRA, pass the style it was trained with.
        no_answer: The no-answer reply named in the prompt and mapped to ""; defaults like ``prompt_style``, else
            "unanswerable".
        quantize: Quantize the model: "bnb.int8", "bnb.nf4", "bnb.fp4" (bitsandbytes, applied after loading), "int8" /
            "int4" (weight-only, for fast decoding: lit_qa/quantize/weight_only.py) or "gptq.int4" (loaded from
            ``gptq_checkpoint``); None keeps full precision.
        gptq_checkpoint: A folder written by scripts/quantize_gptq.py; only with ``--quantize gptq.int4``.
        extractive: Span-constrained decoding: every answer is a substring of the context or the no-answer string
            (``--extractive false``: free greedy decoding).
        overwrite: Replace the results of a finished evaluation in ``out_dir``; without it such a folder is refused.
            (A folder holding only predictions.partial.jsonl, an interrupted run, is resumed either way.)
    """
    check_evaluation_out_dir(out_dir, overwrite)  # before anything is loaded: a refusal should cost nothing
    inputs = {"--checkpoint_dir": checkpoint_dir, "--gptq_checkpoint": gptq_checkpoint, "--eval_file": eval_file}
    check_not_inside(out_dir, inputs, replaces_folder=False)  # its results may not land in what it reads
    select = subset_selector(subset)  # a bad --subset too
    # A full fine-tune (finetune/full.py) records its prompt settings; a converted base model has none.
    prompt_style, no_answer = prompt_settings(checkpoint_dir, prompt_style, no_answer, warn_if_unknown=False)
    questions = select(load_squad(eval_file), limit, seed)  # a bad file fails before the model loads
    calibration = load_calibration_questions(calibration_file, eval_file, questions)
    # A bad --na_threshold or saved threshold file fails here, before the model loads.
    resolve_na_threshold(na_threshold, checkpoint_dir, calibration is not None, extractive, verbose=False)
    check_quantize_args(quantize, gptq_checkpoint)
    device = resolve_device(device)
    precision = inference_precision(precision, device)

    t0 = time.perf_counter()
    model, config = load_for_inference(checkpoint_dir, device, weights_dtype(precision), quantize, gptq_checkpoint)
    if load_na_head(model, checkpoint_dir) is not None:  # trained with --na_head true: abstain by its probability
        print(f"no-answer head on blocks {list(model.na_head.layers)} from {checkpoint_dir}", file=sys.stderr)
    tokenizer = Tokenizer(checkpoint_dir)
    check_vocab_matches(tokenizer, config.padded_vocab_size, checkpoint_dir)
    check_chat_template(checkpoint_dir, prompt_style, tokenizer)
    print(f"loaded {config.name or checkpoint_dir} ({precision}, {device}, {quantize or 'not quantized'}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip

    info = dict(checkpoint_dir=str(checkpoint_dir), eval_file=str(eval_file), precision=precision, device=device,
                limit=limit, seed=seed, subset=subset, quantize=quantize,
                weights_bytes=weights_size_bytes(model))  # fmt: skip
    if gptq_checkpoint is not None:
        info["gptq_checkpoint"] = str(gptq_checkpoint)
    with autocast(precision, device):
        metrics = run_evaluation(
            model, tokenizer, questions, out_dir, prompt_style, no_answer, batch_size, max_new_tokens, info,
            na_threshold=na_threshold, calibration_questions=calibration, extractive=extractive,
            threshold_dir=checkpoint_dir,
        )
    print(format_summary(metrics, out_dir))
    return metrics


if __name__ == "__main__":
    run_cli(main)
