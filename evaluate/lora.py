# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Evaluate a base model with a fine-tuned LoRA adapter on SQuAD 2.0.

    python evaluate/lora.py --lora_dir out/finetune/lora/final --eval_file data/squad2/dev-v2.0.json --limit 500

The adapter folder says which base model it belongs to (``base_checkpoint.json``) and how its training
prompts were built (``prepare_config.json``), so by default nothing has to be repeated here. The adapter is
merged into the weights before decoding: the same maths as running it unmerged, with no extra matmuls.
Outputs are those of ``evaluate/base.py``: ``predictions.json``, ``metrics.json`` and ``na_probs.json`` in
``--out_dir``. The no-answer threshold is, by default, the one training saved in the adapter folder
(``na_threshold.json``, with ``--eval.f1_questions``), else one tuned on ``--calibration_file``.

Quantized: ``--quantize bnb.nf4`` (bnb.fp4, bnb.int8) merges the adapter in full precision first and then
quantizes the merged model, exactly as a base model would be quantized (merging into already quantized weights
is not exact). An adapter trained with ``finetune/lora.py --quantize`` (QLoRA) records its mode in
``quantize.json``; evaluating it with another ``--quantize`` prints a warning. Even with the same mode the merged
model is quantize(W + BA), not the quantize(W) + BA it was trained as: close, not identical. For gptq.int4,
merge (scripts/merge_lora.py), quantize the merged folder (scripts/quantize_gptq.py) and use evaluate/base.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lit_qa.checkpoints.inference import check_lora_inference, load_lora_for_inference
from lit_qa.checkpoints.lora import read_lora_base_record
from lit_qa.errors import run_cli
from lit_qa.evaluation import launch
from lit_qa.precision import weights_dtype


@dataclass
class Args(launch.EvaluationArgs):
    """Answer SQuAD 2.0 questions with a base model plus LoRA adapter and score them.

    Attributes:
        lora_dir: The adapter folder written by finetune/lora.py (e.g. out/finetune/lora/final or a step-* folder).
        checkpoint_dir: The base checkpoint folder; None uses the path recorded in the adapter's base_checkpoint.json.
        allow_different_base: Evaluate even if the base weights are not those the adapter was trained on.
    """

    out_dir: Path = Path("out/evaluate/lora")
    lora_dir: Path = Path("out/finetune/lora/final")
    checkpoint_dir: Path | None = None
    allow_different_base: bool = False


def main(args: Args) -> dict:
    """Evaluate the base model plus ``args.lora_dir`` (see the module docstring); returns the metrics written."""
    launch.check_outputs(args, {"--lora_dir": args.lora_dir, "--checkpoint_dir": args.checkpoint_dir,
                                "--eval_file": args.eval_file})  # fmt: skip
    check_lora_inference(args.lora_dir, args.quantize)
    run = launch.read_inputs(args, args.lora_dir)
    base = args.checkpoint_dir or Path(read_lora_base_record(args.lora_dir)["path"])

    t0 = time.perf_counter()
    model, config, lora_config = load_lora_for_inference(args.lora_dir, base, run.device, weights_dtype(run.precision),
                                                         args.quantize, args.allow_different_base)  # fmt: skip
    tokenizer = launch.ready_to_answer(model, config, run, base)
    what = f"{config.name or base} + LoRA r={lora_config.r} from {args.lora_dir}"
    launch.report_loaded(what, run, args.quantize, time.perf_counter() - t0)
    return launch.evaluate_and_report(model, tokenizer, args, run, {"checkpoint_dir": base, "lora_dir": args.lora_dir})


if __name__ == "__main__":
    run_cli(main)
