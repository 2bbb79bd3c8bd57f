# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Hostile inputs through the command lines: each gives one ``error:`` line naming the file, field or id, and
leaves nothing behind that looks like a finished result; Unicode and huge paragraphs just work.

The scripts run in this process through `run_cli` (what their ``__main__`` does), which is fast and still
shows the line a user sees. Unit-level cases live elsewhere and are not repeated here: malformed SQuAD files
in test_squad.py, broken checkpoints in test_checkpoint.py, predictions files with missing or extra ids in
test_squad.py::test_load_predictions, negative lr / micro batch > global batch / LoRA rank 0 in
test_finetune_lora.py::test_bad_arguments_give_one_line_errors.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import evaluate_script, fake_decoding, load_script, make_tiny_checkpoint
from safetensors.torch import save_file
from test_squad import squad_v2

from lit_qa.checkpoints.folder import WEIGHTS_FILE, load_model, load_state_dict
from lit_qa.data.dataset import load_prepared
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.squad import load_squad
from lit_qa.errors import LitQAError, run_cli
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.squad_metric import evaluate_predictions, exact_match, f1_score, normalize_answer
from lit_qa.models.config import CONFIG_FILE
from lit_qa.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hostile"))


def cli(capsys, script: str, *args: str) -> list[str]:
    """Run a script's command line here; it must fail with status 2. Returns the lines it wrote to stderr."""
    module = load_script(script)
    sys.modules[module.__name__] = module  # jsonargparse resolves the signature's types through it
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(module.setup if hasattr(module, "setup") else module.main, list(args))
    finally:
        del sys.modules[module.__name__]
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def write_squad(path: Path, data: dict | str | bytes) -> Path:
    data = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _qa(data: dict, i: int = 0) -> dict:
    return data["data"][0]["paragraphs"][0]["qas"][i]


def _edit(change) -> dict:
    data = squad_v2()
    change(data)
    return data


BAD_EVAL_FILES = {
    "truncated": (json.dumps(squad_v2())[:200], "is not valid JSON"),
    "not_json": ("id,question\nq1,Where?", "is not valid JSON: Expecting value (line 1, column 1)"),
    "not_utf8": (json.dumps(squad_v2()).encode("utf-16"), "is not UTF-8 text"),
    "wrong_type": (_edit(lambda d: _qa(d).update(question=["Where?"])), "(id q1).question must be a string"),
    "empty_context": (_edit(lambda d: d["data"][0]["paragraphs"][0].update(context="")), "context is empty"),
    "answer_not_in_context": (_edit(lambda d: _qa(d)["answers"][0].update(text="Paris")), "answer 'Paris' is not at"),
    "duplicate_id": (_edit(lambda d: _qa(d, 1).update(id="q1")), "question id q1 appears more than once"),
}


@pytest.mark.parametrize("case", BAD_EVAL_FILES)
def test_a_malformed_eval_file_is_one_line_before_anything_is_written(checkpoint, tmp_path, capsys, case):
    content, message = BAD_EVAL_FILES[case]
    eval_file = write_squad(tmp_path / "eval.json", content)
    out = tmp_path / "out"
    lines = cli(capsys, "evaluate/base.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file),
                "--out_dir", str(out))  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith(f"error: {eval_file}") and message in lines[0], lines
    assert not out.exists()


def break_tensors(folder: Path, edit) -> None:
    tensors = load_state_dict(folder)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS_FILE)


def swap_in_a_bigger_tokenizer(folder: Path) -> None:
    """Replace the tokenizer with one of 576 tokens: the model's 512 embedding rows cannot cover it."""
    from tokenizers import Tokenizer as HFTokenizer

    other = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    other.add_tokens([f"<extra_{i}>" for i in range(576 - other.get_vocab_size())])
    other.save(str(folder / "tokenizer.json"))


