# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Quantize and compare: one model in full precision, LLM.int8, nf4 and GPTQ int4 on the same SQuAD questions.

    python scripts/compare.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct --lora_dir out/finetune/lora/final \\
        --eval_file ../shared/data/squad2/demo-eval-v2.0.json --limit 200 --calibration data/squad2-demo

Prints and saves one table — EM, F1, HasAns F1, NoAns accuracy, weights size, peak memory, generation
tokens/s and the difference to full precision — as ``comparison.md``, ``comparison.json`` and
``comparison.png`` in ``--out_dir``. A LoRA adapter is merged into its base first (in full precision), and
that merged model is what every format quantizes: exact for LoRA, and what one would serve. GPTQ int4 is
calibrated on ``--calibration`` (the prepared training prompts, or a text file) unless ``--gptq_checkpoint``
gives a model already quantized from the same weights. Each format runs in its own process, so its peak
memory is its own.

Every format answers as ``evaluate/base.py`` does: span-constrained (extractive) decoding, the no-answer head when
the adapter has one (kept by the merge), and the calibrated no-answer rule. With ``--calibration_file`` the rule
and threshold are tuned for each format on those held-out questions (quantization shifts the no-answer scores);
without it every format uses the threshold training saved beside the adapter (``na_threshold.json``), else 0.5.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lit_qa.data.squad import load_squad
from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.calibration import resolve_na_threshold
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.quantize.comparison import add_differences, write_outputs

FORMATS = ("full", "bnb.int8", "bnb.nf4", "gptq.int4")
REPO = Path(__file__).resolve().parents[1]


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    lora_dir: Path | None = None,
    eval_file: Path = Path("data/squad2/dev-v2.0.json"),
    out_dir: Path = Path("out/compare"),
    formats: tuple[str, ...] = FORMATS,
    limit: int | None = 200,
    seed: int = 1234,
    calibration: Path | None = None,
    gptq_checkpoint: Path | None = None,
    group_size: int = 128,
    act_order: bool = False,
    n_samples: int = 128,
    na_threshold: float | Literal["auto", "off"] | None = "auto",
    calibration_file: Path | None = None,
    extractive: bool = True,
    precision: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    overwrite: bool = False,
) -> list[dict]:
    """Evaluate ``checkpoint_dir`` (with ``lora_dir`` merged in) in each of ``formats`` and tabulate the results.

    Args:
        checkpoint_dir: The base model, a lit checkpoint folder.
        lora_dir: A LoRA adapter to merge into the base before quantizing (optional).
        eval_file: Official-format SQuAD file to evaluate on.
        out_dir: Where the table, the per-format evaluations and the merged/quantized models go.
        formats: Any of "full", "bnb.int8", "bnb.nf4", "bnb.fp4", "gptq.int4".
        limit: A fixed, stratified subset of this many questions (the same for every format).
        seed: Seed of that subset.
        calibration: GPTQ calibration data: a folder from scripts/prepare_squad.py or a .txt file.
        gptq_checkpoint: An existing GPTQ folder of the same (merged) weights; skips quantizing.
        group_size: GPTQ group size.
        act_order: GPTQ in order of decreasing activation energy (slower to quantize, usually more accurate).
        n_samples: GPTQ calibration samples.
        na_threshold: The evaluator's no-answer threshold (see evaluate/base.py): "auto" (tuned for each format on
            ``calibration_file``, else the one saved with the adapter, else 0.5), a number in [0, 1], or "off"
            (plain greedy decoding).
        calibration_file: Held-out SQuAD questions (e.g. the prepared val-v2.0.json) to tune ``auto`` on.
        extractive: Span-constrained decoding, as the evaluators do by default (false: free greedy decoding).
        precision: Precision of the full model and of the quantized models' activations.
        batch_size: Questions decoded together.
        max_new_tokens: Longest answer.
        overwrite: Redo formats whose results already exist in ``out_dir``.
    """
    check_args(formats, gptq_checkpoint, calibration, calibration_file, na_threshold, extractive)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = merge_lora(checkpoint_dir, lora_dir, out_dir, overwrite)
    gptq_seconds = None
    if "gptq.int4" in formats and gptq_checkpoint is None:
        gptq_checkpoint, gptq_seconds = quantize_gptq(model_dir, out_dir, calibration, group_size, act_order,
                                                      n_samples, overwrite)  # fmt: skip
    rows = []
    for fmt in formats:
        result_file = out_dir / fmt / "compare_result.json"
        if overwrite or not result_file.is_file():
            job = dict(format=fmt, model_dir=str(model_dir), prompt_dir=str(lora_dir or checkpoint_dir),
                       eval_file=str(eval_file), out_dir=str(out_dir / fmt), limit=limit, seed=seed,
                       gptq_checkpoint=str(gptq_checkpoint), na_threshold=na_threshold,
                       calibration_file=str(calibration_file) if calibration_file else None, precision=precision,
                       batch_size=batch_size, max_new_tokens=max_new_tokens, extractive=extractive)  # fmt: skip
            run(["scripts/compare.py", "--worker", json.dumps(job)])
        rows.append(json.loads(result_file.read_text()))
    table = add_differences(rows)
    write_outputs(out_dir, table, {"gptq_quantization_seconds": gptq_seconds, "eval_file": str(eval_file),
                                   "limit": limit, "lora_dir": str(lora_dir) if lora_dir else None})  # fmt: skip
    return table


