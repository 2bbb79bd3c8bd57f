# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The Python reader (lit_qa/evaluation/reader.py) against the evaluate scripts: on a tiny random model, as a full
checkpoint, a LoRA and an adapter folder, each with a saved threshold, its answers and p_na are those the script
writes; its offsets point at its answers; a batch answers as one question at a time; bad input is one-line error.
One slow test on SmolLM2 against evaluate/base.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import demo_eval_file, evaluate_script, make_tiny_checkpoint, real_smollm2
from test_evaluation import sample_questions, squad_file

from lit_qa.checkpoints.adapter import save_adapter_checkpoint
from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.lora import save_lora_checkpoint
from lit_qa.data.dataset import FORMAT_VERSION, PREPARED_BY
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answers import NA_METHOD
from lit_qa.evaluation.calibration import NA_THRESHOLD_FILE
from lit_qa.evaluation.reader import Reader, ReaderAnswer
from lit_qa.models.adapter import AdapterConfig, apply_adapter
from lit_qa.models.lora import LoRAConfig, apply_lora

SCRIPTS = {"full": ("evaluate/base.py", "checkpoint_dir"), "lora": ("evaluate/lora.py", "lora_dir"),
           "adapter": ("evaluate/adapter.py", "adapter_dir")}  # fmt: skip
THRESHOLDS = {"full": 0.45, "lora": 0.5, "adapter": 0.55}  # each saved with its folder: the reader must read its own
CPU = dict(device="cpu", precision="32-true", max_new_tokens=4)
PREPARED = {"prepared_by": PREPARED_BY, "format_version": FORMAT_VERSION, "prompt_style": "plain",
            "no_answer": "unanswerable"}  # fmt: skip


def save_threshold(folder: Path, threshold: float) -> None:
    record = {"threshold": threshold, "tuned_on": "3 validation questions of data/x", "val_f1": 50.0,
              "extractive": True, "method": NA_METHOD, "step": 3}  # fmt: skip
    (folder / NA_THRESHOLD_FILE).write_text(json.dumps(record))


def randomize(model: torch.nn.Module, marks: tuple[str, ...]) -> torch.nn.Module:
    """Give the zero-initialised LoRA B / adapter gates values, so that the folder changes the model's answers."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(mark in name for mark in marks):
                param.normal_(std=0.5)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A base checkpoint (no training records), and a full, a LoRA and an adapter folder, each fine-tuned in name:
    prompt settings and a saved threshold of their own."""
    root = tmp_path_factory.mktemp("reader")
    base = make_tiny_checkpoint(root)
    full = shutil.copytree(base, root / "full")
    (full / "prepare_config.json").write_text(json.dumps(PREPARED))
    extra = {"prepare_config.json": PREPARED}
    lora_config, adapter_config = LoRAConfig(r=2, alpha=4), AdapterConfig(prompt_length=2, start_layer=1)
    lora = randomize(apply_lora(load_model(base)[0], lora_config), ("lora_B",))
    adapter = randomize(apply_adapter(load_model(base)[0], adapter_config), ("adapter_gate",))
    found = {"base": base, "full": full,
             "lora": save_lora_checkpoint(root / "lora", lora, lora_config, base, extra=extra),
             "adapter": save_adapter_checkpoint(root / "adapter", adapter, adapter_config, base, extra=extra)}  # fmt: skip
    for kind, threshold in THRESHOLDS.items():
        save_threshold(found[kind], threshold)
    return found


def pairs_of(questions) -> list[tuple[str, str]]:
    return [(q.question, q.context) for q in questions]


def check_offsets(answer: ReaderAnswer, context: str) -> None:
    if answer.abstained:
        assert (answer.answer, answer.start, answer.end) == ("", 0, 0)
    else:
        assert context[answer.start : answer.end] == answer.answer != ""
    if answer.best_span:
        assert context[answer.best_span_start : answer.best_span_end] == answer.best_span


@pytest.mark.parametrize("kind", ["full", "lora", "adapter"])
def test_reader_answers_as_the_evaluate_script(folders, tmp_path, kind):
    questions = sample_questions()  # a1 and n1 share a context; a2's is windowed
    eval_file = squad_file(tmp_path / "eval.json", questions)
    script, flag = SCRIPTS[kind]
    out = tmp_path / "out"
    metrics = evaluate_script(script, eval_file=eval_file, out_dir=out, **CPU, **{flag: folders[kind]})
    predictions = json.loads((out / "predictions.json").read_text())
    na_probs = json.loads((out / "na_probs.json").read_text())
    assert metrics["na_threshold"] == THRESHOLDS[kind]

    reader = Reader.load(folders[kind], **CPU)
    assert reader.kind == kind and reader.decoding.na_threshold == THRESHOLDS[kind]
    assert reader.decoding.prompt_style == "plain" and reader.decoding.extractive
    answers = reader(pairs_of(questions))
    assert [a.answer for a in answers] == [predictions[q.id] for q in questions]
    assert [a.no_answer_probability for a in answers] == pytest.approx([na_probs[q.id] for q in questions], abs=1e-6)
    for answer, question in zip(answers, questions, strict=True):
        assert answer.abstained == (answer.no_answer_probability >= THRESHOLDS[kind])
        assert answer.score == pytest.approx(1.0 - answer.no_answer_probability)
        check_offsets(answer, question.context)
    if kind != "full":  # the folder's weights are in use: the base alone scores otherwise
        base = Reader.load(folders["base"], **CPU, na_threshold=THRESHOLDS[kind])
        assert [a.no_answer_probability for a in base(pairs_of(questions))] != pytest.approx(
            [a.no_answer_probability for a in answers], abs=1e-4)  # fmt: skip


