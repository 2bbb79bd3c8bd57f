# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""What every evaluate script shares, around the one thing they differ in: how they load their weights.

    check_outputs(args, inputs)                       # refusals first: they should cost nothing
    run = read_inputs(args, trained_dir)              # questions, prompt, threshold, device: fail before loading
    model, config = <the script loads its weights>
    tokenizer = ready_to_answer(model, config, run, tokenizer_dir)   # no-answer head, tokenizer checks
    metrics = evaluate_and_report(model, tokenizer, args, run, paths)

`lit_qa.evaluation.reader.Reader` goes the same way without an evaluation file: `answering_run` (the part of
`read_inputs` that is not the questions), its folder's loading, `ready_to_answer`, then `score_questions` per call.

The flags they share, and their help text, are `EvaluationArgs`; each script adds its weights' flags in a
subclass, which `lit_qa.errors.run_cli` turns into the command line (the same flat ``--flag`` names).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lit_qa.checkpoints.folder import check_not_inside
from lit_qa.checkpoints.na_head import load_na_head
from lit_qa.data.squad import Question, load_squad, subset_selector
from lit_qa.evaluation.calibration import load_calibration_questions, resolve_na_threshold
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.results import check_evaluation_out_dir, format_summary
from lit_qa.evaluation.run import check_chat_template, prompt_settings, run_evaluation
from lit_qa.models.config import Config
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer, check_vocab_matches
from lit_qa.precision import autocast, inference_precision, resolve_device
from lit_qa.quantize import weights_size_bytes


@dataclass
class EvaluationArgs:
    """The flags every evaluate script takes.

    Attributes:
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
            (lit_qa/evaluation/answers.py). "auto": the threshold (and rule) saved with the fine-tuned weights
            (na_threshold.json in the checkpoint or adapter folder, written by training with --eval.f1_questions),
            else tuned for F1 on ``calibration_file``, else 0.5 (the no-answer string as likely per token as the
            best span) with a warning; a number in [0, 1]: that threshold; "off" (or null): plain greedy decoding,
            the model says the no-answer string or a span as it likes.
        calibration_file: Held-out SQuAD questions to tune ``--na_threshold auto`` on, e.g. the validation
            split that scripts/prepare_squad.py writes (val-v2.0.json). Never the evaluation file.
        precision: "auto" (bf16 on GPUs and on CPUs with native bf16, 32-true elsewhere), "32-true",
            "bf16-true", "16-true", "bf16-mixed", "16-mixed".
        device: "auto", "cpu" or "cuda".
        prompt_style: The prompt template; defaults to the one the fine-tuned weights were trained with (their
            prepare_config.json, written by every finetune script), else "plain". For a merged LoRA, pass the
            style it was trained with.
        no_answer: The no-answer reply named in the prompt and mapped to ""; defaults like ``prompt_style``, else
            "unanswerable".
        quantize: Quantize the model: "bnb.int8", "bnb.nf4", "bnb.fp4" (bitsandbytes, applied after loading),
            "int8" / "int4" (weight-only, for fast decoding: lit_qa/quantize/weight_only.py) or "gptq.int4" (loaded
            from ``--gptq_checkpoint``; evaluate/base.py and evaluate/adapter.py); None keeps full precision. A LoRA
            is merged in full precision first, then the merged model is quantized; an adapter stays unquantized.
        extractive: Span-constrained decoding: every answer is a substring of the context or the no-answer string
            (``--extractive false``: free greedy decoding).
        overwrite: Replace the results of a finished evaluation in ``out_dir``; without it such a folder is refused.
            (A folder holding only predictions.partial.jsonl, an interrupted run, is resumed either way.)
    """

    eval_file: Path = Path("data/squad2/dev-v2.0.json")
    out_dir: Path = Path("out/evaluate")
    limit: int | None = None
    seed: int = 1234
    subset: str = "questions"
    batch_size: int = 8
    max_new_tokens: int = 32
    na_threshold: float | Literal["auto", "off"] | None = "auto"
    calibration_file: Path | None = None
    precision: str = "auto"
    device: str = "auto"
    prompt_style: str | None = None
    no_answer: str | None = None
    quantize: str | None = None
    extractive: bool = True
    overwrite: bool = False


@dataclass
class EvaluationRun:
    """What the checks before loading decided (`read_inputs`).

    Attributes:
        trained_dir: The folder of the fine-tuned weights (checkpoint or adapter): its prompt settings, no-answer
            head and saved threshold are used.
        questions: The questions to answer.
        calibration: Held-out questions to tune the threshold on, or None.
        decoding: The decoding settings; ``na_threshold`` still the flag's request ("auto", a number, "off").
        device: The device to run on ("cpu", "cuda").
        precision: The inference precision (`lit_qa.precision.inference_precision`).
    """

    trained_dir: Path
    questions: list[Question]
    calibration: list[Question] | None
    decoding: DecodingSettings
    device: str
    precision: str


