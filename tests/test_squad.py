# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""SQuAD metric and file-loading tests on hand-written cases (no data files needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_qa.data.squad import Question, load_predictions, load_squad
from lit_qa.errors import LitQAError
from lit_qa.evaluation.squad_metric import evaluate_predictions, exact_match, f1_score, normalize_answer

CONTEXT = "The Normans were in Normandy. They came from Norse raiders in the 10th century."


def question(qid: str, answers: list[str], context: str = CONTEXT) -> Question:
    starts = [context.find(a) for a in answers]
    return Question(qid, "Normans", context, "Q?", answers, starts, is_impossible=not answers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  a   quick\tbrown\n fox  ", "quick brown fox"),
        ("An apple, the pie.", "apple pie"),
        ("theater Anne", "theater anne"),  # articles only as whole words
        ("10th-century", "10thcentury"),  # punctuation is removed, not turned into a space
        ("“quoted” – dash", "“quoted” – dash"),  # only ASCII punctuation, as in the official script
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("the Normans.", "Normans") == 1
    assert exact_match("Norman", "Normans") == 0
    assert exact_match("", "") == 1
    assert exact_match("", "Normans") == 0


def test_f1_hand_computed():
    # pred {big, red, dog}, gold {red, dog, barked}: 2 shared, precision = recall = 2/3, F1 = 2/3.
    assert f1_score("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # A repeated word counts only as often as it appears on both sides: P = 1/3, R = 1, F1 = 0.5.
    assert f1_score("dog dog dog", "dog") == pytest.approx(0.5)
    # pred {in, 10th, century}, gold {10th, century}: P = 2/3, R = 1, F1 = 0.8.
    assert f1_score("in the 10th century", "10th century") == pytest.approx(0.8)
    assert f1_score("Normandy", "Norse raiders") == 0.0
    # Token multisets, not sets: pred {a, a, b}, gold {a, b, b}: 2 shared, P = R = 2/3.
    assert f1_score("a a b", "a b b") == pytest.approx(2 / 3)


def test_f1_empty_sides():
    assert f1_score("", "") == 1.0  # no answer predicted for an unanswerable question
    assert f1_score("the", "") == 1.0  # "the" normalizes to nothing
    assert f1_score("", "Normans") == 0.0
    assert f1_score("Normans", "") == 0.0


def test_evaluate_predictions_split_and_max_over_golds():
    dataset = [
        question("a1", ["Normandy", "in Normandy"]),  # several gold answers
        question("a2", ["Norse raiders"]),
        question("a3", ["10th century"]),
        question("n1", []),
        question("n2", []),
    ]
    predictions = {
        "a1": "in Normandy",  # exact on the second gold answer
        "a2": "raiders",  # F1: P = 1, R = 1/2 -> 2/3
        "a3": "",  # no answer to an answerable question
        "n1": "",  # correct abstention
        "n2": "Normandy",  # answered an unanswerable question
        "extra": "ignored",  # the official script ignores ids not in the dataset
    }
    result = evaluate_predictions(dataset, predictions)
    assert result["total"] == 5 and result["HasAns_total"] == 3 and result["NoAns_total"] == 2
    assert result["HasAns_exact"] == pytest.approx(100 / 3)
    assert result["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert result["NoAns_exact"] == result["NoAns_f1"] == pytest.approx(50.0)
    assert result["exact"] == pytest.approx(100 * 2 / 5)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 1 + 0) / 5)


def test_evaluate_predictions_gold_that_normalizes_to_nothing():
    # The official script drops gold answers that normalize to "" and then scores against [""], so an empty
    # prediction is right here, yet the question still counts as answerable.
    dataset = [question("a", ["The"], context="The end.")]
    assert evaluate_predictions(dataset, {"a": ""})["HasAns_exact"] == 100.0
    assert evaluate_predictions(dataset, {"a": "end"})["exact"] == 0.0


def test_evaluate_predictions_groups_and_errors():
    only_answerable = evaluate_predictions([question("a", ["Normandy"])], {"a": "normandy"})
    assert only_answerable == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 1,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 1,
    }
    with pytest.raises(LitQAError, match="no prediction for 1 of 2 questions, e.g. n"):
        evaluate_predictions([question("a", ["Normandy"]), question("n", [])], {"a": ""})
    with pytest.raises(LitQAError, match="no questions"):
        evaluate_predictions([], {})