def test_batch_answers_as_one_at_a_time_and_offsets_point_at_the_answers(folders):
    questions = sample_questions()
    never = Reader.load(folders["lora"], **CPU, na_threshold=1.0, batch_size=4)
    batch = never.answer_batch(pairs_of(questions))
    assert never(pairs_of(questions)) == batch
    alone = [never(q.question, q.context) for q in questions]
    assert [a.answer for a in alone] == [a.answer for a in batch]
    assert [a.no_answer_probability for a in alone] == pytest.approx([a.no_answer_probability for a in batch], abs=1e-5)
    assert not any(a.abstained for a in batch) and all(a.answer == a.best_span for a in batch)
    for answer, question in zip(batch, questions, strict=True):
        check_offsets(answer, question.context)
        assert answer.start == question.context.find(answer.answer)  # the first occurrence

    always = Reader.load(folders["lora"], **CPU, na_threshold=0.0)
    abstained = always(pairs_of(questions))
    assert all(a.abstained and (a.answer, a.start, a.end) == ("", 0, 0) for a in abstained)
    assert [a.best_span for a in abstained] == [a.answer for a in batch]  # what it would have said
    assert [a.best_span_start for a in abstained] == [a.start for a in batch]
    assert never([]) == []


def test_auto_without_a_saved_threshold_is_one_half_with_a_warning_and_off_has_no_p_na(folders, capsys):
    reader = Reader.load(folders["base"], **CPU)
    assert reader.decoding.na_threshold == 0.5 and reader.decoding.na_source == "span"
    assert "using 0.5" in capsys.readouterr().err
    question, context = sample_questions()[0].question, sample_questions()[0].context
    off = Reader.load(folders["base"], **CPU, na_threshold="off")(question, context)
    assert off.no_answer_probability is None and off.score is None and off.best_span == off.answer


def test_bad_input_is_a_one_line_error(folders, tmp_path):
    reader = Reader.load(folders["full"], **CPU)
    bad_calls = {
        "the question is empty": (("", "Some context."), {}),
        "the context is empty": (("Who?", "   "), {}),
        "the context must be a string, got NoneType": (("Who?",), {}),
        "the question must be a string, got int": (([(3, "Some context.")],), {}),
        "expected a \\(question, context\\) pair, got tuple": (([("Who?", "a", "b")],), {}),
        "expected a list of \\(question, context\\) pairs, got dict": (({"Who?": "a"},), {}),
        "a list of pairs takes no context": (([("Who?", "a")], "a"), {}),
    }
    for message, (args, kwargs) in bad_calls.items():
        with pytest.raises(LitQAError, match=message) as error:
            reader(*args, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(LitQAError, match="no such folder"):
        Reader.load(tmp_path / "missing")
    with pytest.raises(LitQAError, match="checkpoint_dir is the base of a LoRA or adapter folder"):
        Reader.load(folders["full"], checkpoint_dir=folders["base"])
    with pytest.raises(LitQAError, match="scripts/merge_lora.py"):
        Reader.load(folders["lora"], quantize="gptq.int4", gptq_checkpoint=tmp_path)
    broken = shutil.copytree(folders["adapter"], tmp_path / "broken")
    (broken / "lit_adapter.safetensors").unlink()
    with pytest.raises(LitQAError, match="missing lit_adapter.safetensors"):
        Reader.load(broken)


@pytest.mark.slow
def test_real_smollm2_reader_answers_as_evaluate_base(tmp_path):
    demo_eval = demo_eval_file()
    checkpoint = real_smollm2(tmp_path / "smol")
    settings = dict(device="cpu", precision="32-true", max_new_tokens=16)
    out = tmp_path / "eval"
    evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint, eval_file=demo_eval, out_dir=out, limit=8,
                    **settings)  # fmt: skip
    predictions = json.loads((out / "predictions.json").read_text())
    na_probs = json.loads((out / "na_probs.json").read_text())
    subset = select_subset(load_squad(demo_eval), 8)
    answers = Reader.load(checkpoint, **settings)(pairs_of(subset))
    assert [a.answer for a in answers] == [predictions[q.id] for q in subset]
    assert [a.no_answer_probability for a in answers] == pytest.approx([na_probs[q.id] for q in subset], abs=1e-5)
    for answer, question in zip(answers, subset, strict=True):
        check_offsets(answer, question.context)
