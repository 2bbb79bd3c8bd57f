# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Evaluation: subset selection, batched answering, prompt identity with training, the evaluate scripts and
the comparison table, on a tiny random model and a tokenizer trained in the test; one slow test on SmolLM2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    SHARED_SQUAD,
    evaluate_script,
    fake_decoding,
    load_script,
    make_tiny_checkpoint,
    real_smollm2,
    run_script,
)

import lit_qa.evaluation.answering as answering
import lit_qa.evaluation.results as results
from lit_qa.checkpoints.folder import load_model, save_checkpoint
from lit_qa.checkpoints.lora import load_lora_checkpoint, save_lora_checkpoint
from lit_qa.data.dataset import FORMAT_VERSION, IGNORE_INDEX, PREPARED_BY
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.squad import (
    Question,
    load_squad,
    question_ids_sha256,
    select_paragraphs,
    select_subset,
    subset_selector,
)
from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.answering import score_questions, to_official
from lit_qa.evaluation.bootstrap import paired_bootstrap
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.results import check_evaluation_out_dir
from lit_qa.evaluation.run import prompt_settings
from lit_qa.evaluation.squad_metric import evaluate_predictions, no_answer_baseline, question_scores
from lit_qa.models.lora import LoRAConfig, apply_lora, lora_filter, lora_layers, merge_lora_weights
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer

DEMO_EVAL = SHARED_SQUAD / "demo-eval-v2.0.json"

FILLER = "Rivers and hills shape the land of every region. "


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint_dir: Path) -> Tokenizer:
    return Tokenizer(checkpoint_dir)


@pytest.fixture(scope="module")
def model(checkpoint_dir: Path) -> GPT:
    return load_model(checkpoint_dir)[0]


def make_question(qid: str, context: str, answer: str | None, question: str = "Who ruled Normandy?") -> Question:
    if answer is None:
        return Question(qid, "T", context, question, [], [], True)
    return Question(qid, "T", context, question, [answer], [context.index(answer)], False)


def sample_questions() -> list[Question]:
    context = "The Normans were in Normandy in the 10th and 11th centuries."
    return [
        make_question("a1", context, "the 10th and 11th centuries", "When were the Normans in Normandy?"),
        make_question("n1", context, None, "Which river flows through Paris?"),
        make_question("a2", context + " " + FILLER * 2, "Normandy", "Where were the Normans?"),
        make_question("n2", FILLER, None),
        make_question("a3", "Paris is on the Seine.", "the Seine", "Which river flows through Paris?"),
        make_question("n3", "Hills.", None, "Who ruled the duchy of Normandy?"),
    ]


def squad_file(path: Path, questions: list[Question]) -> Path:
    """Write questions as an official-format file, one paragraph per question."""
    paragraphs = [
        {"context": q.context, "qas": [{
            "id": q.id, "question": q.question, "is_impossible": q.is_impossible,
            "answers": [{"text": a, "answer_start": s} for a, s in zip(q.answers, q.answer_starts)],
        }]}
        for q in questions
    ]  # fmt: skip
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "T", "paragraphs": paragraphs}]}))
    return path


