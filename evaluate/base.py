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

import time
from dataclasses import dataclass
from pathlib import Path

from lit_qa.checkpoints.inference import load_for_inference
from lit_qa.errors import run_cli
from lit_qa.evaluation import launch
from lit_qa.precision import weights_dtype
from lit_qa.quantize import check_quantize_args


@dataclass
class Args(launch.EvaluationArgs):
    """Answer SQuAD 2.0 questions with a full model and score them.

    Attributes:
        checkpoint_dir: A lit checkpoint folder (converted, or merged with scripts/merge_lora.py).
        gptq_checkpoint: A folder written by scripts/quantize_gptq.py; only with ``--quantize gptq.int4``.
    """

    out_dir: Path = Path("out/evaluate/base")
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct")
    gptq_checkpoint: Path | None = None


def main(args: Args) -> dict:
    """Evaluate ``args.checkpoint_dir`` (see the module docstring); returns the metrics written."""
    inputs = {"--checkpoint_dir": args.checkpoint_dir, "--gptq_checkpoint": args.gptq_checkpoint}
    launch.check_outputs(args, {**inputs, "--eval_file": args.eval_file})
    # A full fine-tune (finetune/full.py) records its prompt settings; a converted base model has none.
    run = launch.read_inputs(args, args.checkpoint_dir, warn_if_unknown=False)
    check_quantize_args(args.quantize, args.gptq_checkpoint)

    t0 = time.perf_counter()
    model, config = load_for_inference(args.checkpoint_dir, run.device, weights_dtype(run.precision), args.quantize,
                                       args.gptq_checkpoint)  # fmt: skip
    tokenizer = launch.ready_to_answer(model, config, run, args.checkpoint_dir)
    launch.report_loaded(config.name or str(args.checkpoint_dir), run, args.quantize, time.perf_counter() - t0)
    paths = {"checkpoint_dir": args.checkpoint_dir, "gptq_checkpoint": args.gptq_checkpoint}
    return launch.evaluate_and_report(model, tokenizer, args, run, paths)


if __name__ == "__main__":
    run_cli(main)
