# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""SQuAD evaluation speed: lit-qa's batched evaluator vs a per-question Hugging Face `transformers` `generate` loop.

    python -m benchmarks.evaluate
    python -m benchmarks.evaluate --dtype bfloat16 --quantize int8 --peer_dtype float32   # the fast mode

Both answer the same fixed subset of questions (`select_subset`) in fp32 on the CPU by default, by plain greedy
decoding (no abstain-probability gating), from the same prompt token ids, with the same stop tokens and the same
decoding of the answer, so their predictions should be identical: the table shows the official metrics of both next to
the speed. The Hugging Face model is our checkpoint exported with `lit_qa.checkpoints.convert_hf.convert_lit_to_hf`,
so the weights are identical. Timings are one wall-clock run each after a warm-up on two questions; on a shared 2-core
machine they swing, so compare the ratio printed in one run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.checkpoints.convert_hf import convert_lit_to_hf
from lit_qa.checkpoints.folder import load_model
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.prompts import NO_ANSWER
from lit_qa.data.squad import Question, load_squad, question_ids_sha256, select_paragraphs, select_subset
from lit_qa.errors import run_cli
from lit_qa.evaluation.answering import prompt_for, score_questions, to_official
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.squad_metric import evaluate_predictions
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.quantize import quantize_model


def hf_answer_questions(hf_model: Any, tokenizer: Tokenizer, questions: list[Question], max_prompt_length: int,
                        prompt_style: str = "plain", no_answer: str = NO_ANSWER,
                        max_new_tokens: int = 32) -> dict[str, str]:  # fmt: skip
    """Answer each question alone with ``hf_model.generate``, exactly as `score_questions` builds and reads answers.

    Same prompt ids (`prompt_for`, windowed to ``max_prompt_length``), same stop tokens, answer cut at the
    first stop token, decoded with our tokenizer and mapped to ``""`` by `to_official`.
    """
    encoder = QuestionEncoder(tokenizer, max_prompt_length, prompt_style, no_answer)
    stop = torch.tensor(sorted(tokenizer.eos_ids), dtype=torch.long)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # one row, no padding: never used
    device = hf_model.device
    answers = {}
    for question in questions:
        ids = prompt_for(encoder, question)[0][None].to(device)
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stop.tolist(), pad_token_id=pad_id)  # fmt: skip
        new = out[0, ids.size(1) :].cpu()
        hits = torch.isin(new, stop).nonzero()  # transformers keeps the stop token; lit-qa's generate drops it
        new = new[: int(hits[0])] if len(hits) else new
        answers[question.id] = to_official(tokenizer.decode(new, skip_special_tokens=True), no_answer)
    return answers