def paragraphs_file(path: Path, paragraphs: int = 5) -> Path:
    """Write an official-format file of ``paragraphs`` paragraphs with three questions each (two answerable)."""
    data = []
    for p in range(paragraphs):
        context = f"In the {p + 10}th century the Normans were in Normandy."
        asked = [("when", "When were the Normans in Normandy?", f"the {p + 10}th century"),
                 ("where", "Where were the Normans?", "Normandy"), ("river", "Which river flows through Paris?", None)]
        qas = [{"id": f"p{p}-{name}", "question": text, "is_impossible": answer is None,
                "answers": [] if answer is None else [{"text": answer, "answer_start": context.index(answer)}]}
               for name, text, answer in asked]  # fmt: skip
        data.append({"title": f"T{p}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def record_prompts(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Let `score_questions` decode as usual, but keep every prompt it lays out in the KV cache for decoding."""
    seen: list[torch.Tensor] = []
    real_kv_cached = answering.kv_cached

    def spy(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_kv_cached(model, prompts, *args, **kwargs)

    monkeypatch.setattr(answering, "kv_cached", spy)
    return seen


# ---- select_subset ----


def test_select_subset_keeps_ratio_order_and_is_deterministic():
    # 30 answerable and 70 unanswerable, interleaved.
    questions = [make_question(f"q{i}", "Paris.", "Paris" if i % 10 < 3 else None) for i in range(100)]
    subset = select_subset(questions, 20, seed=7)
    assert len(subset) == 20
    assert sum(bool(q.answers) for q in subset) == 6  # 30% of 20
    positions = [questions.index(q) for q in subset]
    assert positions == sorted(positions)  # file order
    assert select_subset(questions, 20, seed=7) == subset
    assert select_subset(questions, 20, seed=8) != subset
    # Rounding still gives exactly `limit`: 7 * 0.3 = 2.1 answerable -> 2, plus 5 unanswerable.
    small = select_subset(questions, 7)
    assert len(small) == 7 and sum(bool(q.answers) for q in small) == 2
    assert select_subset(questions, None) == questions == select_subset(questions, 100) == select_subset(questions, 500)
    with pytest.raises(LitQAError, match="--limit must be positive"):
        select_subset(questions, 0)


def test_select_paragraphs_draws_whole_paragraphs_in_file_order():
    # 12 paragraphs of 1..12 questions each, one after the other in the file.
    questions = [make_question(f"p{p}q{i}", f"Paragraph {p}.", None) for p in range(12) for i in range(p + 1)]
    subset = select_paragraphs(questions, 30, seed=5)
    assert len(subset) == 30 and select_paragraphs(questions, 30, seed=5) == subset
    assert select_paragraphs(questions, 30, seed=6) != subset
    positions = [questions.index(q) for q in subset]
    assert positions == sorted(positions)
    drawn = {q.context for q in subset}
    asked = {c: sum(q.context == c for q in subset) for c in drawn}
    whole = [c for c in drawn if asked[c] == int(c.split()[1].rstrip(".")) + 1]
    assert len(whole) >= len(drawn) - 1  # every paragraph complete but the last one drawn
    assert select_paragraphs(questions, None) == questions
    with pytest.raises(LitQAError, match="--limit must be positive"):
        select_paragraphs(questions, -1)


def test_no_answer_baseline_and_fingerprint():
    questions = sample_questions()
    baseline = no_answer_baseline(questions)
    assert baseline["exact"] == baseline["f1"] == 50.0 and baseline["NoAns_exact"] == 100.0
    assert baseline["HasAns_exact"] == 0.0 and baseline["total"] == 6
    assert question_ids_sha256(questions) == question_ids_sha256(questions[::-1])
    assert question_ids_sha256(questions) != question_ids_sha256(questions[1:])


# ---- score_questions ----


def test_batched_answers_equal_answers_alone(model: GPT, tokenizer: Tokenizer):
    questions = sample_questions()
    batches = []
    alone = score_questions(model, tokenizer, questions, DecodingSettings(batch_size=1, max_new_tokens=8),
                            progress=False).final  # fmt: skip
    batched = score_questions(model, tokenizer, questions, DecodingSettings(batch_size=4, max_new_tokens=8),
                              progress=False, on_batch=batches.append).final  # fmt: skip
    assert list(alone) == [q.id for q in questions]  # one answer per question, in file order
    assert batched == alone
    assert [len(b) for b in batches] == [4, 2]
    assert {k: v for b in batches for k, v in b.items()} == batched
    assert all(isinstance(a, str) for a in alone.values()) and any(alone.values())


def test_prompts_are_token_identical_to_training(model, tokenizer, monkeypatch):
    seen = record_prompts(monkeypatch)
    questions = sample_questions()
    score_questions(model, tokenizer, questions, DecodingSettings(batch_size=2, max_new_tokens=2), progress=False).final
    encoder = QuestionEncoder(tokenizer, max_seq_length=1024)
    training = [encoder(q).sample for q in questions]
    expected = sorted((s["input_ids"][s["labels"] == IGNORE_INDEX].tolist() for s in training), key=len, reverse=True)
    assert [p.tolist() for p in seen] == expected  # and longest first
    assert all(p[0].item() == tokenizer.bos_id for p in seen)


def test_no_answer_string_maps_to_empty(model, tokenizer, monkeypatch):
    assert to_official("  Unanswerable \n") == "" and to_official("UNANSWERABLE") == ""
    assert to_official(" Paris ") == "Paris" and to_official("unanswerable, sadly") == "unanswerable, sadly"
    assert to_official("n/a", no_answer="N/A") == ""

    def fake_answers(prompts):
        return [tokenizer.encode(" Unanswerable ", bos=False) if i % 2 else tokenizer.encode(" Normandy\n", bos=False)
                for i in range(len(prompts))]  # fmt: skip

    fake_decoding(monkeypatch, fake_answers)
    answers = score_questions(model, tokenizer, sample_questions(), DecodingSettings(batch_size=2, na_threshold=None),
                              progress=False).final  # fmt: skip
    assert sorted(answers.values()) == ["", "", "", "Normandy", "Normandy", "Normandy"]


def test_too_long_context_is_windowed(model, tokenizer, monkeypatch, capsys):
    seen = record_prompts(monkeypatch)
    question = make_question("long", "The Normans ruled. " + FILLER * 40, "The Normans")
    encoder = QuestionEncoder(tokenizer, max_seq_length=4096)
    assert len(encoder.prompt_ids(question.context, question.question)) > model.max_seq_length  # would not fit
    answers = score_questions(model, tokenizer, [question], DecodingSettings(max_new_tokens=16), progress=False).final
    assert list(answers) == ["long"]
    (prompt,) = seen
    assert len(prompt) <= model.max_seq_length - 16
    text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert "### Context:\nThe Normans ruled. Rivers" in text and text.endswith("### Answer:\n")  # the first window
    assert "1 of 1 contexts were windowed" in capsys.readouterr().err
    with pytest.raises(LitQAError, match="leaves no room for a prompt"):
        score_questions(model, tokenizer, [question], DecodingSettings(max_new_tokens=model.max_seq_length)).final


# ---- evaluate/base.py ----


def test_evaluate_base_script_end_to_end(checkpoint_dir, tmp_path):
    questions = sample_questions()
    eval_file = squad_file(tmp_path / "eval.json", questions)
    out = tmp_path / "out"
    result = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--eval_file", str(eval_file),
                        "--out_dir", str(out), "--limit", "4", "--seed", "3", "--batch_size", "3",
                        "--max_new_tokens", "6", "--device", "cpu", "--precision", "32-true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "questions/s" in result.stdout and "always no-answer" in result.stdout

    subset = select_subset(load_squad(eval_file), 4, seed=3)
    predictions = json.loads((out / "predictions.json").read_text())
    assert sorted(predictions) == sorted(q.id for q in subset)
    assert sum(bool(q.answers) for q in subset) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    official = evaluate_predictions(subset, predictions)
    assert {k: metrics[k] for k in official} == official
    assert metrics["no_answer_baseline"] == no_answer_baseline(subset)
    assert metrics["num_questions"] == 4 and metrics["question_ids_sha256"] == question_ids_sha256(subset)
    assert metrics["questions_per_second"] > 0 and metrics["seconds"] > 0
    assert metrics["precision"] == "32-true" and metrics["limit"] == 4 and metrics["seed"] == 3
    assert metrics["subset"] == "questions"  # the default draw
    assert metrics["checkpoint_dir"] == str(checkpoint_dir) and metrics["prompt_style"] == "plain"
    outputs = ["best_spans.json", "metrics.json", "na_probs.json", "predictions.json", "question_scores.json"]
    assert sorted(p.name for p in out.iterdir()) == outputs  # no temp files
    # Each question's official scores, whose means are the metrics: what compare_results pairs runs on.
    scores = json.loads((out / "question_scores.json").read_text())
    exact, f1 = question_scores(subset, predictions)
    _, no_answer_f1 = question_scores(subset, {q.id: "" for q in subset})
    assert scores == {i: {"exact": exact[i], "f1": f1[i], "no_answer_f1": no_answer_f1[i]} for i in predictions}
    assert 100 * sum(s["f1"] for s in scores.values()) / 4 == pytest.approx(metrics["f1"])
    na_probs = json.loads((out / "na_probs.json").read_text())  # the official script's --na-prob-file
    assert sorted(na_probs) == sorted(predictions) and all(0 <= p <= 1 for p in na_probs.values())
    assert all((predictions[i] == "") == (na_probs[i] >= 0.5) for i in predictions)
    # No threshold saved with a base model and no calibration file: "auto", the default, is 0.5; the oracle is at
    # least as good.
    assert metrics["na_threshold"] == 0.5 and metrics["na_threshold_source"] == "0.5 (nothing saved or tuned)"
    assert metrics["best_f1"] >= metrics["f1"] and "oracle" in metrics["best_thresholds_note"]
    assert metrics["extractive"] is True  # the default: every answer is a span of its context
    assert all(predictions[q.id] in q.context for q in subset)

    # Finished results are not overwritten: refused in one line, before the (here missing) model is loaded.
    again = run_script("evaluate/base.py", "--checkpoint_dir", str(tmp_path / "gone"), "--eval_file", str(eval_file),
                       "--out_dir", str(out))  # fmt: skip
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert again.stderr.startswith(f"error: {out} already holds a finished evaluation (metrics.json)")
    assert "--overwrite true" in again.stderr and "--out_dir" in again.stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics
    free = evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint_dir, eval_file=eval_file, out_dir=out, limit=4,
                           seed=3, max_new_tokens=6, device="cpu", precision="32-true", extractive=False,
                           overwrite=True)  # fmt: skip
    assert free["extractive"] is False and json.loads((out / "metrics.json").read_text()) == free


def test_evaluate_with_a_threshold_tuned_on_calibration_questions(checkpoint_dir, tmp_path):
    questions = sample_questions()
    eval_file = squad_file(tmp_path / "eval.json", questions)
    calibration_file = squad_file(tmp_path / "val.json", questions[::-1])
    out = tmp_path / "out"
    result = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--eval_file", str(eval_file),
                        "--out_dir", str(out), "--max_new_tokens", "4", "--precision", "32-true",
                        "--na_threshold", "auto", "--calibration_file", str(calibration_file))  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # Calibrated on the same questions (reversed), the tuned threshold reaches the best F1 on them.
    assert metrics["calibration_questions"] == len(questions)
    assert metrics["f1"] == pytest.approx(metrics["best_f1"]) == pytest.approx(metrics["calibration_f1"], abs=1e-3)
    assert metrics["na_threshold_source"] == "tuned on --calibration_file"
    # Nothing saved and nothing to tune on: 0.5, with a warning saying how to tune it.
    untuned = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--eval_file", str(eval_file),
                         "--out_dir", str(tmp_path / "other"), "--max_new_tokens", "4", "--na_threshold", "auto")  # fmt: skip
    assert untuned.returncode == 0 and "warning: --na_threshold auto" in untuned.stderr
    assert "--calibration_file" in untuned.stderr
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["na_threshold"] == 0.5