def check_outputs(args: EvaluationArgs, inputs: dict[str, Path | None]) -> None:
    """Refuse, before anything is read or loaded, an ``--out_dir`` holding a finished evaluation (without
    ``--overwrite``) or lying in one of ``inputs`` (flag -> path: its results may not land in what it reads), and
    a bad ``--subset``."""
    check_evaluation_out_dir(args.out_dir, args.overwrite)
    check_not_inside(args.out_dir, inputs, replaces_folder=False)
    subset_selector(args.subset)


def read_inputs(args: EvaluationArgs, trained_dir: Path, warn_if_unknown: bool = True) -> EvaluationRun:
    """Read what the evaluation needs besides the model, so that a bad file or flag fails before the model loads:
    the prompt settings ``trained_dir`` was trained with (`prompt_settings`; ``warn_if_unknown``: warn when it
    records none), the evaluation and calibration questions, the threshold's source, the device and precision."""
    questions = subset_selector(args.subset)(load_squad(args.eval_file), args.limit, args.seed)
    calibration = load_calibration_questions(args.calibration_file, args.eval_file, questions)
    return answering_run(args, trained_dir, questions, calibration, warn_if_unknown)


def answering_run(
    args: EvaluationArgs,
    trained_dir: Path,
    questions: list[Question],
    calibration: list[Question] | None = None,
    warn_if_unknown: bool = True,
) -> EvaluationRun:
    """The decoding settings, device and precision that ``args`` ask for, checked before loading: the prompt settings
    ``trained_dir`` was trained with (`prompt_settings`), the threshold's request (`resolve_na_threshold`, quietly).
    `read_inputs` adds the questions; `lit_qa.evaluation.reader.Reader` takes its questions later (none here)."""
    prompt_style, no_answer = prompt_settings(trained_dir, args.prompt_style, args.no_answer, warn_if_unknown)
    resolve_na_threshold(args.na_threshold, trained_dir, calibration is not None, args.extractive, verbose=False)
    decoding = DecodingSettings(prompt_style, no_answer, args.batch_size, args.max_new_tokens, args.na_threshold,
                                args.extractive)  # fmt: skip
    device = resolve_device(args.device)
    return EvaluationRun(trained_dir, questions, calibration, decoding, device, inference_precision(args.precision, device))


def ready_to_answer(model: GPT, config: Config, run: EvaluationRun, tokenizer_dir: Path) -> Tokenizer:
    """Attach the no-answer head saved in ``run.trained_dir`` (if training made one: the model then abstains by its
    probability) and load the tokenizer of ``tokenizer_dir``, checked against the model's vocabulary and, for the
    chat style, against the chat template the data was prepared with."""
    if load_na_head(model, run.trained_dir) is not None:
        print(f"no-answer head on blocks {list(model.na_head.layers)} from {run.trained_dir}", file=sys.stderr)
    tokenizer = Tokenizer(tokenizer_dir)
    check_vocab_matches(tokenizer, config.padded_vocab_size, tokenizer_dir)
    check_chat_template(run.trained_dir, run.decoding.prompt_style, tokenizer)
    return tokenizer


def report_loaded(what: str, run: EvaluationRun, quantize: str | None, seconds: float) -> None:
    """Print what was loaded, how and in how long (stderr)."""
    print(f"loaded {what} ({run.precision}, {run.device}, {quantize or 'not quantized'}) in {seconds:.1f} s",
          file=sys.stderr)  # fmt: skip


def evaluate_and_report(
    model: GPT, tokenizer: Tokenizer, args: EvaluationArgs, run: EvaluationRun, paths: dict[str, Path | None]
) -> dict[str, Any]:
    """Answer and score ``run.questions`` under autocast (`run_evaluation`), recording ``paths`` (e.g.
    ``checkpoint_dir``; None ones left out) and the run's settings in ``metrics.json``; print the summary.

    Returns:
        The metrics written.
    """
    info = {name: str(path) for name, path in paths.items() if path is not None}
    info.update(eval_file=str(args.eval_file), precision=run.precision, device=run.device, limit=args.limit,
                seed=args.seed, subset=args.subset, quantize=args.quantize, weights_bytes=weights_size_bytes(model))
    with autocast(run.precision, run.device):
        metrics = run_evaluation(model, tokenizer, run.questions, args.out_dir, run.decoding, info, run.calibration,
                                 threshold_dir=run.trained_dir)  # fmt: skip
    print(format_summary(metrics, args.out_dir))
    return metrics
