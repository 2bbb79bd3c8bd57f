# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The benchmarks compare like with like: speed never changes results."""

from __future__ import annotations

import json

import pytest
from helpers import make_tiny_checkpoint

from benchmarks.evaluate import compare
from lit_qa.checkpoints.convert_hf import convert_lit_to_hf
from lit_qa.checkpoints.folder import load_model, save_checkpoint
from lit_qa.data.squad import load_squad
from lit_qa.models.tokenizer import Tokenizer

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


def test_demo_budget_measures_every_variant_on_the_same_steps(prepared_tiny, tmp_path, monkeypatch):
    """The demo-budget benchmark runs on the demo's config file; finer padding computes fewer padded tokens (unpacked
    here: the tiny data's packs are shorter than any padding multiple)."""
    from benchmarks import demo_budget

    checkpoint, data_dir = prepared_tiny
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {data_dir}\ncheckpoint_dir: {checkpoint}\nlora:\n  r: 2\ntrain:\n  pack: false\n"
                      "  global_batch_size: 4\n  micro_batch_size: 2\n  pad_multiple: 64\neval:\n  max_batches: 1\n"
                      "  num_samples: 1\n  max_new_tokens: 2\n")  # fmt: skip
    out = tmp_path / "budget.json"
    demo_budget.main(config, steps=2, precision="32-true", out=out,
                     variants=["pad to 8", "without the no-answer head"])  # fmt: skip
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 3 and all(row["questions/s"] > 0 for row in rows.values())
    assert rows["pad to 8"]["padding %"] < rows["demo settings"]["padding %"]
    with pytest.raises(Exception, match="unknown variants"):
        demo_budget.main(config, variants=["faster"])


def test_packing_benchmark_compares_packed_unpacked_and_transformers_on_the_same_questions(prepared_tiny, tmp_path):
    """Every part runs on the tiny model (the 7B-shape part is skipped: gigabytes of random weights); packed
    rows compute fewer tokens per question, with the gradients of the unpacked questions."""
    from benchmarks import packing

    checkpoint, data_dir = prepared_tiny
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {data_dir}\ncheckpoint_dir: {checkpoint}\nlora:\n  r: 2\n  mlp: true\ntrain:\n"
                      "  global_batch_size: 6\n  micro_batch_size: 6\n  pad_multiple: 8\n")  # fmt: skip
    out = tmp_path / "packing.json"
    packing.main(config, steps=2, precision="32-true", parts=["attention", "demo", "gradients"], out=out)
    results = json.loads(out.read_text())
    rows = {row["implementation"]: row for row in results["demo"]}
    assert set(rows) == {"lit-qa packed", "lit-qa unpacked", "transformers + peft"}
    per_question = {name: row["tokens per question"] for name, row in rows.items()}  # not a ratio of rounded rates
    assert per_question["lit-qa packed"] < 0.9 * per_question["lit-qa unpacked"]
    assert per_question["lit-qa unpacked"] == pytest.approx(per_question["transformers + peft"], rel=1e-3)
    assert results["gradients"]["relative gradient difference"] < 1e-4
    assert results["gradients"]["loss packed"] == pytest.approx(results["gradients"]["loss unpacked"], rel=1e-5)
    assert len(results["attention"]) == 5 and all(row["ms"] > 0 for row in results["attention"])
    with pytest.raises(Exception, match="unknown parts"):
        packing.main(config, parts=["faster"])


@pytest.fixture
def prepared_tiny(tmp_path):
    from helpers import run_script
    from test_finetune_lora import squad_file as four_question_file

    checkpoint = make_tiny_checkpoint(tmp_path)
    data_dir = tmp_path / "data"
    result = run_script("scripts/prepare_squad.py", "--train_file", str(four_question_file(tmp_path / "t.json", 8)),
                        "--out_dir", str(data_dir), "--checkpoint_dir", str(checkpoint), "--max_seq_length", "128",
                        "--val_fraction", "0.25")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return checkpoint, data_dir


def test_bandwidth_benchmark_measures_every_mode_and_the_bytes_each_reads(tmp_path):
    from test_quantize_bnb import make_wide_checkpoint

    from benchmarks.bandwidth import main

    out = tmp_path / "bandwidth.json"
    main(make_wide_checkpoint(tmp_path), prompt_length=8, new_tokens=24, batch_sizes=(1, 2), repeats=2,
         bandwidth_gb=0.05, out=out)  # fmt: skip
    result = json.loads(out.read_text())
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["transformers fp32", "fp32", "bf16", "int8", "int4"] and result["bandwidth_gb_s"] > 0
    sizes = [rows[mode]["weights MB"] for mode in ("fp32", "bf16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == rows["transformers fp32"]["weights MB"]
    for mode in ("fp32", "bf16", "int8", "int4"):
        assert rows[mode]["tokens/s b1"] > 0 and rows[mode]["tokens/s b2"] > 0 and rows[mode]["weight GB/s b1"] > 0
        assert rows[mode]["vs transformers b2"].endswith("x")


def test_calibration_size_tunes_on_growing_article_sets_and_scores_on_evaluation(prepared_tiny, tmp_path):
    """A tiny adapter with its no-answer head: every size from one article to all has its row, each draw picks a
    rule, and the evaluation F1 of any choice is at most the best in hindsight."""
    from benchmarks import calibration_size
    from helpers import run_script
    from test_finetune_lora import squad_file as four_question_file

    checkpoint, data_dir = prepared_tiny
    run = run_script("finetune/lora.py", "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint),
                     "--out_dir", str(tmp_path / "run"), "--precision", "32-true", "--train.global_batch_size", "4",
                     "--train.micro_batch_size", "4", "--train.max_steps", "2", "--eval.interval", "100",
                     "--eval.max_batches", "1", "--eval.num_samples", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = tmp_path / "calibration.json"
    rows = calibration_size.main(tmp_path / "run" / "final", data_dir / "val-v2.0.json",
                                 four_question_file(tmp_path / "eval.json", 3), limit=8, draws=5, batch_size=4,
                                 max_new_tokens=4, precision="32-true", out=out)  # fmt: skip
    saved = json.loads(out.read_text())
    assert [row["articles"] for row in rows] == [1, 2] and saved["rows"] == rows and saved["eval_questions"] == 8
    assert sum(int(part.split()[-1]) for part in rows[0]["rules chosen"].split(", ")) == 5
    assert rows[1]["rules chosen"].endswith(" 1") and float(rows[1]["threshold sd"]) == 0.0
    assert all(float(row["eval F1 worst"]) <= float(row["eval F1 mean"]) <= saved["hindsight_f1"] + 0.01
               for row in rows)  # fmt: skip