def test_evaluate_paragraph_subset_asks_every_question_of_whole_paragraphs(checkpoint_dir, tmp_path):
    eval_file = paragraphs_file(tmp_path / "eval.json")  # 5 paragraphs of 3 questions
    questions = load_squad(eval_file)
    result = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint_dir), "--eval_file", str(eval_file),
                        "--out_dir", str(tmp_path / "a"), "--limit", "6", "--seed", "2", "--subset", "paragraphs",
                        "--max_new_tokens", "4", "--na_threshold", "0.5", "--device", "cpu",
                        "--precision", "32-true")  # fmt: skip
    assert result.returncode == 0, result.stderr
    predictions = json.loads((tmp_path / "a" / "predictions.json").read_text())
    drawn = {q.context for q in questions if q.id in predictions}
    assert len(drawn) == 2  # 6 questions: two whole paragraphs of 3
    assert list(predictions) == [q.id for q in questions if q.context in drawn]  # all their questions, in file order
    assert list(predictions) == [q.id for q in select_paragraphs(questions, 6, seed=2)]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (metrics["subset"], metrics["limit"], metrics["seed"], metrics["num_questions"]) == ("paragraphs", 6, 2, 6)
    # The same flags draw the same paragraphs again.
    again = evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint_dir, eval_file=eval_file,
                            out_dir=tmp_path / "b", limit=6, seed=2, subset="paragraphs", max_new_tokens=4,
                            na_threshold=0.5, device="cpu", precision="32-true")  # fmt: skip
    assert json.loads((tmp_path / "b" / "predictions.json").read_text()) == predictions
    assert again["question_ids_sha256"] == metrics["question_ids_sha256"] and again["subset"] == "paragraphs"


