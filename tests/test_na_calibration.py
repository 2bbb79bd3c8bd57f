# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The calibrated no-answer decision: p_na = sigmoid(s_na - s_span) from one decoding pass.

The two scores against plain full forward passes (the no-answer string through the KV-cache probe, the best span
through the greedy scorer), the threshold search against brute force and the official script's algorithm, the
``na_probs.json`` / ``metrics.json`` outputs, where ``--na_threshold auto`` takes its threshold from, and a
training run that saves the tuned threshold for evaluation to pick up.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers import SHARED_SQUAD, evaluate_script, load_script, make_tiny_checkpoint, make_tiny_tokenizer, real_smollm2
from test_evaluation import make_question, sample_questions, squad_file
from test_extractive import tiny_model
from test_finetune_lora import finetune, prepared  # noqa: F401 (prepared: a module-scoped fixture)

import lit_qa.evaluation.answering as answering
from lit_qa.checkpoints.adapter import save_adapter_checkpoint
from lit_qa.checkpoints.folder import load_model, save_checkpoint
from lit_qa.checkpoints.lora import save_lora_checkpoint
from lit_qa.data.dataset import FORMAT_VERSION, PREPARED_BY
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.prompts import NO_ANSWER, build_prompt, chat_template_sha256
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answering import GreedyScorer, NoAnswerScores, no_answer_ids, prompt_for, score_questions
from lit_qa.evaluation.answers import NA_METHOD, NA_METHODS, Answers
from lit_qa.evaluation.calibration import (
    NA_THRESHOLD_FILE,
    answerability_diagnostics,
    apply_na_threshold,
    best_na_threshold,
    resolve_na_threshold,
    roc_auc,
)
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.run import prompt_settings
from lit_qa.evaluation.squad_metric import evaluate_predictions, f1_score, gold_answers, normalize_answer
from lit_qa.generation.extractive import SpanDecoder
from lit_qa.generation.generate import decode_n_tokens, generate, kv_cached, prefill, probe_logits
from lit_qa.models.adapter import AdapterConfig, apply_adapter
from lit_qa.models.lora import LoRAConfig, apply_lora
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer

ATOL = 1e-5  # fp32: the cached and the full pass differ only in the order of the sums
LONG_NO_ANSWER = "no answer in the context"  # several tokens, where "unanswerable" is one for the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_model(seed=1, tokenizer=tokenizer)  # sharp weights and a likely EOS: rows end at different steps


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def prompts_of(tokenizer: Tokenizer, questions) -> list[torch.Tensor]:
    return [tokenizer.encode(build_prompt(q.context, q.question)) for q in questions]


def full_mean_log_prob(model: GPT, prompt: torch.Tensor, continuation: list[int]) -> float:
    """Mean log p(continuation | prompt) from one plain causal forward pass (no cache) of prompt + continuation."""
    ids = torch.cat([prompt, torch.tensor(continuation, dtype=prompt.dtype)])
    with torch.no_grad():
        log_probs = model(ids[None])[0].float().log_softmax(dim=-1)  # (T, V)
    positions = torch.arange(len(prompt) - 1, len(ids) - 1)
    return float(log_probs[positions, torch.tensor(continuation)].mean())


# ---- the two scores ----


def decode(model, tokenizer, prompts, max_new_tokens, probe=None):
    """Decode as `answering.answer_batch` does, with ``probe`` scored between the prefill and the decoding."""
    room = max_new_tokens if probe is None else max(max_new_tokens, probe.numel())
    with kv_cached(model, prompts, room, tokenizer.eos_id, pad_multiple=64) as layout:
        logits, _ = prefill(model, layout)
        probed = None if probe is None else probe_logits(model, layout, logits, probe)
        outputs = decode_n_tokens(model, layout, logits, max_new_tokens, stop_ids=tokenizer.eos_ids,
                                  pad_id=tokenizer.eos_id)  # fmt: skip
    return outputs, probed