def check_args(
    formats: tuple[str, ...],
    gptq_checkpoint: Path | None,
    calibration: Path | None,
    calibration_file: Path | None,
    na_threshold: float | str | None,
    extractive: bool,
) -> None:
    """Refuse bad flags before anything is merged, quantized or evaluated."""
    from lit_qa.quantize.modes import QUANTIZE_CHOICES

    unknown = [f for f in formats if f != "full" and f not in QUANTIZE_CHOICES]
    if unknown:
        raise LitQAError(f"--formats: unknown {unknown}; choose from full, {', '.join(QUANTIZE_CHOICES)}")
    if "gptq.int4" in formats and gptq_checkpoint is None and calibration is None:
        raise LitQAError("gptq.int4 needs --calibration (prepared data folder or .txt) or --gptq_checkpoint")
    if calibration_file is not None:
        load_squad(calibration_file)  # a bad file fails before anything is merged or quantized
    resolve_na_threshold(na_threshold, None, calibration_file is not None, extractive, verbose=False)


def merge_lora(checkpoint_dir: Path, lora_dir: Path | None, out_dir: Path, overwrite: bool) -> Path:
    """The model every format starts from: ``checkpoint_dir``, or with ``lora_dir`` merged into it
    (``out_dir/merged``, made by ``scripts/merge_lora.py`` unless already there)."""
    if lora_dir is None:
        return checkpoint_dir
    model_dir = out_dir / "merged"
    if overwrite or not model_dir.is_dir():
        run(["scripts/merge_lora.py", "--lora_dir", lora_dir, "--out_dir", model_dir,
             "--base_checkpoint_dir", checkpoint_dir, "--overwrite", "true"])  # fmt: skip
    return model_dir


def quantize_gptq(
    model_dir: Path, out_dir: Path, calibration: Path, group_size: int, act_order: bool, n_samples: int, overwrite: bool
) -> tuple[Path, float | None]:
    """``out_dir/gptq-int4``, quantized from ``model_dir`` by ``scripts/quantize_gptq.py`` unless already there, and
    the seconds that took (None when it was there)."""
    gptq_checkpoint = out_dir / "gptq-int4"
    if not overwrite and gptq_checkpoint.is_dir():
        return gptq_checkpoint, None
    start = time.perf_counter()
    run(["scripts/quantize_gptq.py", "--checkpoint_dir", model_dir, "--out_dir", gptq_checkpoint,
         "--calibration", calibration, "--group_size", group_size, "--act_order", act_order,
         "--n_samples", n_samples, "--overwrite", "true"])  # fmt: skip
    return gptq_checkpoint, time.perf_counter() - start