def test_unknown_subset_is_refused_in_one_line_before_anything_loads(tmp_path):
    # Neither the model nor the eval file exists: the flag is checked first.
    result = run_script("evaluate/base.py", "--checkpoint_dir", str(tmp_path / "no-model"), "--eval_file",
                        str(tmp_path / "no-eval.json"), "--out_dir", str(tmp_path / "out"), "--limit", "4",
                        "--subset", "sentences")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "error: --subset must be one of questions, paragraphs, got 'sentences'\n"
    assert not (tmp_path / "out").exists()
    for script, model_arg in (("evaluate/base.py", "checkpoint_dir"), ("evaluate/lora.py", "lora_dir"),
                              ("evaluate/adapter.py", "adapter_dir")):  # fmt: skip
        with pytest.raises(LitQAError, match="^--subset must be one of questions, paragraphs, got 'Paragraphs'$"):
            evaluate_script(script, **{model_arg: tmp_path / "no-model"}, eval_file=tmp_path / "no-eval.json",
                            out_dir=tmp_path / "out", subset="Paragraphs")  # fmt: skip
    assert subset_selector("questions") is select_subset and subset_selector("paragraphs") is select_paragraphs
    usage = run_script("evaluate/base.py", "--help")
    assert usage.returncode == 0 and "--subset SUBSET" in usage.stdout
    assert '"paragraphs" (whole paragraphs' in usage.stdout


