# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Prompt, sample, windowing, split and prepare-script tests on a tiny tokenizer trained in the test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_tokenizer

from lit_qa.data.dataset import IGNORE_INDEX, collate, load_prepared
from lit_qa.data.prepare import (
    QuestionEncoder,
    context_windows,
    encode_questions,
    length_stats,
    split_by_article,
    training_targets,
)
from lit_qa.data.prompts import NO_ANSWER, PROMPT_STYLES, answer_text, build_prompt
from lit_qa.data.squad import Question, load_squad
from lit_qa.errors import LitQAError
from lit_qa.models.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "prepare_squad.py"

FILLER = "Rivers and hills shape the land of every region. "


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer(tokenizer_dir)


def make_question(
    qid: str, context: str, answer: str | None, question: str = "Who ruled Normandy?", title: str = "T"
) -> Question:
    if answer is None:
        return Question(qid, title, context, question, [], [], True)
    return Question(qid, title, context, question, [answer], [context.index(answer)], False)


# ---- prompts ----


def test_build_prompt_plain():
    expected = (
        "Answer the question with a short span copied from the context. If the context does not contain the "
        'answer, reply "unanswerable".\n\n### Context:\nParis is in France.\n\n### Question:\nWhere is Paris?'
        "\n\n### Answer:\n"
    )
    assert build_prompt("Paris is in France.", "Where is Paris?") == expected
    assert build_prompt("{context}", "{q}", no_answer="n/a").count('reply "n/a"') == 1
    assert "### Context:\n{context}\n\n### Question:\n{q}\n" in build_prompt("{context}", "{q}")  # braces kept
    assert set(PROMPT_STYLES) == {"plain", "chat"} and NO_ANSWER == "unanswerable"
    with pytest.raises(LitQAError, match="unknown prompt style 'chatty'; choose one of: chat, plain"):
        build_prompt("c", "q", style="chatty")


def test_answer_text():
    assert answer_text(["Paris", "in Paris"]) == "Paris"
    assert answer_text([]) == "unanswerable"
    assert answer_text([], no_answer="none") == "none"


# ---- samples ----


@pytest.mark.parametrize("answer", ["the 10th century", None])
def test_prompt_masking(tokenizer: Tokenizer, answer: str | None):
    context = "The Normans were in Normandy in the 10th century."
    q = make_question("q", context, answer)
    result = QuestionEncoder(tokenizer, max_seq_length=512)(q)
    sample = result.sample
    assert not result.windowed and result.dropped is None and sample["id"] == "q"

    prompt_ids = tokenizer.encode(build_prompt(context, q.question))
    n = len(prompt_ids)
    assert prompt_ids[0].item() == tokenizer.bos_id  # BOS as the tokenizer's add_bos says
    assert torch.equal(sample["input_ids"][:n], prompt_ids)
    assert sample["input_ids"].dtype == sample["labels"].dtype == torch.long
    assert (sample["labels"][:n] == IGNORE_INDEX).all()
    assert (sample["labels"][n:] != IGNORE_INDEX).all()
    assert torch.equal(sample["labels"][n:], sample["input_ids"][n:])
    assert sample["labels"][-1].item() == tokenizer.eos_id
    target = answer if answer is not None else "unanswerable"
    assert tokenizer.decode(sample["labels"][n:]) == target + "</s>"


def long_context(answer_sentence: str, before: int, after: int) -> str:
    return FILLER * before + answer_sentence + " " + FILLER * after


def test_windowing_keeps_question_and_answer(tokenizer: Tokenizer):
    question = "Which duke ruled Normandy after the war?"
    context = long_context("Duke Richard the Fearless ruled Normandy.", before=30, after=10)
    q = make_question("w", context, "Richard the Fearless", question)
    encoder = QuestionEncoder(tokenizer, max_seq_length=160)
    assert len(encoder.prompt_ids(context, question)) > 160  # the test needs a context that does not fit

    result = encoder(q)
    assert result.windowed and result.dropped is None and result.full_length > 160
    ids, labels = result.sample["input_ids"], result.sample["labels"]
    assert len(ids) <= 160
    text = tokenizer.decode(ids)
    prompt_text = tokenizer.decode(ids[labels == IGNORE_INDEX])
    window = prompt_text.split("### Context:\n")[1].split("\n\n### Question:\n")[0]
    assert "Richard the Fearless" in window and window in context  # a verbatim piece of the context
    assert len(window) < len(context) and not context.startswith(window)  # not just the first window
    assert f"### Question:\n{question}\n\n### Answer:\n" in text
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "Richard the Fearless</s>"