def test_the_no_answer_probe_equals_a_full_forward_and_leaves_decoding_unchanged(model, tokenizer):
    questions = sample_questions()
    prompts = prompts_of(tokenizer, questions)
    assert len({len(p) for p in prompts}) > 2  # left padding with different amounts
    probe, targets = no_answer_ids(tokenizer, LONG_NO_ANSWER)
    assert targets[-1] == tokenizer.eos_id and torch.equal(targets[:-1], probe) and len(probe) > 1
    plain, _ = decode(model, tokenizer, prompts, 6)
    probed, logits = decode(model, tokenizer, prompts, 6, probe)
    assert [p.tolist() for p in probed] == [p.tolist() for p in plain]  # the probe leaves no trace
    assert logits.shape == (len(prompts), len(probe) + 1, model.config.padded_vocab_size)
    scores = NoAnswerScores(targets)
    scores(logits)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            full = model(torch.cat([prompt, probe])[None])[0]  # (T, V)
        torch.testing.assert_close(logits[row], full[len(prompt) - 1 :], atol=ATOL, rtol=ATOL)
        # s_na: prompt + no-answer + EOS scored by one plain forward pass.
        s_na = full_mean_log_prob(model, prompt, [*probe.tolist(), tokenizer.eos_id])
        assert scores.scores[row] == pytest.approx(s_na, abs=ATOL)
    # A probe longer than the answer budget fits in the room made for it.
    _, logits = decode(model, tokenizer, prompts[:2], 1, torch.cat([probe, probe]))
    with torch.no_grad():
        full = model(torch.cat([prompts[0], probe, probe])[None])[0]
    torch.testing.assert_close(logits[0], full[len(prompts[0]) - 1 :], atol=ATOL, rtol=ATOL)
    for bad in (probe, probe[:0]):  # longer than the room left, or empty
        with kv_cached(model, prompts, room=1) as layout, pytest.raises(LitQAError, match="probe"):
            probe_logits(model, layout, prefill(model, layout)[0], bad)


@pytest.mark.parametrize("extractive", [True, False])
def test_recorded_span_log_probs_equal_a_teacher_forced_forward(model, tokenizer, extractive):
    questions = sample_questions()
    prompts, contexts = prompts_of(tokenizer, questions), [q.context for q in questions]
    probe, _ = no_answer_ids(tokenizer, NO_ANSWER)
    for max_new_tokens in (8, 3):  # 3: some rows are cut before their EOS
        constraint = SpanDecoder(tokenizer).processor(contexts, False, max_new_tokens) if extractive else None
        scorer = GreedyScorer(constraint, forbidden_first=None if extractive else int(probe[0]))
        outputs = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_id,
                           logits_processor=scorer)  # fmt: skip
        means = scorer.mean_log_probs(outputs)
        stopped = [len(out) < len(scorer.chosen) for out in outputs]
        for row, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            span = out.tolist() + ([tokenizer.eos_id] if stopped[row] else [])
            assert means[row] == pytest.approx(full_mean_log_prob(model, prompt, span), abs=ATOL), (row, span)
            assert not out.numel() or int(out[0]) != int(probe[0])  # the no-answer string never starts the span
        if max_new_tokens == 3:
            assert not all(stopped)
        else:
            assert any(stopped)


def test_the_scorer_records_raw_log_probs_of_the_greedy_choice_under_the_constraint():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0], [0.0, 1.0, 2.0, 5.0]])
    raw = logits.log_softmax(dim=-1)
    only_two = lambda lg, last: lg.index_fill(-1, torch.tensor([0, 3]), float("-inf"))  # noqa: E731
    scorer = GreedyScorer(only_two)
    out = scorer(logits, None)
    assert out.argmax(-1).tolist() == [1, 2]
    torch.testing.assert_close(scorer.chosen[0], raw[[0, 1], [1, 2]])  # raw, not renormalised over tokens 1, 2
    scorer = GreedyScorer(forbidden_first=0)
    first, second = scorer(logits, None), scorer(logits, torch.tensor([1, 3]))
    assert first.argmax(-1).tolist() == [1, 3] and second.argmax(-1).tolist() == [0, 3]  # only the first step
    # Row 0 stopped at once (its first token was the stop token), row 1 was cut after two tokens (no stop token).
    means = scorer.mean_log_probs([torch.tensor([], dtype=torch.long), torch.tensor([3, 3])])
    assert means == pytest.approx([float(raw[0, 1]), float(raw[1, 3])])