@pytest.mark.parametrize("missing", ["eval_file", "checkpoint_dir"])
def test_evaluate_base_missing_input_is_one_line_error(checkpoint_dir, tmp_path, missing):
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    paths = {"eval_file": eval_file, "checkpoint_dir": checkpoint_dir, missing: tmp_path / "nope"}
    result = run_script("evaluate/base.py", "--checkpoint_dir", str(paths["checkpoint_dir"]),
                        "--eval_file", str(paths["eval_file"]), "--out_dir", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert str(tmp_path / "nope") in result.stderr
    assert not (tmp_path / "out").exists()


def test_check_out_dir_refuses_finished_results_only(tmp_path):
    check_evaluation_out_dir(tmp_path / "new")  # nothing there yet
    (tmp_path / results.PARTIAL_FILE).write_text("{}\n")
    check_evaluation_out_dir(tmp_path)  # an interrupted run: resumed, not refused
    for name in (results.PREDICTIONS_FILE, results.METRICS_FILE):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text("{}")
        expected = (f"{folder} already holds a finished evaluation ({name}); pass --overwrite true to replace it "
                    "or choose another --out_dir")  # fmt: skip
        with pytest.raises(LitQAError, match=f"^{re.escape(expected)}$"):
            check_evaluation_out_dir(folder)
        check_evaluation_out_dir(folder, overwrite=True)


@pytest.mark.parametrize("script, model_arg", [("evaluate/base.py", "checkpoint_dir"), ("evaluate/lora.py", "lora_dir"),
                                               ("evaluate/adapter.py", "adapter_dir")])  # fmt: skip
def test_every_evaluate_script_refuses_finished_results_before_loading(tmp_path, script, model_arg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("{}")
    flags = {model_arg: tmp_path / "no-model", "eval_file": tmp_path / "no-eval.json", "out_dir": out}
    with pytest.raises(LitQAError, match="already holds a finished evaluation"):
        evaluate_script(script, **flags)
    with pytest.raises(LitQAError, match="no-"):  # with --overwrite it goes on, to the missing model or file
        evaluate_script(script, **flags, overwrite=True)


# ---- extractive decoding ----


def test_extractive_best_spans_are_spans_and_every_question_gets_a_no_answer_probability(model, tokenizer):
    questions = sample_questions()
    free = answering.score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=8), progress=False)
    spans = answering.score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=8, extractive=True),
                                      progress=False)  # fmt: skip
    for scored in (free, spans):
        assert sorted(scored.na_prob) == sorted(q.id for q in questions)
        assert all(0.0 < p < 1.0 for p in scored.na_prob.values())
    assert spans.na_prob != free.na_prob  # p_na compares with the best span, which the constraint changes
    assert all(spans.best_span[q.id] and spans.best_span[q.id] in q.context for q in questions)
    assert all(spans.final[q.id] in q.context for q in questions)
    assert any(free.best_span[q.id] not in q.context for q in questions)  # the tiny model left alone rambles
    # Without a threshold the no-answer string is allowed too (mapped to "").
    plain = score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=8, na_threshold=None,
                                                                          extractive=True), progress=False).final
    assert all(plain[q.id] in q.context for q in questions)
    # The library default stays free decoding.
    default = score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=8), progress=False)
    assert default.final == free.final


