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

import time
from dataclasses import dataclass
from pathlib import Path

from lit_qa.checkpoints.adapter import check_adapter_dir, load_adapter_checkpoint, read_adapter_base_record
from lit_qa.errors import run_cli
from lit_qa.evaluation import launch
from lit_qa.precision import weights_dtype
from lit_qa.quantize import check_quantize_args


@dataclass
class Args(launch.EvaluationArgs):
    """Answer SQuAD 2.0 questions with a base model plus LLaMA-Adapter and score them.

    Attributes:
        adapter_dir: The adapter folder written by finetune/adapter.py or finetune/adapter_v2.py (``final`` or a
            ``step-*`` folder).
        checkpoint_dir: The base checkpoint folder; None uses the path recorded in the adapter's base_checkpoint.json.
        allow_different_base: Evaluate even if the base weights are not those the adapter was trained on.
        gptq_checkpoint: A folder scripts/quantize_gptq.py wrote from the base; only with ``--quantize gptq.int4``.
    """

    out_dir: Path = Path("out/evaluate/adapter")
    adapter_dir: Path = Path("out/finetune/adapter/final")
    checkpoint_dir: Path | None = None
    allow_different_base: bool = False
    gptq_checkpoint: Path | None = None


def main(args: Args) -> dict:
    """Evaluate the base model plus ``args.adapter_dir`` (see the module docstring); returns the metrics written."""
    launch.check_outputs(args, {"--adapter_dir": args.adapter_dir, "--checkpoint_dir": args.checkpoint_dir,
                                "--eval_file": args.eval_file})  # fmt: skip
    check_adapter_dir(args.adapter_dir)
    check_quantize_args(args.quantize, args.gptq_checkpoint)
    run = launch.read_inputs(args, args.adapter_dir)
    base = args.checkpoint_dir or Path(read_adapter_base_record(args.adapter_dir)["path"])

    t0 = time.perf_counter()
    model, config, adapter_config = load_adapter_checkpoint(args.adapter_dir, base, run.device,
                                                            weights_dtype(run.precision), args.allow_different_base,
                                                            args.quantize, args.gptq_checkpoint)  # fmt: skip
    tokenizer = launch.ready_to_answer(model, config, run, base)
    layers = f"layers {adapter_config.start_layer}..{config.n_layer - 1}"
    what = f"{config.name or base} + LLaMA-Adapter v{adapter_config.version} ({layers}) from {args.adapter_dir}"
    launch.report_loaded(what, run, args.quantize, time.perf_counter() - t0)
    paths = {"checkpoint_dir": base, "adapter_dir": args.adapter_dir, "gptq_checkpoint": args.gptq_checkpoint}
    return launch.evaluate_and_report(model, tokenizer, args, run, paths)


if __name__ == "__main__":
    run_cli(main)