def check_p_na_against_full_forward(model, tokenizer, questions, monkeypatch, no_answer=NO_ANSWER, batch_size=4,
                                    max_new_tokens=8, atol=1e-5):  # fmt: skip
    """Score ``questions`` as evaluation does and recompute every p_na from two plain forward passes per question."""
    calls = []  # (prompts, outputs) of each batch

    def prompts_spy(model, prompts, *args, **kwargs):
        calls.append((prompts, []))
        return kv_cached(model, prompts, *args, **kwargs)

    def outputs_spy(*args, **kwargs):
        outputs = decode_n_tokens(*args, **kwargs)
        calls[-1][1].extend(outputs)
        return outputs

    monkeypatch.setattr(answering, "kv_cached", prompts_spy)
    monkeypatch.setattr(answering, "decode_n_tokens", outputs_spy)
    decoding = DecodingSettings(no_answer=no_answer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                extractive=True)  # fmt: skip
    scored = score_questions(model, tokenizer, questions, decoding, progress=False)
    monkeypatch.undo()
    encoder = QuestionEncoder(tokenizer, model.max_seq_length - max_new_tokens, no_answer=no_answer)
    by_prompt = {tuple(prompt_for(encoder, q)[0].tolist()): q for q in questions}
    probe, _ = no_answer_ids(tokenizer, no_answer)
    checked = 0
    for prompts, outputs in calls:
        for prompt, out in zip(prompts, outputs, strict=True):
            question = by_prompt[tuple(prompt.tolist())]
            s_na = full_mean_log_prob(model, prompt, [*probe.tolist(), tokenizer.eos_id])
            span = out.tolist() + ([tokenizer.eos_id] if len(out) < max_new_tokens else [])
            s_span = full_mean_log_prob(model, prompt, span)
            p_na = 1 / (1 + torch.exp(torch.tensor(s_span - s_na, dtype=torch.float64)))
            assert scored.na_prob[question.id] == pytest.approx(float(p_na), abs=atol)
            assert scored.best_span[question.id] == tokenizer.decode(out, skip_special_tokens=True).strip()
            assert scored.final[question.id] == ("" if scored.na_prob[question.id] >= 0.5 else
                                                 scored.best_span[question.id])  # fmt: skip
            checked += 1
    assert checked == len(questions)
    return scored


@pytest.mark.parametrize("no_answer", [NO_ANSWER, LONG_NO_ANSWER])
def test_score_questions_p_na_is_the_sigmoid_of_the_two_full_forward_scores(model, tokenizer, monkeypatch, no_answer):
    check_p_na_against_full_forward(model, tokenizer, sample_questions(), monkeypatch, no_answer)


@pytest.mark.slow
def test_real_smollm2_p_na_equals_full_forward_passes(tmp_path, monkeypatch):
    demo_eval = SHARED_SQUAD / "demo-eval-v2.0.json"
    if not demo_eval.is_file():
        pytest.skip(f"{demo_eval} is missing")
    checkpoint = real_smollm2(tmp_path / "smol")
    model, tokenizer = load_model(checkpoint)[0].eval(), Tokenizer(checkpoint)
    questions = select_subset(load_squad(demo_eval), 6)  # GQA, tied embeddings, a 49k vocabulary, fp32
    scored = check_p_na_against_full_forward(model, tokenizer, questions, monkeypatch, batch_size=3,
                                             max_new_tokens=12, atol=1e-4)  # fmt: skip
    assert len(set(scored.na_prob.values())) == len(questions)


# ---- the threshold search ----


def answers_of(rows: dict[str, tuple[float, str]]) -> Answers:
    return Answers(final={}, best_span={q: span for q, (_, span) in rows.items()},
                   na_prob={q: p for q, (p, _) in rows.items()})  # fmt: skip


def f1_at(questions, answers: Answers, threshold: float) -> float:
    return evaluate_predictions(questions, apply_na_threshold(answers, threshold, questions))["f1"]