def compare(model: GPT, hf_model: Any, tokenizer: Tokenizer, questions: list[Question], batch_size: int = 8,
            max_new_tokens: int = 32, prompt_style: str = "plain",
            no_answer: str = NO_ANSWER) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Answer ``questions`` with lit-qa's batched evaluator and with the per-question transformers loop, timed.

    Returns:
        For "lit-qa" and "transformers": ``predictions`` (id -> answer, ``""`` = no answer) and ``seconds``.
    """
    max_prompt_length = model.max_seq_length - max_new_tokens  # what score_questions windows prompts to
    runs = {
        "lit-qa": lambda qs: score_questions(model, tokenizer, qs, DecodingSettings(
            prompt_style, no_answer, batch_size, max_new_tokens, na_threshold=None), progress=False).final,  # fmt: skip
        "transformers": lambda qs: hf_answer_questions(hf_model, tokenizer, qs, max_prompt_length, prompt_style,
                                                       no_answer, max_new_tokens),  # fmt: skip
    }
    results = {}
    for name, run in runs.items():
        run(questions[:2])  # warm-up: first-call allocations and kernel selection are not evaluation speed
        start = time.perf_counter()
        predictions = run(questions)
        results[name] = {"predictions": predictions, "seconds": time.perf_counter() - start}
    return results


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    eval_file: Path = Path("../shared/data/squad2/demo-eval-v2.0.json"),
    limit: int | None = 200,
    seed: int = 1234,
    whole_paragraphs: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    dtype: str = "float32",
    device: str = "cpu",
    quantize: str | None = None,
    peer_dtype: str | None = None,
    out: Path = Path("out/benchmarks/evaluate.json"),
) -> None:
    """Print questions/s and SQuAD metrics of lit-qa and transformers on the same questions, and write them as JSON.

    Args:
        checkpoint_dir: A lit checkpoint folder.
        eval_file: A SQuAD 2.0 file in the official format.
        limit: Answer a fixed stratified subset of this many questions (`select_subset`); None answers all.
        seed: Seed of the subset.
        whole_paragraphs: Draw whole paragraphs (`select_paragraphs`: all questions about each drawn context, as a
            full evaluation asks them) instead of single questions; lit-qa then prefills each paragraph once per
            batch (`lit_qa.generation.prefixes`).
        batch_size: Questions lit-qa decodes together (transformers answers one at a time).
        max_new_tokens: Longest answer in tokens.
        dtype: Weights and activations dtype on both sides ("float32" or "bfloat16").
        device: "cpu" or "cuda".
        quantize: Decode lit-qa's side in a fast mode ("int8", "int4": `lit_qa.quantize.weight_only`); None: as is.
        peer_dtype: The peer's dtype if not ``dtype`` (e.g. a bf16 int8 lit-qa against transformers in float32).
        out: Where to write the JSON results.
    """
    import transformers

    questions = (select_paragraphs if whole_paragraphs else select_subset)(load_squad(eval_file), limit, seed)
    paragraphs = len({q.context for q in questions})
    torch_dtype = getattr(torch, dtype)
    model, config = load_model(checkpoint_dir, device=device, dtype=torch_dtype)
    if quantize is not None:
        quantize_model(model, quantize)
    model.eval()
    tokenizer = Tokenizer(checkpoint_dir)
    with tempfile.TemporaryDirectory() as hf_dir:
        convert_lit_to_hf(checkpoint_dir, Path(hf_dir) / "hf", overwrite=True)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(Path(hf_dir) / "hf",
                                                                 dtype=getattr(torch, peer_dtype or dtype))
    hf_model.to(device).eval()

    results = compare(model, hf_model, tokenizer, questions, batch_size, max_new_tokens)
    ours, theirs = results["lit-qa"], results["transformers"]
    rows = []
    for name, result in results.items():
        metrics = evaluate_predictions(questions, result["predictions"])
        rows.append({
            "": name,
            "seconds": result["seconds"],  # print_table shows one decimal: too coarse for questions/s below 1
            "questions/s": len(questions) / result["seconds"],
            "speed-up": f"{theirs['seconds'] / result['seconds']:.2f}x",
            "EM": metrics["exact"],
            "F1": metrics["f1"],
            "HasAns F1": metrics.get("HasAns_f1"),
            "NoAns accuracy": metrics.get("NoAns_exact"),  # EM on NoAns = share answered ""
        })  # fmt: skip
    differ = [q.id for q in questions if ours["predictions"][q.id] != theirs["predictions"][q.id]]
    machine = describe_machine()
    sides = f"{dtype}" + (f" {quantize}" if quantize else "") + f" (transformers {peer_dtype or dtype})"
    print(f"{config.name}, {sides} on {device}, {len(questions)} questions ({paragraphs} paragraphs) from {eval_file}, "
          f"lit-qa batch {batch_size}, {max_new_tokens} new tokens at most, {machine}")  # fmt: skip
    print_table(rows)
    print(f"identical predictions: {len(questions) - len(differ)} of {len(questions)}")
    for qid in differ[:5]:
        print(f"  {qid}: lit-qa {ours['predictions'][qid]!r} vs transformers {theirs['predictions'][qid]!r}")
    differ_answers = {qid: [ours["predictions"][qid], theirs["predictions"][qid]] for qid in differ}
    write_results(out, {"machine": machine, "config": config.name, "dtype": dtype, "device": device, "quantize": quantize,
                        "peer_dtype": peer_dtype or dtype,
                        "eval_file": str(eval_file), "num_questions": len(questions), "num_paragraphs": paragraphs,
                        "whole_paragraphs": whole_paragraphs,
                        "question_ids_sha256": question_ids_sha256(questions),
                        "batch_size": batch_size, "max_new_tokens": max_new_tokens, "rows": rows,
                        "identical": len(questions) - len(differ), "differ": differ_answers})  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
