# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The benchmarks compare like with like: speed never changes results."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_checkpoint

from benchmarks.evaluate import compare
from lit_qa.checkpoint import load_model, save_checkpoint
from lit_qa.convert_hf import convert_lit_to_hf
from lit_qa.squad import load_squad
from lit_qa.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Contexts of different lengths, so a lit-qa batch is left-padded; the last question is unanswerable.
CONTEXTS = [
    ("The Normans were in Normandy in the 10th and 11th centuries.", "When were the Normans in Normandy?",
     "the 10th and 11th centuries"),
    ("The Seine is the river that flows through Paris.", "Which river flows through Paris?", "The Seine"),
    ("Rollo ruled the duchy of Normandy after 911.", "Who ruled the duchy of Normandy?", "Rollo"),
    ("Rollo ruled the duchy of Normandy after 911. The Seine is the river that flows through Paris, and the "
     "Normans were in Normandy in the 10th and 11th centuries.", "Who ruled the duchy of Normandy?", "Rollo"),
    ("Paris.", "Which river flows through Paris?", None),
]  # fmt: skip


def squad_file(path):
    """An official-format SQuAD 2.0 file with one paragraph per question above."""
    paragraphs = []
    for i, (context, question, answer) in enumerate(CONTEXTS):
        answers = [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": question, "answers": answers,
                                                        "is_impossible": answer is None}]})  # fmt: skip
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Normans", "paragraphs": paragraphs}]}))
    return path


def sharp_tiny_checkpoint(root):
    """`make_tiny_checkpoint` with weights scaled up, so that answers depend on the prompt and some stop early.

    At its initial scale the tiny model answers every prompt with the same tokens and never says EOS, so
    identical answers would prove little.
    """
    tiny = make_tiny_checkpoint(root)
    model, config = load_model(tiny)
    tokenizer = Tokenizer(tiny)
    state_dict = {name: p * 3 if p.ndim > 1 else p for name, p in model.state_dict().items()}
    state_dict["lm_head.weight"][tokenizer.eos_id] *= 2
    files = {name: tiny / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_checkpoint(root / "sharp", config, state_dict, extra_files=files)


def test_evaluate_benchmark_batched_and_per_question_answers_are_identical(tmp_path):
    checkpoint = sharp_tiny_checkpoint(tmp_path)
    model, _ = load_model(checkpoint)
    model.max_seq_length = 100  # so the longest prompt (123 tokens) is windowed to 92, on both sides alike
    tokenizer = Tokenizer(checkpoint)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(convert_lit_to_hf(checkpoint, tmp_path / "hf")).eval()
    questions = load_squad(squad_file(tmp_path / "eval.json"))

    results = compare(model, hf_model, tokenizer, questions, batch_size=3, max_new_tokens=8)

    ours, theirs = results["lit-qa"]["predictions"], results["transformers"]["predictions"]
    assert list(ours) == [q.id for q in questions]
    assert ours == theirs
    assert len(set(ours.values())) > 2  # not vacuous: the answers differ from question to question
    assert all(result["seconds"] > 0 for result in results.values())