def test_best_na_threshold_on_a_hand_made_case_ties_and_edges():
    questions = [make_question("a", "Paris is big.", "Paris"), make_question("b", "Rome is old.", "Rome"),
                 make_question("n", "Oslo is cold.", None), make_question("m", "Bern is calm.", None)]  # fmt: skip
    answers = answers_of({"a": (0.1, "Paris"), "b": (0.5, "Oslo"), "n": (0.4, "Oslo"), "m": (0.9, "Bern")})
    # Answer a only (right), abstain from 0.4 up: n and m right, b wrong either way. Between 0.1 and 0.4.
    assert best_na_threshold(questions, answers) == (pytest.approx(0.25), 75.0)
    assert f1_at(questions, answers, 0.25) == 75.0

    # Equal probabilities cannot be split: answering x (right) but not y (wrong) would score 100.
    tied = [make_question("x", "Paris.", "Paris"), make_question("y", "Rome.", None), make_question("z", "Oslo.", None)]
    tied_answers = answers_of({"x": (0.3, "Paris"), "y": (0.3, "Rome"), "z": (0.8, "Oslo")})
    # Abstaining on all and answering x and y both score 2 of 3: the lower threshold (abstain more) wins.
    threshold, f1 = best_na_threshold(tied, tied_answers)
    assert threshold == 0.0 and f1 == pytest.approx(200 / 3) == pytest.approx(f1_at(tied, tied_answers, threshold))

    # Edges: abstain on all (threshold 0), answer all (threshold 1), one question.
    unanswerable = [make_question(f"u{i}", "Paris.", None) for i in range(3)]
    assert best_na_threshold(unanswerable, answers_of({f"u{i}": (0.2 * i, "Paris") for i in range(3)})) == (0.0, 100.0)
    answerable = [make_question(f"h{i}", "Paris.", "Paris") for i in range(3)]
    assert best_na_threshold(answerable, answers_of({f"h{i}": (0.3 * i, "Paris") for i in range(3)})) == (1.0, 100.0)
    assert best_na_threshold(answerable[:1], answers_of({"h0": (0.7, "Rome")})) == (0.0, 0.0)  # nothing helps
    # Adjacent floats: the midpoint rounds onto one of them, and the threshold still separates them.
    low = 0.5
    high = float(torch.nextafter(torch.tensor(low, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)))
    pair = [make_question("p", "Paris.", "Paris"), make_question("q", "Rome.", None)]
    threshold, f1 = best_na_threshold(pair, answers_of({"p": (low, "Paris"), "q": (high, "Rome")}))
    assert f1 == 100.0 and low < threshold <= high

    with pytest.raises(LitQAError, match="at least one question"):
        best_na_threshold([], Answers(final={}))
    with pytest.raises(LitQAError, match="scored with an na_threshold"):
        best_na_threshold(questions, Answers(final={}))


def test_answerability_diagnostics_on_a_hand_made_case():
    questions = [make_question("a", "Paris is big.", "Paris"), make_question("b", "Rome is old.", "Rome"),
                 make_question("n", "Oslo is cold.", None), make_question("m", "Bern is calm.", None)]  # fmt: skip
    # Pairs (unanswerable, answerable): (n 0.4, a 0.1) and (m 0.9, a|b) ranked right, (n 0.4, b 0.5) wrong: 3 of 4.
    answers = answers_of({"a": (0.1, "Paris"), "b": (0.5, "old"), "n": (0.4, "Oslo"), "m": (0.9, "Bern")})
    assert answerability_diagnostics(questions, answers) == {"span_HasAns_f1": 50.0, "na_prob_auc": 0.75}
    assert roc_auc([0.3, 0.3, 0.3], [True, False, False]) == 0.5  # ties count one half
    assert roc_auc([0.9, 0.2, 0.1], [True, False, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9], [True, False, False]) == 0.0
    assert roc_auc([0.1, 0.2], [True, True]) is None  # one class only
    rng = random.Random(0)
    for _ in range(20):  # the rank formula equals counting every pair
        scores = [round(rng.random(), 1) for _ in range(rng.randint(2, 30))]
        positive = [rng.random() < 0.5 for _ in scores]
        pos = [s for s, p in zip(scores, positive) if p]
        neg = [s for s, p in zip(scores, positive) if not p]
        if pos and neg:
            pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
            assert roc_auc(scores, positive) == pytest.approx(pairs)


