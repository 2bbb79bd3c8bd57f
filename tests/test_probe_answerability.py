# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""scripts/probe_answerability.py: the hidden states it reads, the probe it fits, and the report it writes."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import load_script, make_tiny_checkpoint, run_script
from test_evaluation import make_question, squad_file

from lit_qa.checkpoints.folder import load_model
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.evaluation.answering import prompt_for
from lit_qa.models.tokenizer import Tokenizer

probe = load_script("scripts/probe_answerability.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("probe"))


def questions(n: int, signal: bool, seed: int = 0) -> list:
    """Half unanswerable. With ``signal`` every unanswerable question ends in a word no answerable one has."""
    rng = random.Random(seed)
    words = ["river", "city", "king", "year", "war", "hill", "duke", "church"]
    out = []
    for i in range(n):
        unanswerable = i % 2 == 1
        question = " ".join(rng.choice(words) for _ in range(4)) + (" never?" if signal and unanswerable else "?")
        context = " ".join(rng.choice(words) for _ in range(12)) + " Paris."
        out.append(make_question(f"q{i}", context, None if unanswerable else "Paris", question))
    return out


def test_right_padded_batches_give_each_prompt_its_own_states(checkpoint):
    model, _ = load_model(checkpoint)
    encoder = QuestionEncoder(Tokenizer(checkpoint), model.max_seq_length)
    qs = questions(5, signal=True)
    batched, labels = probe.last_token_states(model, encoder, qs, 3, "test")
    alone, _ = probe.last_token_states(model, encoder, qs, 1, "test")
    assert batched.shape == (5, model.config.n_layer, model.config.n_embd)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    # The last layer's state is the model's own final hidden state before its norm.
    ids = prompt_for(encoder, qs[2])[0]
    states = {}
    hook = model.transformer.h[-1].register_forward_hook(lambda _m, _i, out: states.setdefault("last", out))
    with torch.no_grad():
        model.hidden_states(ids[None])
    hook.remove()
    torch.testing.assert_close(batched[2, -1], states["last"][0, -1], atol=1e-5, rtol=1e-5)


def test_the_probe_finds_a_linear_signal_and_not_a_missing_one():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=generator)
    y = (x[:, 3] + 0.3 * torch.randn(400, generator=generator) > 0).float()
    x_eval = torch.randn(200, 16, generator=generator)
    y_eval = (x_eval[:, 3] > 0).float()
    assert probe.fit_and_score(x, y, x_eval, y_eval, seed=0)["eval_auc"] > 0.95
    # Labels that no feature predicts: chance on held-out labels of the same kind.
    noise, eval_noise = (torch.randint(0, 2, (n,), generator=generator).float() for n in (400, 200))
    assert 0.35 < probe.fit_and_score(x, noise, x_eval, eval_noise, seed=0)["eval_auc"] < 0.65


def test_script_reports_every_layer_and_keeps_an_existing_report(checkpoint, tmp_path):
    train_file = squad_file(tmp_path / "train.json", questions(60, signal=True, seed=1))
    eval_file = squad_file(tmp_path / "eval.json", questions(30, signal=True, seed=2))
    out = tmp_path / "out"
    args = ["--checkpoint_dir", str(checkpoint), "--train_file", str(train_file), "--eval_file", str(eval_file),
            "--out_dir", str(out), "--train_questions", "60", "--limit", "30", "--precision", "32-true"]  # fmt: skip
    result = run_script("scripts/probe_answerability.py", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "probe.json").read_text())
    assert len(report["layers"]) == 2 and report["train_questions"] == 60 and report["eval_questions"] == 30
    # The word that marks unanswerable questions is the prompt's last question word: the probe must find it.
    best = report["layers"][report["best_layer"]]
    assert best["held_out_auc"] == max(layer["held_out_auc"] for layer in report["layers"])  # not chosen on eval
    assert report["best_eval_auc"] == best["eval_auc"] > 0.9 and "best layer on held-out" in result.stdout

    again = run_script("scripts/probe_answerability.py", *args)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert json.loads((out / "probe.json").read_text()) == report

    one_kind = squad_file(tmp_path / "one.json", [q for q in questions(20, signal=False) if q.answers])
    refused = run_script("scripts/probe_answerability.py", *args[:4], "--eval_file", str(one_kind),
                         "--out_dir", str(tmp_path / "x"))  # fmt: skip
    assert refused.returncode == 2 and "answerable and unanswerable" in refused.stderr