def test_windowing_unanswerable_takes_first_window(tokenizer: Tokenizer):
    context = long_context("Nobody ruled here.", before=20, after=20)
    result = QuestionEncoder(tokenizer, max_seq_length=160)(make_question("u", context, None))
    assert result.windowed and len(result.sample["input_ids"]) <= 160
    text = tokenizer.decode(result.sample["input_ids"])
    assert "### Context:\n" + FILLER * 2 in text and "Nobody" not in text
    assert text.endswith("### Answer:\nunanswerable</s>")


def test_encode_questions_counts_and_drops(tokenizer: Tokenizer):
    short = "The Normans were in Normandy."
    questions = [
        make_question("a", short, "Normandy"),
        make_question("u", short, None),
        make_question("w", long_context("Rollo ruled Normandy.", before=30, after=5), "Rollo"),
        make_question("long_q", short, None, question="Why " * 200 + "?"),
        # An answer longer than any window: no window can hold it.
        make_question("long_a", FILLER * 30, (FILLER * 2).strip()),
    ]
    samples, stats = encode_questions(QuestionEncoder(tokenizer, max_seq_length=160), questions)
    assert [s["id"] for s in samples] == ["a", "u", "w"]
    assert stats["questions"] == 5 and stats["samples"] == 3
    assert (stats["answerable"], stats["unanswerable"], stats["windowed"]) == (2, 1, 1)
    assert stats["dropped"] == {"answer_not_in_window": 1, "no_room_for_context": 1}
    assert stats["tokens"]["max"] <= 160 < stats["full_tokens"]["max"]


def multi_answer_question(qid: str = "m") -> Question:
    context = "Rollo, the first duke, ruled Normandy. Duke Rollo ruled it well."
    answers = ["Rollo", "Duke Rollo", "Rollo", "the first duke", "Duke Rollo"]
    starts = [0, context.index("Duke Rollo"), context.index("Rollo", 10), context.index("the first duke"),
              context.index("Duke Rollo")]  # fmt: skip
    return Question(qid, "T", context, "Who ruled Normandy?", answers, starts, False)


def test_all_answers_one_sample_per_distinct_answer(tokenizer: Tokenizer):
    q = multi_answer_question()
    targets = training_targets(q, "all")
    # Distinct texts in file order, each at its first offset; a repeated "Rollo" at offset 45 adds nothing.
    assert [(t.answers, t.answer_starts) for t in targets] == [(["Rollo"], [0]), (["Duke Rollo"], [39]),
                                                              (["the first duke"], [7])]  # fmt: skip
    assert training_targets(q, "first") == [q]
    unanswerable = make_question("u", "Nothing here.", None)
    assert training_targets(unanswerable, "all") == [unanswerable]

    encoder = QuestionEncoder(tokenizer, max_seq_length=512)
    samples, stats = encode_questions(encoder, [q, unanswerable], answers="all")
    targets = [tokenizer.decode(s["labels"][s["labels"] != IGNORE_INDEX]) for s in samples]
    assert targets == ["Rollo</s>", "Duke Rollo</s>", "the first duke</s>", "unanswerable</s>"]
    assert [s["id"] for s in samples] == ["m", "m", "m", "u"]
    prompt = samples[0]["input_ids"][samples[0]["labels"] == IGNORE_INDEX]
    assert all(torch.equal(s["input_ids"][: len(prompt)], prompt) for s in samples[:3])  # one prompt, three targets
    assert (stats["questions"], stats["samples"], stats["extra_answer_samples"]) == (2, 4, 2)
    assert (stats["answerable"], stats["unanswerable"]) == (3, 1)

    first, first_stats = encode_questions(encoder, [q, unanswerable])
    assert [s["id"] for s in first] == ["m", "u"] and "extra_answer_samples" not in first_stats
    for a, b in zip(first, [samples[0], samples[3]], strict=True):  # "first" is the first sample of "all"
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(LitQAError, match="unknown answers mode"):
        encode_questions(encoder, [q], answers="every")