def official_best_f1(questions, predictions: dict[str, str], na_probs: dict[str, float]) -> float:
    """``find_best_thresh`` of the official SQuAD 2.0 script (evaluate-v2.0.py), on raw F1 scores."""
    has_answer = {q.id: bool(q.answers) for q in questions}
    scores = {q.id: max(f1_score(predictions[q.id], g) for g in gold_answers(q)) for q in questions}
    current = best = sum(1 for q in questions if not q.answers)
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        current += scores[qid] if has_answer[qid] else (-1 if predictions[qid] else 0)
        best = max(best, current)
    return 100.0 * best / len(scores)


def test_best_na_threshold_equals_brute_force_and_the_official_script():
    rng = random.Random(0)
    words = ["Paris", "Rome", "the river", "Oslo in winter", "Bern"]
    for trial in range(30):
        questions, rows = [], {}
        for i in range(rng.randint(1, 25)):
            gold = rng.choice([None, *words])
            questions.append(make_question(f"q{i}", " ".join(words) + ".", gold))
            # Coarse probabilities make ties (trial < 15); fine ones do not, as the official script assumes.
            p = round(rng.random(), 1) if trial < 15 else rng.random()
            rows[f"q{i}"] = (p, rng.choice(words))
        answers = answers_of(rows)
        for metric in ("f1", "exact"):
            threshold, score = best_na_threshold(questions, answers, metric)
            key = "f1" if metric == "f1" else "exact"
            at = evaluate_predictions(questions, apply_na_threshold(answers, threshold, questions))[key]
            assert score == pytest.approx(at)
            candidates = {0.0, 1.0, *(p for p, _ in rows.values())}
            candidates |= {(a + b) / 2 for a in candidates for b in candidates}
            for t in candidates:
                other = evaluate_predictions(questions, apply_na_threshold(answers, t, questions))[key]
                assert score >= other - 1e-9, (trial, metric, t)
        if trial >= 15 and all(normalize_answer(w) for w in words):
            official = official_best_f1(questions, answers.best_span, answers.na_prob)
            assert best_na_threshold(questions, answers)[1] == pytest.approx(official)


# ---- outputs and where the threshold comes from ----


def evaluate_base(checkpoint: Path, eval_file: Path, out_dir: Path, **overrides) -> dict:
    settings = dict(max_new_tokens=4, device="cpu", precision="32-true", batch_size=4) | overrides
    return evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint, eval_file=eval_file, out_dir=out_dir,
                           **settings)  # fmt: skip


def test_na_probs_file_is_in_the_official_format_and_metrics_name_the_oracle(checkpoint, tmp_path):
    questions = sample_questions()
    eval_file = squad_file(tmp_path / "eval.json", questions)
    metrics = evaluate_base(checkpoint, eval_file, tmp_path / "out", na_threshold=0.46)
    na_probs = json.loads((tmp_path / "out" / "na_probs.json").read_text())
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert list(na_probs) == [q.id for q in questions]  # every evaluated question, in file order
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in na_probs.values())
    assert all(predictions[qid] == "" for qid, p in na_probs.items() if p >= 0.46)
    assert metrics["na_threshold"] == 0.46 and metrics["na_threshold_source"] == "--na_threshold"
    assert metrics["na_method"] == NA_METHOD
    assert {"best_f1", "best_f1_thresh", "best_exact", "best_exact_thresh"} <= metrics.keys()
    assert metrics["best_f1"] >= metrics["f1"] and "oracle" in metrics["best_thresholds_note"]
    best_spans = json.loads((tmp_path / "out" / "best_spans.json").read_text())
    assert list(best_spans) == list(na_probs)  # spans of abstained questions are kept too
    assert all(predictions[qid] == best_spans[qid] for qid, p in na_probs.items() if p < 0.46)
    assert 0.0 <= metrics["na_prob_auc"] <= 1.0 and 0.0 <= metrics["span_HasAns_f1"] <= 100.0
    assert metrics["span_HasAns_f1"] >= metrics["HasAns_f1"]  # abstaining can only lose answerable points

    for off in ("off", None):
        out = tmp_path / f"off-{off}"
        metrics = evaluate_base(checkpoint, eval_file, out, na_threshold=off)
        assert metrics["na_threshold"] is None and "best_f1" not in metrics
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.json", "question_scores.json"]