ZEROS = torch.zeros(32)
BROKEN_CHECKPOINTS = {
    "missing tensor": (lambda f: break_tensors(f, lambda t: t.pop("transformer.ln_f.weight")),
                       "missing tensors transformer.ln_f.weight"),
    "extra tensor": (lambda f: break_tensors(f, lambda t: t.update({"transformer.h.0.attn.q_proj.bias": ZEROS})),
                     "unexpected tensors transformer.h.0.attn.q_proj.bias"),
    "wrong shape": (lambda f: break_tensors(f, lambda t: t.update({"transformer.h.1.mlp.up_proj.weight": ZEROS})),
                    "transformer.h.1.mlp.up_proj.weight has shape (32,) but the config expects (64, 32)"),
    "truncated": (lambda f: (f / WEIGHTS_FILE).write_bytes((f / WEIGHTS_FILE).read_bytes()[:5000]),
                  f"{WEIGHTS_FILE} is not a readable safetensors file"),
    "config of another model": (
        lambda f: (f / CONFIG_FILE).write_text(json.dumps({**json.loads((f / CONFIG_FILE).read_text()), "n_layer": 3})),
        "missing tensors transformer.h.2."),
    "tokenizer of another model": (swap_in_a_bigger_tokenizer, "576 tokens but the model's vocabulary has 512 rows"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_a_broken_checkpoint_is_one_line_naming_the_file(checkpoint, tmp_path, capsys, case):
    broken = shutil.copytree(checkpoint, tmp_path / "ckpt")
    edit, message = BROKEN_CHECKPOINTS[case]
    edit(broken)
    eval_file = write_squad(tmp_path / "eval.json", squad_v2())
    out = tmp_path / "out"
    lines = cli(capsys, "evaluate/base.py", "--checkpoint_dir", str(broken), "--eval_file", str(eval_file),
                "--out_dir", str(out))  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(broken) in lines[0], lines
    assert message in lines[0], lines
    assert not out.exists()


# ---- out-of-range values and output folders ----


@pytest.fixture(scope="module")
def data_dir(checkpoint, tmp_path_factory) -> Path:
    from test_finetune_lora import squad_file

    root = tmp_path_factory.mktemp("data")
    load_script("scripts/prepare_squad.py").main(train_file=squad_file(root / "train.json", articles=4),
                                                 out_dir=root / "prepared", checkpoint_dir=checkpoint,
                                                 max_seq_length=128, val_fraction=0.25)  # fmt: skip
    return root / "prepared"


def finetune_args(checkpoint: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint), "--out_dir", str(out),
            "--precision", "32-true", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
            "--train.max_steps", "1", "--eval.num_samples", "0", *extra]  # fmt: skip


def test_max_seq_length_shorter_than_the_prompt_is_one_line_not_a_nan(checkpoint, data_dir, tmp_path, capsys):
    shortest = min(len(s["input_ids"]) for s in load_prepared(data_dir, "train"))
    out = tmp_path / "run"
    lines = cli(capsys, "finetune/lora.py", *finetune_args(checkpoint, data_dir, out, "--train.max_seq_length", "10"))
    assert lines[-1].startswith("error: cropping samples to 10 tokens (--train.max_seq_length or the model's limit) "
                                "leaves no answer token in 12 of 12 training samples (e.g. ")  # fmt: skip
    assert shortest > 10 and "non-finite" not in lines[-1]
    assert not list(out.glob("step-*")) and not (out / "final").exists()


@pytest.mark.parametrize("flag, value", [("--devices", "0"), ("--devices", "-1"), ("--num_nodes", "0")])
def test_no_devices_or_nodes_is_one_line(checkpoint, data_dir, tmp_path, capsys, flag, value):
    lines = cli(capsys, "finetune/lora.py", *finetune_args(checkpoint, data_dir, tmp_path / "run", flag, value))
    assert lines[-1].startswith("error: ") and flag[2:] in lines[-1]


def test_data_prepared_with_a_same_size_tokenizer_of_another_model_is_refused(checkpoint, data_dir, tmp_path, capsys):
    other = shutil.copytree(checkpoint, tmp_path / "other")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, other ids
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    lines = cli(capsys, "finetune/lora.py", *finetune_args(other, data_dir, tmp_path / "run"))
    assert "prepared with another tokenizer" in lines[-1]


def test_conversion_never_writes_into_a_non_empty_folder_without_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    lines = cli(capsys, "scripts/convert_checkpoint.py", "--to", "hf", "--source", str(checkpoint), "--out_dir",
                str(out))  # fmt: skip
    assert lines == [f"error: {out} already exists and is not empty; pass --overwrite to replace it"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ---- inputs that must just work ----

# A paragraph with combining marks (the "é" of "café" is "e" + U+0301), right-to-left scripts and emoji; the
# answer_start offsets count code points, as Python (and the official SQuAD files) do.
UNICODE_CONTEXT = ("Der Kölner Dom 🏰 wurde 1248 begonnen 🎉. Sein hebräischer Name ist קתדרלת קלן. "
                   "Im Cafe\u0301 « Noé » sagt man مرحبا بالعالم zur Begrüßung.")  # fmt: skip
UNICODE_QAS = [
    ("Wann wurde der Kölner Dom 🏰 begonnen?", "1248 begonnen 🎉"),
    ("מה השם העברי?", "קתדרלת קלן"),
    ("Wie heißt das Café?", "Cafe\u0301 « Noé »"),
    ("Was sagt man zur Begrüßung?", "مرحبا بالعالم"),
    ("Wer hat den Dom gebaut? 🤷", None),
]


def unicode_squad() -> dict:
    qas = [{"id": f"u{i}", "question": question, "is_impossible": answer is None,
            "answers": [] if answer is None else [{"text": answer, "answer_start": UNICODE_CONTEXT.index(answer)}]}
           for i, (question, answer) in enumerate(UNICODE_QAS)]  # fmt: skip
    return {"version": "v2.0", "data": [{"title": "Köln 🏰", "paragraphs": [{"context": UNICODE_CONTEXT, "qas": qas}]}]}


def test_unicode_answers_score_as_the_official_script_scores_them():
    # Lower-casing and ASCII punctuation removal work on any script; other punctuation (« ») is kept.
    assert normalize_answer("CAFE\u0301 « Noé »!") == "cafe\u0301 « noé »"
    assert exact_match("Cafe\u0301 « Noé ».", "cafe\u0301 « noé »") == 1
    assert exact_match("קתדרלת קלן", "קתדרלת קלן") == 1 and f1_score("קתדרלת", "קתדרלת קלן") == pytest.approx(2 / 3)
    assert f1_score("مرحبا", "مرحبا بالعالم") == pytest.approx(2 / 3)
    # Emoji are tokens like any other: the same tokens in another order are F1 1 but not an exact match.
    assert exact_match("🎉 1248 begonnen", "1248 begonnen 🎉") == 0
    assert f1_score("🎉 1248 begonnen", "1248 begonnen 🎉") == 1.0
    # Like the official script, no Unicode normalisation: precomposed "é" and "e" + U+0301 differ.
    assert exact_match("caf\u00e9", "cafe\u0301") == 0


def test_unicode_questions_and_answers_prepare_and_evaluate(checkpoint, tmp_path, monkeypatch):
    squad = write_squad(tmp_path / "unicode.json", unicode_squad())
    questions = load_squad(squad)
    assert [q.answers for q in questions] == [[a] if a else [] for _, a in UNICODE_QAS]
    tokenizer = Tokenizer(checkpoint)
    encoder = QuestionEncoder(tokenizer, max_seq_length=256)
    for question in questions:  # the training target is the answer, byte for byte, then EOS
        sample = encoder(question).sample
        target = sample["labels"][sample["labels"] != -100]
        assert target[-1] == tokenizer.eos_id
        assert tokenizer.decode(target[:-1]) == (question.answers[0] if question.answers else encoder.no_answer)

    def answer_perfectly(prompts):
        texts = [tokenizer.decode(prompt) for prompt in prompts]
        return [tokenizer.encode(" " + next(a or "unanswerable" for q, a in UNICODE_QAS if q in text) + "\n", bos=False)
                for text in texts]  # fmt: skip

    fake_decoding(monkeypatch, answer_perfectly)
    out = tmp_path / "out"
    metrics = evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint, eval_file=squad, out_dir=out,
                              device="cpu", precision="32-true", na_threshold=None)  # fmt: skip
    assert metrics["exact"] == metrics["f1"] == 100.0
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert predictions == {q.id: (q.answers[0] if q.answers else "") for q in questions}
    assert evaluate_predictions(questions, predictions)["exact"] == 100.0


def test_a_huge_paragraph_is_windowed_not_a_crash(checkpoint, tmp_path):
    filler = "Rivers and hills shape the land of every region. " * 3000  # 27,000 words, 150,000 characters
    context = filler + "Rollo ruled the duchy of Normandy after 911. " + filler
    data = {"version": "v2.0", "data": [{"title": f"Huge {a}", "paragraphs": [{"context": context, "qas": [
        {"id": f"h{a}", "question": "Who ruled the duchy of Normandy?", "is_impossible": False,
         "answers": [{"text": "Rollo", "answer_start": context.index("Rollo")}]},
        {"id": f"n{a}", "question": "Which river flows through Paris?", "is_impossible": True, "answers": []},
    ]}]} for a in range(2)]}  # fmt: skip
    squad = write_squad(tmp_path / "huge.json", data)
    stats = load_script("scripts/prepare_squad.py").main(train_file=squad, checkpoint_dir=checkpoint,
                                                         out_dir=tmp_path / "prepared", max_seq_length=128,
                                                         val_fraction=0.5)  # fmt: skip
    assert stats["train"]["windowed"] == 2 and not stats["train"]["dropped"]
    tokenizer = Tokenizer(checkpoint)
    for sample in load_prepared(tmp_path / "prepared", "train"):
        assert len(sample["input_ids"]) <= 128
        if sample["id"].startswith("h"):  # the window holds the answer
            assert "Rollo ruled" in tokenizer.decode(sample["input_ids"])
    # Evaluation windows the same paragraph to what the model can take.
    model = load_model(checkpoint)[0]
    answers = score_questions(model, tokenizer, load_squad(squad), DecodingSettings(max_new_tokens=4)).final
    assert sorted(answers) == ["h0", "h1", "n0", "n1"]


def write_config(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``checkpoint`` whose lit_config.json has ``changes`` (a value of None removes the key)."""
    folder = tmp_path / "edited"
    shutil.copytree(checkpoint, folder)
    values = json.loads((folder / CONFIG_FILE).read_text())
    values.update(changes)
    values = {key: value for key, value in values.items() if value is not None}
    (folder / CONFIG_FILE).write_text(json.dumps(values))
    return folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"n_head": 0}, "n_head must be positive, got 0"),
    ({"n_query_groups": 0}, "n_query_groups must be positive, got 0"),
    ({"block_size": 2**40}, r"block_size=1,099,511,627,776 is beyond 1,048,576 tokens \(its RoPE cache alone would take"),
    ({"n_layer": "2"}, "n_layer must be int, got '2'"),
    ({"tie_embeddings": 1}, "tie_embeddings must be bool, got 1"),
    ({"norm_eps": -1}, "norm_eps must be a positive number, got -1"),
    ({"rope_base": None}, r"missing config fields \['rope_base'\]"),
    ({"norm_eps": None, "n_embd": None}, r"missing config fields \['n_embd', 'norm_eps'\]"),
])  # fmt: skip
def test_a_bad_model_config_is_one_line_naming_file_and_key(capsys, checkpoint, tmp_path, changes, message):
    folder = write_config(checkpoint, tmp_path, **changes)
    lines = cli(capsys, "scripts/convert_checkpoint.py", "--source", str(folder), "--out_dir", str(tmp_path / "hf"),
                "--to", "hf")  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / CONFIG_FILE}: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "hf").exists()


def test_zero_heads_in_a_hugging_face_config_is_one_line(tmp_path):
    from lit_qa.checkpoints.convert_hf import config_from_hf

    hf = dict(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=0, intermediate_size=64,
              vocab_size=100, max_position_embeddings=128, head_dim=8)  # fmt: skip
    with pytest.raises(LitQAError, match="config.json: invalid model config .*n_head must be positive, got 0"):
        config_from_hf(hf, "x", "config.json")


def test_out_dir_that_is_a_file_is_one_line(capsys, checkpoint, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    lines = cli(capsys, "scripts/convert_checkpoint.py", "--source", str(checkpoint), "--out_dir", str(taken),
                "--to", "hf")  # fmt: skip
    assert lines == [f"error: {taken} exists and is not a folder"]
    assert taken.read_text() == "not a folder"


def test_merge_refuses_a_broken_no_answer_head_before_writing(tmp_path, checkpoint):
    from lit_qa.checkpoints.lora import save_lora_checkpoint
    from lit_qa.models.lora import LoRAConfig, apply_lora
    from lit_qa.models.na_head import NAHeadConfig, attach_na_head

    model, _ = load_model(checkpoint)
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    attach_na_head(model, NAHeadConfig(layers=[0, 1]))
    lora_dir = save_lora_checkpoint(tmp_path / "lora", model, LoRAConfig(r=2, alpha=4), checkpoint)
    merge = load_script("scripts/merge_lora.py")
    (lora_dir / "na_head_config.json").write_text("{not json")
    with pytest.raises(LitQAError, match="na_head_config.json"):
        merge.main(lora_dir=lora_dir, out_dir=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_calibration_file_must_not_be_the_evaluation(tmp_path, capsys):
    from lit_qa.evaluation.calibration import load_calibration_questions

    eval_file = write_squad(tmp_path / "eval.json", squad_v2())
    questions = load_squad(eval_file)
    with pytest.raises(LitQAError, match="is the evaluation file"):
        load_calibration_questions(eval_file, eval_file, questions)
    copy = write_squad(tmp_path / "copy.json", squad_v2())
    capsys.readouterr()
    assert load_calibration_questions(copy, eval_file, questions) == questions
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and f"{len(questions)} of its questions are evaluation questions" in warning[0]
    assert load_calibration_questions(copy, eval_file, questions[:0]) is not None  # disjoint: no warning
    assert capsys.readouterr().err == ""
    assert load_calibration_questions(None, eval_file, questions) is None


@pytest.mark.parametrize(("values", "message"), [
    ({"r": "8"}, "r must be int, got '8'"),
    ({"r": 4, "dropout": "0.1"}, "dropout must be float, got '0.1'"),
    ({"r": 4, "mlp": 1}, "mlp must be bool, got 1"),
])  # fmt: skip
def test_a_wrong_typed_method_config_value_is_named_by_key(tmp_path, values, message):
    from lit_qa.models.lora import LoRAConfig

    path = tmp_path / "lora_config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(LitQAError, match=f"^{re.escape(str(path))}: {re.escape(message)}$"):
        LoRAConfig.from_file(path)


@pytest.mark.parametrize("script", ["evaluate/base.py", "scripts/prepare_squad.py"])
def test_out_dir_that_is_a_file_is_one_line_for_evaluation_and_preparation(capsys, checkpoint, tmp_path, script):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    squad = write_squad(tmp_path / "squad.json", squad_v2())
    files = ["--eval_file", str(squad)] if script.startswith("evaluate") else ["--train_file", str(squad)]
    lines = cli(capsys, script, "--checkpoint_dir", str(checkpoint), *files, "--out_dir", str(taken))
    assert lines == [f"error: --out_dir {taken} is a file, not a folder"]
    assert taken.read_text() == "not a folder"


def test_json_with_a_byte_order_mark_is_read_as_the_valid_json_it_is(tmp_path, checkpoint):
    """Editors on Windows save UTF-8 with a BOM; it used to be reported as a syntax error at line 1, column 1."""
    from lit_qa.models.config import Config

    plain = write_squad(tmp_path / "plain.json", squad_v2())
    bom = write_squad(tmp_path / "bom.json", b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_squad(bom) == load_squad(plain)
    config = tmp_path / CONFIG_FILE
    config.write_bytes(b"\xef\xbb\xbf" + (checkpoint / CONFIG_FILE).read_bytes())
    assert Config.from_file(config) == Config.from_file(checkpoint / CONFIG_FILE)


def test_an_evaluation_into_its_own_checkpoint_folder_is_refused(capsys, checkpoint, tmp_path):
    squad = write_squad(tmp_path / "squad.json", squad_v2())
    before = sorted(p.name for p in checkpoint.iterdir())
    for out in (checkpoint, checkpoint / "eval"):
        lines = cli(capsys, "evaluate/base.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(squad),
                    "--out_dir", str(out))  # fmt: skip
        relation = "is" if out == checkpoint else "is inside"
        assert lines == [f"error: --out_dir {out} {relation} the input --checkpoint_dir {checkpoint}; write the output "
                         "to another folder"]  # fmt: skip
    assert sorted(p.name for p in checkpoint.iterdir()) == before