def test_all_answers_each_window_holds_its_answer(tokenizer: Tokenizer):
    context = "Duke Richard ruled Normandy. " + FILLER * 30 + "Then Rollo ruled the duchy. " + FILLER * 5
    answers = ["Duke Richard", "Rollo"]
    q = Question("w", "T", context, "Who ruled Normandy?", answers, [context.index(a) for a in answers], False)
    samples, stats = encode_questions(QuestionEncoder(tokenizer, max_seq_length=160), [q], answers="all")
    assert stats["windowed"] == 2 and stats["extra_answer_samples"] == 1
    windows = []
    for sample, answer in zip(samples, answers, strict=True):
        labels = sample["labels"]
        assert len(sample["input_ids"]) <= 160
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == answer + "</s>"
        prompt = tokenizer.decode(sample["input_ids"][labels == IGNORE_INDEX])
        windows.append(prompt.split("### Context:\n")[1].split("\n\n### Question:")[0])
        assert answer in windows[-1] and windows[-1] in context
    assert "Rollo" not in windows[0] and "Richard" not in windows[1]  # two different windows


def test_context_windows():
    spans = [(2 * i, 2 * i + 1) for i in range(10)]
    assert context_windows(spans, [1] * 10, budget=4) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert context_windows(spans[:3], [1, 1, 1], budget=4) == [(0, 3)]
    # A word over budget forms its own window, and the walk still moves on.
    assert context_windows(spans[:3], [1, 5, 1], budget=3) == [(0, 1), (1, 2), (2, 3)]


def test_length_stats():
    assert length_stats([]) == {}
    stats = length_stats(list(range(1, 101)))
    assert stats == {"min": 1, "mean": 50.5, "p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}


# ---- split ----


def test_split_by_article():
    questions = [
        make_question(f"{t}-{i}", "Normandy.", "Normandy", title=f"article{t}") for t in range(20) for i in range(3)
    ]
    train, val = split_by_article(questions, val_fraction=0.2, seed=1)
    train_titles, val_titles = {q.title for q in train}, {q.title for q in val}
    assert not train_titles & val_titles and len(val_titles) == 4 and len(train) + len(val) == 60
    assert split_by_article(questions, 0.2, seed=1) == (train, val)  # deterministic
    assert {q.title for q in split_by_article(questions, 0.2, seed=2)[1]} != val_titles
    assert len({q.title for q in split_by_article(questions, 0.001, seed=1)[1]}) == 1  # at least one article
    with pytest.raises(LitQAError, match="val_fraction must be between 0 and 1"):
        split_by_article(questions, 0.0, seed=1)
    with pytest.raises(LitQAError, match="at least two articles"):
        split_by_article(questions[:3], 0.5, seed=1)


# ---- batches and prepared files ----


def test_collate():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8, 9]), "labels": torch.tensor([-100, 9])},
    ]
    batch = collate(samples, pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 9, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 6, 7], [-100, 9, -100]]))
    cut = collate(samples, pad_id=0, max_length=2)
    assert torch.equal(cut["input_ids"], torch.tensor([[5, 6], [8, 9]]))
    assert collate(samples[1:], pad_id=0, max_length=10)["input_ids"].shape == (1, 2)  # no padding past the longest
    rounded = collate(samples, pad_id=7, pad_multiple=4)
    assert rounded["input_ids"].shape[1] % 4 == 0 and rounded["input_ids"].shape[1] >= batch["input_ids"].shape[1]
    assert (rounded["labels"][:, batch["input_ids"].shape[1] :] == -100).all()


def test_load_prepared_errors(tmp_path: Path):
    with pytest.raises(LitQAError, match="prepare_config.json does not exist"):
        load_prepared(tmp_path, "train")
    (tmp_path / "prepare_config.json").write_text('{"prepared_by": "someone else"}')
    with pytest.raises(LitQAError, match="not written by scripts/prepare_squad.py"):
        load_prepared(tmp_path, "train")
    with pytest.raises(LitQAError, match="unknown split 'test'"):
        load_prepared(tmp_path, "test")