def saved_threshold(folder: Path, threshold: float, method: str = NA_METHOD) -> Path:
    record = {"threshold": threshold, "tuned_on": "3 validation questions of data/x", "val_f1": 50.0,
              "extractive": True, "method": method, "step": 3}  # fmt: skip
    (folder / NA_THRESHOLD_FILE).write_text(json.dumps(record))
    return folder / NA_THRESHOLD_FILE


def test_auto_reads_the_saved_threshold_falls_back_to_calibration_then_to_one_half(
    checkpoint, tmp_path, monkeypatch, capsys
):
    questions = sample_questions()
    eval_file = squad_file(tmp_path / "eval.json", questions)
    calibration_file = squad_file(tmp_path / "val.json", questions[::-1])
    trained = shutil.copytree(checkpoint, tmp_path / "trained")  # stands for a fully fine-tuned checkpoint
    path = saved_threshold(trained, 0.4321)

    metrics = evaluate_base(trained, eval_file, tmp_path / "auto", na_threshold="auto",
                            calibration_file=calibration_file)  # fmt: skip
    assert metrics["na_threshold"] == 0.4321 and metrics["na_threshold_source"] == f"saved: {path}"
    assert metrics["na_threshold_saved"]["tuned_on"] == "3 validation questions of data/x"
    assert "calibration_questions" not in metrics and "--calibration_file is not used" in capsys.readouterr().err
    assert evaluate_base(trained, eval_file, tmp_path / "default")["na_threshold"] == 0.4321  # auto, the default

    # Nothing saved: tuned on the calibration file; without one, 0.5 with a warning saying how to tune it.
    metrics = evaluate_base(checkpoint, eval_file, tmp_path / "tuned", na_threshold="auto",
                            calibration_file=calibration_file)  # fmt: skip
    assert metrics["na_threshold_source"] == "tuned on --calibration_file"
    assert metrics["calibration_questions"] == len(questions) and 0.0 <= metrics["na_threshold"] <= 1.0
    capsys.readouterr()
    assert resolve_na_threshold("auto", checkpoint) == (0.5, {"na_threshold_source": "0.5 (nothing saved or tuned)"})
    assert metrics["na_source"] == "span" and metrics["na_method"] == NA_METHOD  # recorded once the rule is known
    warning = capsys.readouterr().err
    assert f"{checkpoint} has no na_threshold.json" in warning and "--calibration_file" in warning

    # A broken file is a one-line error naming it; one tuned for another rule is ignored with a warning.
    (trained / NA_THRESHOLD_FILE).write_text('{"threshold": 1.5}')
    with pytest.raises(LitQAError, match=rf"^{path}: 'threshold' must be a number in \[0, 1\], got 1.5$"):
        resolve_na_threshold("auto", trained)
    saved_threshold(trained, 0.2, method="P(first token of the no-answer string)")
    assert resolve_na_threshold("auto", trained, calibration=True) == ("calibrate", {
        "na_threshold_source": "tuned on --calibration_file"})  # fmt: skip
    assert "ignoring" in capsys.readouterr().err
    for bad in (1.5, -0.1, "sometimes", True):
        with pytest.raises(LitQAError, match="--na_threshold must be auto, off or a number in"):
            resolve_na_threshold(bad)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_auto_is_the_default_of_the_adapter_scripts(checkpoint, tmp_path, method):
    model = load_model(checkpoint)[0]
    prepare = {"prepared_by": PREPARED_BY, "format_version": FORMAT_VERSION, "prompt_style": "plain",
               "no_answer": "unanswerable"}  # fmt: skip
    extra = {"prepare_config.json": prepare}
    if method == "lora":
        config = LoRAConfig(r=2, alpha=4)
        folder = save_lora_checkpoint(tmp_path / "lora", apply_lora(model, config), config, checkpoint,
                                      extra=extra)  # fmt: skip
    else:
        config = AdapterConfig(prompt_length=2, start_layer=1)
        folder = save_adapter_checkpoint(tmp_path / "adapter", apply_adapter(model, config), config, checkpoint,
                                         extra=extra)  # fmt: skip
    script = load_script(f"evaluate/{method}.py")
    assert script.Args().na_threshold == "auto"
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    saved_threshold(folder, 0.3)
    metrics = script.main(script.Args(eval_file=eval_file, out_dir=tmp_path / "out", max_new_tokens=4, device="cpu",
                                      precision="32-true", **{f"{method}_dir": folder}))  # fmt: skip
    assert metrics["na_threshold"] == 0.3 and metrics["na_threshold_source"].startswith("saved: ")