def squad_v2() -> dict:
    return {
        "version": "v2.0",
        "data": [
            {
                "title": "Normans",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {
                                "question": "Where were the Normans?",
                                "id": "q1",
                                "answers": [
                                    {"text": "Normandy", "answer_start": 20},
                                    {"text": "in Normandy", "answer_start": 17},
                                ],
                                "is_impossible": False,
                            },
                            {
                                "plausible_answers": [{"text": "Norse", "answer_start": 44}],
                                "question": "Who raided Normandy in 1000?",
                                "id": "q2",
                                "answers": [],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }


def write(path: Path, data: dict | str | bytes) -> Path:
    if isinstance(data, dict):
        data = json.dumps(data)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_load_squad_v2(tmp_path: Path):
    questions = load_squad(write(tmp_path / "train.json", squad_v2()))
    assert questions == [
        Question("q1", "Normans", CONTEXT, "Where were the Normans?", ["Normandy", "in Normandy"], [20, 17], False),
        Question("q2", "Normans", CONTEXT, "Who raided Normandy in 1000?", [], [], True),
    ]


def test_load_squad_v1_has_no_is_impossible(tmp_path: Path):
    data = squad_v2()
    qas = data["data"][0]["paragraphs"][0]["qas"]
    del qas[1]
    del qas[0]["is_impossible"]
    data["version"] = "1.1"
    (q,) = load_squad(write(tmp_path / "v1.json", data))
    assert q.is_impossible is False and q.answers == ["Normandy", "in Normandy"]


def _qa(data: dict, i: int = 0) -> dict:
    return data["data"][0]["paragraphs"][0]["qas"][i]


def _breaks(change):
    data = squad_v2()
    change(data)
    return data


BAD_FILES = {
    "truncated": (json.dumps(squad_v2())[:150], "not valid JSON"),
    "not_json": ("title,context\nNormans,...", "not valid JSON: Expecting value (line 1, column 1)"),
    "non_utf8": (
        json.dumps(squad_v2()).replace("Normandy", "Norm\udcffandy", 1).encode("utf-8", "surrogateescape"),
        "not UTF-8 text: bad byte 0xff at offset",
    ),
    "top_level_list": ("[]", "top level must be a JSON object, got an array"),
    "no_data": ('{"version": "v2.0"}', "data is missing"),
    "title_type": (_breaks(lambda d: d["data"][0].update(title=7)), "data[0].title must be a string, got an integer"),
    "qas_type": (_breaks(lambda d: d["data"][0]["paragraphs"][0].update(qas={})), "paragraphs[0].qas must be an array"),
    "answer_start_type": (
        _breaks(lambda d: _qa(d)["answers"][0].update(answer_start="20")),
        "(id q1).answers[0].answer_start must be an integer, got a string",
    ),
    "is_impossible_type": (_breaks(lambda d: _qa(d).update(is_impossible="no")), "(id q1).is_impossible must be true"),
    "missing_id": (_breaks(lambda d: _qa(d, 1).pop("id")), "qas[1].id is missing"),
    "empty_context": (_breaks(lambda d: d["data"][0]["paragraphs"][0].update(context="  ")), "context is empty"),
    "empty_question": (_breaks(lambda d: _qa(d, 1).update(question="")), "(id q2): question is empty"),
    "answer_moved": (
        _breaks(lambda d: _qa(d)["answers"][0].update(answer_start=21)),
        "(id q1).answers[0]: answer 'Normandy' is not at answer_start 21",
    ),
    "answer_negative": (_breaks(lambda d: _qa(d)["answers"][0].update(answer_start=-60)), "(id q1).answers[0]"),
    "duplicate_id": (_breaks(lambda d: _qa(d, 1).update(id="q1")), "qas[1]: question id q1 appears more than once"),
    "impossible_with_answers": (
        _breaks(lambda d: _qa(d).update(is_impossible=True)),
        "(id q1): is_impossible is true but answers is not empty",
    ),
    "answerable_without_answers": (
        _breaks(lambda d: _qa(d, 1).update(is_impossible=False)),
        "(id q2): answerable question has no answers",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_load_squad_errors(tmp_path: Path, case: str):
    content, match = BAD_FILES[case]
    path = write(tmp_path / f"{case}.json", content)
    with pytest.raises(LitQAError) as info:
        load_squad(path)
    message = str(info.value)
    assert str(path) in message and match in message and "\n" not in message


def test_load_squad_missing_file(tmp_path: Path):
    with pytest.raises(LitQAError, match="does not exist"):
        load_squad(tmp_path / "nope.json")


def test_load_predictions(tmp_path: Path):
    path = write(tmp_path / "pred.json", {"q1": "Normandy", "q2": ""})
    assert load_predictions(path, ["q1", "q2"]) == {"q1": "Normandy", "q2": ""}

    with pytest.raises(LitQAError) as info:
        load_predictions(path, ["q1", "q3", "q4"])
    message = str(info.value)
    assert message == f"{path}: 2 question ids missing (e.g. q3) and 1 ids not in the dataset (e.g. q2)"

    for content, match in [
        ({"q1": None, "q2": ""}, "prediction for id q1 must be a string, got null"),
        ('["Normandy"]', "must hold a JSON object"),
        ("{", "not valid JSON"),
    ]:
        with pytest.raises(LitQAError, match=match):
            load_predictions(write(tmp_path / "bad.json", content), ["q1", "q2"])