def run(args: list) -> None:
    """Run a repository script as a subprocess; its error line becomes ours."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise LitQAError(f"{args[0]} failed: {lines[-1]}")


def worker(job: dict) -> dict:
    """Load one format, evaluate it, measure decoding speed, weights size and peak memory; save and return."""
    from lit_qa.checkpoints.inference import load_for_inference
    from lit_qa.checkpoints.na_head import load_na_head
    from lit_qa.data.squad import select_subset
    from lit_qa.evaluation.run import prompt_settings, run_evaluation
    from lit_qa.generation.generate import generate
    from lit_qa.models.tokenizer import Tokenizer
    from lit_qa.precision import autocast, inference_precision, resolve_device, weights_dtype
    from lit_qa.quantize.modes import weights_size_bytes
    from lit_qa.training.loop import peak_memory_gb

    fmt = job["format"]
    device = resolve_device("auto")
    precision = inference_precision(job["precision"], device)
    dtype = weights_dtype(precision)
    quantize = None if fmt == "full" else fmt
    model_dir = Path(job["model_dir"])
    model, _ = load_for_inference(model_dir, device, dtype, quantize, Path(job["gptq_checkpoint"]))
    model.eval()
    load_na_head(model, model_dir)  # the merge keeps the adapter's head; GPTQ quantizes the blocks only
    tokenizer = Tokenizer(job["model_dir"])
    prompt_style, no_answer = prompt_settings(Path(job["prompt_dir"]), None, None, warn_if_unknown=False)
    questions = select_subset(load_squad(job["eval_file"]), job["limit"], job["seed"])
    calibration = load_squad(job["calibration_file"]) if job["calibration_file"] else None
    # Tuning per format when calibration questions are given: the saved threshold suits full precision only.
    threshold_dir = None if calibration else model_dir
    with autocast(precision, device):
        decoding = DecodingSettings(prompt_style, no_answer, job["batch_size"], job["max_new_tokens"],
                                    job["na_threshold"], job["extractive"])  # fmt: skip
        metrics = run_evaluation(model, tokenizer, questions, Path(job["out_dir"]), decoding,
                                 {"format": fmt, "precision": precision}, calibration, threshold_dir)  # fmt: skip
    tokens_per_sec = decode_speed(model, generate, device)
    peak = peak_memory_gb(torch.device(device))
    result = {"format": fmt, "precision": precision, "EM": metrics["exact"], "F1": metrics["f1"],
              "HasAns F1": metrics.get("HasAns_f1"), "NoAns accuracy": metrics.get("NoAns_exact"),
              "weights GB": weights_size_bytes(model) / 1e9, "peak memory GB": peak,
              "tokens/s": tokens_per_sec, "questions": metrics["total"],
              "span F1": metrics.get("span_HasAns_f1"),
              "best-threshold F1": metrics.get("best_f1"), "no-answer AUC": metrics.get("na_prob_auc"),
              "no-answer rule": metrics.get("na_source"), "threshold": metrics.get("na_threshold"),
              "eval seconds": metrics.get("seconds")}  # fmt: skip
    if fmt == "gptq.int4":
        settings = json.loads((Path(job["gptq_checkpoint"]) / "quantize_config.json").read_text())
        result["settings"] = f"g{settings['group_size']}" + (" act-order" if settings.get("desc_act") else "")
    (Path(job["out_dir"]) / "compare_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def decode_speed(model: torch.nn.Module, generate, device: str) -> float:
    """Greedy tokens/s at batch 1: 64 new tokens after a 128-token prompt (less on tiny test models), stop tokens
    ignored, best of two runs."""
    new_tokens = min(64, model.max_seq_length // 4)
    prompt = torch.arange(min(128, model.max_seq_length - new_tokens), device=device) % model.config.vocab_size
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        generate(model, [prompt], new_tokens)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        try:
            worker(json.loads(sys.argv[2]))
        except LitQAError as e:
            sys.exit(f"error: {e}")
    else:
        run_cli(main)