def test_prompt_settings_warn_on_another_chat_template_and_not_without_training_settings(tmp_path, capsys):
    tokenizer = Tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    trained = tmp_path / "trained"
    trained.mkdir()
    # Unknown training settings (no prepare_config.json, e.g. a zero-shot base): flags are taken as they are.
    assert prompt_settings(trained, None, "n/a", warn_if_unknown=False, tokenizer=tokenizer) == ("plain", "n/a")
    assert capsys.readouterr().err == ""
    prepare = {"prepared_by": PREPARED_BY, "format_version": FORMAT_VERSION, "prompt_style": "chat",
               "no_answer": "unanswerable", "chat_template_sha256": "0" * 64}  # fmt: skip
    (trained / "prepare_config.json").write_text(json.dumps(prepare))
    assert prompt_settings(trained, None, None, tokenizer=tokenizer) == ("chat", "unanswerable")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "chat template" in err and "000000000000" in err
    prepare["chat_template_sha256"] = chat_template_sha256(tokenizer)
    (trained / "prepare_config.json").write_text(json.dumps(prepare))
    assert prompt_settings(trained, None, None, tokenizer=tokenizer) == ("chat", "unanswerable")
    assert capsys.readouterr().err == ""
    prompt_settings(trained, "plain", None, tokenizer=tokenizer)  # another style: the template does not matter
    assert "chat template" not in capsys.readouterr().err


# ---- saved by training, used by evaluation ----


def test_training_saves_the_tuned_threshold_in_best_and_final_for_evaluation(prepared, tmp_path):  # noqa: F811
    _, checkpoint, data_dir, train_file = prepared
    result = finetune(tmp_path, checkpoint, data_dir, "--eval.f1_questions", "4")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    with open(next((run / "logs" / "csv").glob("version_*/metrics.csv"))) as f:
        rows = {int(row["step"]): row for row in csv.DictReader(f) if row.get("val/na_threshold")}
    assert sorted(rows) == [3, 6]
    best = json.loads((run / "best" / "best.json").read_text())
    for folder, step in ((run / "best", best["step"]), (run / "final", 6)):
        record = json.loads((folder / NA_THRESHOLD_FILE).read_text())
        assert record["threshold"] == pytest.approx(float(rows[step]["val/na_threshold"]))
        assert record["val_f1"] == pytest.approx(float(rows[step]["val/f1"])) and record["step"] == step
        assert record["tuned_on"] == f"4 validation questions of {data_dir}"
        assert record["method"] == NA_METHODS[record["source"]]
        assert record["extractive"] is True and 0.0 <= record["threshold"] <= 1.0
    assert not list(run.glob(f"step-*/{NA_THRESHOLD_FILE}"))  # resume checkpoints do not need one

    out = tmp_path / "eval"
    result = evaluate_script("evaluate/lora.py", lora_dir=run / "final", eval_file=train_file, out_dir=out, limit=8,
                             max_new_tokens=4, precision="32-true", device="cpu")  # fmt: skip
    saved = json.loads((run / "final" / NA_THRESHOLD_FILE).read_text())
    assert result["na_threshold"] == saved["threshold"]
    assert result["na_threshold_source"] == f"saved: {run / 'final' / NA_THRESHOLD_FILE}"
    assert len(json.loads((out / "na_probs.json").read_text())) == 8


def test_evaluation_with_a_saved_threshold_of_a_full_checkpoint(checkpoint, tmp_path):
    """evaluate/base.py reads na_threshold.json from a fully fine-tuned folder (finetune/full.py writes it there)."""
    model = tiny_model(seed=2)
    files = {name: checkpoint / name for name in ("tokenizer.json", "tokenizer_config.json")}
    full = save_checkpoint(tmp_path / "full", model.config, model.state_dict(), files)
    saved_threshold(full, 0.0)  # abstain on everything
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    metrics = evaluate_base(full, eval_file, tmp_path / "out")
    assert metrics["na_threshold"] == 0.0 and metrics["NoAns_exact"] == 100.0 and metrics["HasAns_f1"] == 0.0