def fingerprinted(**changes) -> DecodingSettings:
    return DecodingSettings(no_answer="unanswerable", max_new_tokens=8, na_threshold=0.5, na_source="span", **changes)


def test_extractive_is_part_of_the_resume_fingerprint(model):
    questions = sample_questions()
    settings = [results.partial_settings(model, questions, fingerprinted(extractive=extractive), {"seed": 1})
                for extractive in (False, True)]  # fmt: skip
    assert settings[0] != settings[1] and settings[1]["extractive"] is True
    # Free decoding keeps the fingerprint of partial files written before the flag existed.
    assert settings[0] == results.partial_settings(model, questions, fingerprinted(), {"seed": 1})


def test_subset_kind_is_part_of_the_resume_fingerprint(model):
    questions = sample_questions()
    settings = {kind: results.partial_settings(model, questions, fingerprinted(), {"seed": 1, "subset": kind})
                for kind in ("questions", "paragraphs")}  # fmt: skip
    assert settings["questions"] != settings["paragraphs"] and settings["paragraphs"]["subset"] == "paragraphs"
    # The default keeps the fingerprint of partial files written before the flag existed.
    assert settings["questions"] == results.partial_settings(model, questions, fingerprinted(), {"seed": 1})


# ---- evaluate/lora.py ----


def test_evaluate_lora_equals_merged_model(checkpoint_dir, tmp_path):
    model = load_model(checkpoint_dir)[0]
    lora_config = LoRAConfig(r=4, alpha=8, query=True, value=True, mlp=True)
    apply_lora(model, lora_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model):  # B starts at zero; a non-zero B makes the adapter matter
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.5)
    prepare = {"prepared_by": PREPARED_BY, "format_version": FORMAT_VERSION, "prompt_style": "plain",
               "no_answer": "unanswerable", "max_seq_length": 256}  # fmt: skip
    lora_dir = save_lora_checkpoint(tmp_path / "lora", model, lora_config, checkpoint_dir,
                                    extra={"prepare_config.json": prepare})  # fmt: skip
    # The reference: the adapter merged offline into a full checkpoint, evaluated by evaluate/base.py.
    merged, _, _ = load_lora_checkpoint(lora_dir)
    merge_lora_weights(merged)
    state_dict = {k: v for k, v in merged.state_dict().items() if not lora_filter(k, v)}
    tokenizer_files = {name: checkpoint_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    merged_dir = save_checkpoint(tmp_path / "merged", merged.config, state_dict, tokenizer_files)

    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    common = ["--eval_file", str(eval_file), "--max_new_tokens", "6", "--device", "cpu", "--precision", "32-true"]
    # --na_threshold 0.5: the default "auto" needs a threshold saved with the adapter or a calibration file.
    result = run_script("evaluate/lora.py", "--lora_dir", str(lora_dir), "--out_dir", str(tmp_path / "lora_out"),
                        "--batch_size", "4", "--na_threshold", "0.5", *common)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    evaluate_script("evaluate/base.py", checkpoint_dir=merged_dir, out_dir=tmp_path / "merged_out",
                    eval_file=eval_file, max_new_tokens=6, device="cpu", precision="32-true", batch_size=2)
    evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint_dir, out_dir=tmp_path / "base_out",
                    eval_file=eval_file, max_new_tokens=6, device="cpu", precision="32-true")  # fmt: skip

    lora_predictions = json.loads((tmp_path / "lora_out" / "predictions.json").read_text())
    assert lora_predictions == json.loads((tmp_path / "merged_out" / "predictions.json").read_text())
    assert lora_predictions != json.loads((tmp_path / "base_out" / "predictions.json").read_text())
    metrics = json.loads((tmp_path / "lora_out" / "metrics.json").read_text())
    assert metrics["lora_dir"] == str(lora_dir) and metrics["checkpoint_dir"] == str(checkpoint_dir)

    missing = run_script("evaluate/lora.py", "--lora_dir", str(tmp_path / "nope"), *common)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"error: LoRA folder {tmp_path / 'nope'} does not exist")