# ---- the script ----


def tiny_squad(multi: bool = False) -> dict:
    """Six articles; one paragraph each has an answerable and an unanswerable question. With ``multi``, each
    answerable question lists three gold answers, two of them distinct."""
    articles = []
    for a in range(6):
        context = f"Article {a}: the Normans were in Normandy in the {a + 10}th century. " + FILLER * (a % 3)
        answers = [{"text": f"the {a + 10}th century", "answer_start": context.index("the 1")}]
        if multi:
            answers += [{"text": f"{a + 10}th century", "answer_start": context.index(f"{a + 10}th")}, answers[0]]
        qas = [
            {"question": "When were the Normans in Normandy?", "id": f"a{a}", "answers": answers,
             "is_impossible": False},
            {"question": "Who were the Saxons?", "id": f"u{a}", "answers": [], "is_impossible": True},
        ]  # fmt: skip
        articles.append({"title": f"Article_{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "v2.0", "data": articles}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO)


def load_script_module():
    spec = importlib.util.spec_from_file_location("prepare_squad", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_end_to_end(tmp_path: Path, tokenizer_dir: Path):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(tiny_squad()))
    out_dir = tmp_path / "out"
    args = ["--train_file", str(train_file), "--checkpoint_dir", str(tokenizer_dir), "--val_fraction", "0.34"]
    result = run_script(*args, "--out_dir", str(out_dir), "--max_seq_length", "256")
    assert result.returncode == 0, result.stderr
    assert "train: 8 samples from 8 questions in 4 articles" in result.stdout
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["prepare_config.json", "stats.json", "train.pt", "val-v2.0.json", "val.pt"]

    train, val = load_prepared(out_dir, "train"), load_prepared(out_dir, "val")
    assert len(train) == 8 and len(val) == 4
    assert torch.load(out_dir / "val.pt", weights_only=True)[0].keys() == {"id", "input_ids", "labels", "paragraph"}
    # Both questions of a paragraph record its index; packed, their common prompt start is counted once.
    assert [s["paragraph"] for s in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    shared = 0
    for first, second in zip(train[::2], train[1::2]):
        prompt = int((first["labels"] == -100).sum())
        shared += next(i for i in range(prompt) if first["input_ids"][i] != second["input_ids"][i])
    packing = json.loads((out_dir / "stats.json").read_text())["train"]["packing"]
    tokens = sum(len(s["input_ids"]) for s in train)
    assert packing == {"packs": 4, "packed_samples": 8, "questions_per_pack": 2.0, "single_samples": 0,
                       "tokens": tokens, "packed_tokens": tokens - shared,
                       "tokens_saved": round(shared / tokens, 4)}  # fmt: skip
    assert shared > tokens / 3 and "packed by paragraph: 4 packs" in result.stdout
    val_squad = load_squad(out_dir / "val-v2.0.json")
    assert sorted(q.id for q in val_squad) == sorted(s["id"] for s in val)
    train_titles = {q.title for q in load_squad(train_file) if q.id in {s["id"] for s in train}}
    assert not train_titles & {q.title for q in val_squad}

    config = json.loads((out_dir / "prepare_config.json").read_text())
    assert config["max_seq_length"] == 256 and config["prompt_style"] == "plain" and config["seed"] == 42
    assert config["no_answer"] == "unanswerable" and len(config["train_file"]["sha256"]) == 64
    assert config["tokenizer"]["vocab_size"] == Tokenizer(tokenizer_dir).vocab_size
    stats = json.loads((out_dir / "stats.json").read_text())
    assert stats["val"]["samples"] == 4 and stats["val"]["articles"] == 2

    # Other settings in a prepared folder: refused, then replaced with a bare --overwrite.
    refused = run_script(*args, "--out_dir", str(out_dir), "--max_seq_length", "200")
    assert refused.returncode == 2 and "differs in: max_seq_length" in refused.stderr
    assert run_script(*args, "--out_dir", str(out_dir), "--max_seq_length", "200", "--overwrite").returncode == 0
    assert json.loads((out_dir / "prepare_config.json").read_text())["max_seq_length"] == 200


def test_script_all_answers(tmp_path: Path, tokenizer_dir: Path):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(tiny_squad(multi=True)))
    main = load_script_module().main
    args = dict(train_file=train_file, checkpoint_dir=tokenizer_dir, max_seq_length=256, val_fraction=0.34)
    main(**args, out_dir=tmp_path / "default")
    main(**args, out_dir=tmp_path / "first", answers="first")
    for name in ("train.pt", "val.pt", "val-v2.0.json", "stats.json", "prepare_config.json"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    assert "answers" not in json.loads((tmp_path / "first" / "prepare_config.json").read_text())

    stats = main(**args, out_dir=tmp_path / "all", answers="all")
    train, val = load_prepared(tmp_path / "all", "train"), load_prepared(tmp_path / "all", "val")
    # 4 train articles: 4 answerable questions x 2 distinct answers + 4 unanswerable; val stays one per question.
    assert (len(train), stats["train"]["extra_answer_samples"], stats["train"]["questions"]) == (12, 4, 8)
    assert len(val) == 4 and "extra_answer_samples" not in stats["val"]
    assert (tmp_path / "all" / "val.pt").read_bytes() == (tmp_path / "first" / "val.pt").read_bytes()
    answers = [tokenizer_decode_answer(tokenizer_dir, s) for s in train if s["id"] == train[0]["id"]]
    assert len(answers) == 2 and answers[1] == answers[0].removeprefix("the ")
    assert json.loads((tmp_path / "all" / "prepare_config.json").read_text())["answers"] == "all"
    assert json.loads((tmp_path / "all" / "stats.json").read_text())["train"]["extra_answer_samples"] == 4

    # Back to "first" in the same folder: the recorded "answers" differs, so it is refused without --overwrite.
    with pytest.raises(LitQAError, match="differs in: answers"):
        main(**args, out_dir=tmp_path / "all")


def test_script_extra_training_file_adds_only_new_articles_to_train(tmp_path: Path, tokenizer_dir: Path):
    """Like dev-v1.1.json beside the demo files: its articles that the training or evaluation file holds are left
    out; the rest train, never validate; an evaluation question id among them is refused."""
    data = tiny_squad()
    train_file, eval_file, extra_file = tmp_path / "train.json", tmp_path / "eval.json", tmp_path / "extra.json"
    train_file.write_text(json.dumps({"version": "v2.0", "data": data["data"][:4]}))
    eval_file.write_text(json.dumps({"version": "v2.0", "data": data["data"][4:5]}))
    extra = [dict(article, paragraphs=[dict(p, qas=[dict(qa, id=f"x{qa['id']}") for qa in p["qas"]])
                                       for p in article["paragraphs"]]) for article in data["data"]]  # fmt: skip
    extra_file.write_text(json.dumps({"version": "v1.1", "data": extra}))  # articles 0-5 again, under new ids
    main = load_script_module().main
    args = dict(train_file=train_file, eval_file=eval_file, checkpoint_dir=tokenizer_dir, max_seq_length=256,
                val_fraction=0.25)  # fmt: skip
    plain = main(**args, out_dir=tmp_path / "plain")
    stats = main(**args, extra_train_file=extra_file, out_dir=tmp_path / "extra")
    # Only article 5 is new: its two questions join train; validation is unchanged.
    assert stats["train"]["extra_questions"] == 2 and stats["train"]["samples"] == plain["train"]["samples"] + 2
    train = load_prepared(tmp_path / "extra", "train")
    assert {s["id"] for s in train} - {s["id"] for s in load_prepared(tmp_path / "plain", "train")} == {"xa5", "xu5"}
    assert (tmp_path / "extra" / "val.pt").read_bytes() == (tmp_path / "plain" / "val.pt").read_bytes()
    config = json.loads((tmp_path / "extra" / "prepare_config.json").read_text())
    assert config["extra_train_file"]["path"] == str(extra_file) and "extra_train_file" not in json.loads(
        (tmp_path / "plain" / "prepare_config.json").read_text())  # fmt: skip

    with pytest.raises(LitQAError, match="needs --eval_file"):
        main(train_file=train_file, checkpoint_dir=tokenizer_dir, extra_train_file=extra_file, out_dir=tmp_path / "o")
    leaking = json.loads(extra_file.read_text())
    leaking["data"][5]["paragraphs"][0]["qas"][0]["id"] = "a4"  # an evaluation question's id
    extra_file.write_text(json.dumps(leaking))
    with pytest.raises(LitQAError, match="shares 1 question ids"):
        main(**args, extra_train_file=extra_file, out_dir=tmp_path / "o")


def tokenizer_decode_answer(tokenizer_dir: Path, sample: dict) -> str:
    labels = sample["labels"]
    return Tokenizer(tokenizer_dir).decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)


def test_script_is_deterministic(tmp_path: Path, tokenizer_dir: Path):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(tiny_squad()))
    main = load_script_module().main
    for out in ("one", "two"):
        main(train_file=train_file, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / out, max_seq_length=128)
    main(train_file=train_file, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "two", max_seq_length=128)  # same
    for name in ("train.pt", "val.pt", "val-v2.0.json", "stats.json", "prepare_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert not list((tmp_path / "two").glob(".*tmp"))  # no temporary files left behind


def test_script_input_errors(tmp_path: Path, tokenizer_dir: Path):
    bad = tmp_path / "bad.json"
    data = tiny_squad()
    data["data"][1]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    bad.write_text(json.dumps(data))
    args = ["--train_file", str(bad), "--checkpoint_dir", str(tokenizer_dir), "--out_dir", str(tmp_path / "o")]
    result = run_script(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert str(bad) in result.stderr and "(id a1)" in result.stderr and "not at answer_start" in result.stderr
    assert not (tmp_path / "o").exists()

    main = load_script_module().main
    good = tmp_path / "good.json"
    good.write_text(json.dumps(tiny_squad()))
    with pytest.raises(LitQAError, match="shares 12 question ids"):
        main(train_file=good, eval_file=good, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o")
    with pytest.raises(LitQAError, match="pass --train_file, or --download"):
        main(data_dir=tmp_path / "empty", checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o")
    with pytest.raises(LitQAError, match="unknown prompt style"):
        main(train_file=good, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o", prompt_style="chatty")
    with pytest.raises(LitQAError, match="needs a chat template, but .* has none"):
        main(train_file=good, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o", prompt_style="chat")
    with pytest.raises(LitQAError, match="unknown --answers 'every'; choose one of: first, all"):
        main(train_file=good, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o", answers="every")
    with pytest.raises(LitQAError, match="no train samples left"):
        main(train_file=good, checkpoint_dir=tokenizer_dir, out_dir=tmp_path / "o", max_seq_length=20)


def test_load_prepared_rejects_corrupt_file(tmp_path: Path, tokenizer_dir: Path):
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(tiny_squad()))
    out_dir = tmp_path / "out"
    load_script_module().main(train_file=train_file, checkpoint_dir=tokenizer_dir, out_dir=out_dir)
    (out_dir / "train.pt").write_bytes((out_dir / "train.pt").read_bytes()[:100])
    with pytest.raises(LitQAError, match=r"train\.pt is not a readable prepared split \(truncated or not a PyTorch "
                       r"file\): PytorchStreamReader failed reading zip archive: failed finding central directory$"):
        load_prepared(out_dir, "train")
    torch.save({"not": "a list"}, out_dir / "val.pt")
    with pytest.raises(LitQAError, match="must hold a list of samples"):
        load_prepared(out_dir, "val")


def test_download_uses_official_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # file:// URLs stand in for the official ones: the test never touches the network.
    source = tmp_path / "source.json"
    source.write_text(json.dumps(tiny_squad()))
    module = load_script_module()
    monkeypatch.setattr(module, "SQUAD_URLS", {"train-v2.0.json": source.as_uri()})
    module.download_squad(tmp_path / "data")
    assert (tmp_path / "data" / "train-v2.0.json").read_bytes() == source.read_bytes()
    assert set(load_script_module().SQUAD_URLS) == {"train-v2.0.json", "dev-v2.0.json"}