def test_lora_prompt_settings_default_to_training_and_warn_on_override(tmp_path, capsys):
    prepare = {"prepared_by": PREPARED_BY, "format_version": FORMAT_VERSION, "prompt_style": "plain",
               "no_answer": "no answer"}  # fmt: skip
    (tmp_path / "prepare_config.json").write_text(json.dumps(prepare))
    assert prompt_settings(tmp_path, None, None) == ("plain", "no answer")
    assert capsys.readouterr().err == ""
    assert prompt_settings(tmp_path, None, "unanswerable") == ("plain", "unanswerable")
    assert "--no_answer 'unanswerable' differs from 'no answer'" in capsys.readouterr().err
    with pytest.raises(LitQAError, match="unknown prompt style"):
        prompt_settings(tmp_path, "chatty", None)


# ---- scripts/compare_results.py ----


def write_metrics(folder: Path, questions: list[Question], predictions: dict[str, str], speed: float,
                  per_question: bool = False) -> Path:  # fmt: skip
    """The files of a finished evaluation; without ``per_question`` as evaluations wrote them before
    question_scores.json existed."""
    folder.mkdir(parents=True)
    metrics = {**evaluate_predictions(questions, predictions), "no_answer_baseline": no_answer_baseline(questions),
               "num_questions": len(questions), "question_ids_sha256": question_ids_sha256(questions),
               "questions_per_second": speed}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if per_question:
        (folder / "question_scores.json").write_text(json.dumps(results.question_scores_record(questions, predictions)))
    return folder


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_results_table_and_mismatch(tmp_path, capsys):
    compare = load_script("scripts/compare_results.py")
    questions = sample_questions()
    gold = {q.id: q.answers[0] if q.answers else "" for q in questions}
    perfect = write_metrics(tmp_path / "perfect", questions, gold, 12.5, per_question=True)
    chatty = write_metrics(tmp_path / "chatty", questions, {q.id: "Paris" for q in questions}, 3.0)

    out = tmp_path / "table.md"
    table = run_cli(compare.main, ["--runs", f"[good={perfect}, chatty={chatty / 'metrics.json'}]", "--out", str(out)])
    assert capsys.readouterr().out.strip() == table == out.read_text().strip()
    lines = table.splitlines()
    assert cells(lines[0]) == list(compare.COLUMNS)
    # Header, rule, three rows, then why the older run (no question_scores.json) has no interval.
    assert lines[5:] == ["", "No interval for:", f"- chatty: {chatty / 'question_scores.json'} is missing (evaluated "
                         "before per-question scores were written); evaluate again"]  # fmt: skip
    # Perfect answers beat never answering by the answerable half: 100 - 50, resampled over the 6 questions.
    per_question = [100.0 if q.answers else 0.0 for q in questions]
    mean, low, high = paired_bootstrap(per_question, [0.0] * 6)
    assert mean == 50.0 and low < mean < high
    assert cells(lines[2]) == ["good", "6", "100.00", "100.00", "100.00", "100.00", "-",
                               f"+50.00 [{low:+.2f}, {high:+.2f}]", "12.50"]  # fmt: skip
    assert cells(lines[3])[7] == "-"  # an older run: no per-question scores, so no interval (and the note)
    assert cells(lines[4]) == ["always no-answer", "6", "50.00", "50.00", "0.00", "100.00", "-", "-", "-"]
    # A run with a no-answer probability shows its AUC.
    metrics = json.loads((chatty / "metrics.json").read_text())
    (chatty / "metrics.json").write_text(json.dumps({**metrics, "na_prob_auc": 0.8125}))
    assert cells(compare.main([f"chatty={chatty}"]).splitlines()[2])[6] == "0.812"
    # Per-question scores of another run left in the folder are not paired with this one's metrics.
    (chatty / "question_scores.json").write_text((perfect / "question_scores.json").read_text())
    stale = compare.main([f"chatty={chatty}"])
    assert cells(stale.splitlines()[2])[7] == "-" and "does not hold the scores of" in stale

    other = write_metrics(tmp_path / "other", questions[:5], gold, 1.0)
    with pytest.raises(LitQAError, match="computed on other questions"):
        compare.main([f"good={perfect}", f"other={other}"])
    # Same count, different ids.
    renamed = [Question("x" + q.id, q.title, q.context, q.question, q.answers, q.answer_starts, q.is_impossible)
               for q in questions]  # fmt: skip
    renamed_dir = write_metrics(tmp_path / "renamed", renamed, {q.id: "" for q in renamed}, 1.0)
    with pytest.raises(LitQAError, match="computed on other questions"):
        compare.main([f"good={perfect}", f"renamed={renamed_dir}"])
    with pytest.raises(LitQAError, match="does not exist"):
        compare.main([f"gone={tmp_path / 'gone' / 'metrics.json'}"])


def test_compare_results_interval_vs_no_answer_for_evaluated_runs(checkpoint_dir, tmp_path):
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    runs = {label: evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint_dir, eval_file=eval_file,
                                   out_dir=tmp_path / label, max_new_tokens=4, device="cpu", precision="32-true",
                                   na_threshold=threshold)
            for label, threshold in (("spans", 1.0), ("abstain", 0.0))}  # never / always abstaining  # fmt: skip
    compare = load_script("scripts/compare_results.py")
    table = compare.main([f"{label}={tmp_path / label}" for label in runs])
    column = compare.COLUMNS.index("F1 vs no-answer (95% CI)")
    rows = {cells(line)[0]: cells(line)[column] for line in table.splitlines()[2:]}
    assert "No interval" not in table and rows["always no-answer"] == "-"
    for label, metrics in runs.items():
        number = r"([+-]\d+\.\d\d)"
        mean, low, high = map(float, re.fullmatch(rf"{number} \[{number}, {number}\]", rows[label]).groups())
        assert low <= mean <= high
        assert mean == pytest.approx(metrics["f1"] - metrics["no_answer_baseline"]["f1"], abs=0.006)
    assert rows["abstain"] == "+0.00 [+0.00, +0.00]"  # answering "no answer" everywhere is the floor itself
    assert float(rows["spans"].split()[0]) < 0  # never abstaining loses every unanswerable question


# ---- the real model ----


@pytest.mark.slow
def test_real_smollm2_on_demo_eval(tmp_path):
    if not DEMO_EVAL.is_file():
        pytest.skip(f"{DEMO_EVAL} is missing")
    checkpoint = real_smollm2(tmp_path / "smol")

    out = tmp_path / "eval"
    metrics = evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint, eval_file=DEMO_EVAL, out_dir=out,
                              limit=16, batch_size=8, max_new_tokens=16, precision="32-true", device="cpu")  # fmt: skip
    subset = select_subset(load_squad(DEMO_EVAL), 16)
    predictions = json.loads((out / "predictions.json").read_text())
    assert list(predictions) == [q.id for q in subset]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert {k: metrics[k] for k in ("exact", "f1", "total")} == {
        k: evaluate_predictions(subset, predictions)[k] for k in ("exact", "f1", "total")
    }
    assert metrics["no_answer_baseline"] == no_answer_baseline(subset)

    # Half the questions decoded one at a time is enough to catch a batching bug, at half the cost.
    model = load_model(checkpoint)[0]
    alone = score_questions(model, Tokenizer(checkpoint), subset[:8], progress=False,
                             decoding=DecodingSettings(batch_size=1, max_new_tokens=16, extractive=True)).final
    assert alone == {q.id: predictions[q.id] for q in subset[:8]}


def test_scoring_with_a_threshold_separates_abstaining_from_the_best_span(model, tokenizer):
    questions = sample_questions()
    never = answering.score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=4, na_threshold=1.0))
    always = answering.score_questions(model, tokenizer, questions, DecodingSettings(max_new_tokens=4,
                                                                                     na_threshold=0.0))
    assert set(always.final.values()) == {""}
    assert never.best_span == always.best_span == {q: a for q, a in never.final.items()}
    assert all(0.0 <= p <= 1.0 for p in never.na_prob.values()) and never.na_prob == always.na_prob
    with pytest.raises(LitQAError, match="na_threshold"):
        answering.score_questions(model, tokenizer, questions, DecodingSettings(na_threshold=1.5), progress=False)
