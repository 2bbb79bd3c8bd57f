# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Prompt styles (plain and chat) and training targets, on tiny tokenizers trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SENTENCES, make_tiny_tokenizer, real_smollm2

from lit_qa.data.dataset import IGNORE_INDEX
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.prompts import (
    USER_TEMPLATE,
    answer_texts,
    build_prompt,
    chat_template_sha256,
    check_prompt_style,
    encode_prompt,
    render_chat,
)
from lit_qa.data.squad import Question
from lit_qa.errors import LitQAError
from lit_qa.models.tokenizer import Tokenizer

# SmolLM2-Instruct's ChatML template, verbatim: it adds a default system message when none is given.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama-3-Instruct's shape: the template writes BOS itself, and header tokens around the role.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONTEXT = "The Normans were in Normandy in the 10th century."
QUESTION = "Who ruled the duchy of Normandy?"


def make_chat_tokenizer(folder: Path, specials: list[str], config: dict) -> Path:
    """A byte-level BPE like SmolLM2's, with the given special tokens (ids 0, 1, ...) and tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def chatml(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """SmolLM2-Instruct-like: <|im_start|> 1, <|im_end|> 2 (EOS), no BOS added by default."""
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer(make_chat_tokenizer(tmp_path_factory.mktemp("chatml"), specials, config))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """Llama-3-Instruct-like: BOS <|begin_of_text|> 0 expected by the model, EOS <|eot_id|> 3."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
              "chat_template": LLAMA3}  # fmt: skip
    return Tokenizer(make_chat_tokenizer(tmp_path_factory.mktemp("llama3"), specials, config))


def question(answers: list[str], context: str = CONTEXT) -> Question:
    starts = [context.index(a) for a in answers]
    return Question("q1", "T", context, QUESTION, answers, starts, not answers)


# ---- chat prompts ----


def test_chatml_prompt_has_special_ids_in_place(chatml: Tokenizer):
    ids = encode_prompt(chatml, CONTEXT, QUESTION, "chat").tolist()
    user = USER_TEMPLATE.format(context=CONTEXT, question=QUESTION, no_answer="unanswerable")
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

    def text(s: str) -> list[int]:
        return chatml.encode(s, bos=False).tolist()

    # Each marker is its one special id (1 = <|im_start|>, 2 = <|im_end|>), never split into pieces.
    expected = (
        [1, *text("system\n" + system), 2, *text("\n"), 1, *text("user\n" + user), 2, *text("\n"), 1,
         *text("assistant\n")]
    )  # fmt: skip
    assert ids == expected
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[0] == 1  # no extra BOS: add_bos is false
    assert chatml.decode(ids) == render_chat(chatml, user)


def test_chatml_sample_answer_then_eos(chatml: Tokenizer):
    for answers, target in ((["the 10th century"], "the 10th century"), ([], "unanswerable")):
        sample = QuestionEncoder(chatml, 512, "chat")(question(answers)).sample
        ids, labels = sample["input_ids"], sample["labels"]
        n = int((labels == IGNORE_INDEX).sum())
        assert torch.equal(ids[:n], encode_prompt(chatml, CONTEXT, QUESTION, "chat"))
        assert chatml.decode(ids[:n]).endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert chatml.decode(labels[n:]) == target + "<|im_end|>"
        assert labels[-1].item() == chatml.eos_id == 2 and (labels[n:] != IGNORE_INDEX).all()


def test_chat_windowing_keeps_the_turn_markers(chatml: Tokenizer):
    filler = "Rivers and hills shape the land of every region. "
    context = filler * 30 + "Duke Richard the Fearless ruled Normandy. " + filler * 10
    encoder = QuestionEncoder(chatml, max_seq_length=200, prompt_style="chat")
    assert len(encoder.prompt_ids(context, QUESTION)) > 200
    result = encoder(question(["Richard the Fearless"], context))
    assert result.windowed and len(result.sample["input_ids"]) <= 200
    text = chatml.decode(result.sample["input_ids"])
    assert text.startswith("<|im_start|>system\n") and "Richard the Fearless" in text.split("### Question:")[0]
    assert text.endswith(f"### Question:\n{QUESTION}<|im_end|>\n<|im_start|>assistant\nRichard the Fearless<|im_end|>")


def test_llama3_template_writes_bos_once(llama3: Tokenizer):
    ids = encode_prompt(llama3, CONTEXT, QUESTION, "chat").tolist()
    assert llama3.add_bos and ids[0] == llama3.bos_id == 0 and ids.count(0) == 1  # BOS from the template only
    assert ids.count(1) == 2 and ids.count(2) == 2 and ids.count(3) == 1  # two headers, one finished turn
    newlines = llama3.encode("\n\n", bos=False).tolist()
    assert ids[-len(newlines) - 1 :] == [2, *newlines]  # the answer follows <|end_header_id|>\n\n
    sample = QuestionEncoder(llama3, 512, "chat")(question(["Normandy"])).sample
    assert llama3.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]) == "Normandy<|eot_id|>"
    # The plain style is untouched: BOS by the tokenizer's default, no template.
    assert llama3.decode(encode_prompt(llama3, CONTEXT, QUESTION)).startswith("<|begin_of_text|>Answer the question")


def test_chat_bos_is_the_templates_choice(tmp_path: Path):
    # A model that takes BOS in plain text, with a template that writes none: as apply_chat_template, add none.
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True, "chat_template": CHATML}
    tokenizer = Tokenizer(make_chat_tokenizer(tmp_path / "tok", ["<s>", "<|im_start|>", "<|im_end|>"], config))
    assert tokenizer.add_bos and tokenizer.encode("x")[0].item() == 0
    ids = encode_prompt(tokenizer, CONTEXT, QUESTION, "chat").tolist()
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and 0 not in ids


def test_chat_template_fingerprint(chatml: Tokenizer, llama3: Tokenizer):
    assert chat_template_sha256(chatml) != chat_template_sha256(llama3)
    assert len(chat_template_sha256(chatml)) == 64


# ---- errors ----


def test_unknown_style(chatml: Tokenizer):
    with pytest.raises(LitQAError, match="unknown prompt style 'chatty'; choose one of: chat, plain"):
        check_prompt_style("chatty", chatml)
    with pytest.raises(LitQAError, match="unknown prompt style"):
        QuestionEncoder(chatml, 512, "chatty")


def test_chat_without_template(tmp_path: Path):
    tokenizer = Tokenizer(make_tiny_tokenizer(tmp_path / "tok"))
    assert tokenizer.chat_template is None
    with pytest.raises(LitQAError) as info:
        QuestionEncoder(tokenizer, 512, "chat")
    message = str(info.value)
    assert "needs a chat template" in message and str(tmp_path / "tok") in message and "\n" not in message
    QuestionEncoder(tokenizer, 512, "plain")  # the plain style needs none
    with pytest.raises(LitQAError, match="needs the model's tokenizer"):
        build_prompt(CONTEXT, QUESTION, "chat")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m.content }}", "not valid Jinja"),
        ("{{ raise_exception('only system messages') }}", "fails to render: only system messages"),
        ("{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "does not write the user message"),
        ("{{ ''.__class__.__mro__ }}", "fails to render"),  # the sandbox refuses
    ],
)
def test_bad_chat_template(tmp_path: Path, template: str, match: str):
    config = {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": template}
    tokenizer = Tokenizer(make_chat_tokenizer(tmp_path / "tok", ["<|im_start|>", "<|im_end|>"], config))
    with pytest.raises(LitQAError, match=match) as info:
        QuestionEncoder(tokenizer, 512, "chat")
    assert str(tmp_path / "tok" / "tokenizer_config.json") in str(info.value) and "\n" not in str(info.value)


# ---- training targets ----


def test_answer_texts():
    answers, starts = ["Rollo", "Duke Rollo", "Rollo", "rollo", "Duke Rollo"], [5, 0, 30, 50, 60]
    assert answer_texts(answers, starts, "first") == [("Rollo", 5)]
    # Distinct texts in file order, each at its first occurrence; case differs, so "rollo" is its own answer.
    assert answer_texts(answers, starts, "all") == [("Rollo", 5), ("Duke Rollo", 0), ("rollo", 50)]
    assert answer_texts([], [], "all") == [] and answer_texts([], [], "first") == []
    with pytest.raises(LitQAError, match="unknown answers mode 'every'; choose one of: first, all"):
        answer_texts(answers, starts, "every")


# ---- the real SmolLM2 tokenizer ----


@pytest.mark.slow
def test_real_smollm2_chat_prompt_matches_transformers(tmp_path):
    smollm2 = real_smollm2(tmp_path / "smol")
    tokenizer = Tokenizer(smollm2)
    assert not tokenizer.add_bos and tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") == 2
    context = "  Braces {context} stay, <b>tags</b> too; Ümlauts and 日本語 and\ttabs. "
    user = USER_TEMPLATE.format(context=context, question=QUESTION, no_answer="unanswerable")
    ids = encode_prompt(tokenizer, context, QUESTION, "chat").tolist()
    expected_text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat(tokenizer, user) == expected_text
    assert ids[0] == 1 and ids[-4:] == [1, *tokenizer.encode("assistant\n", bos=False).tolist()]
    assert tokenizer.decode(ids) == expected_text
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return  # the hand-written string above is the check then
    hf = AutoTokenizer.from_pretrained(str(smollm2))
    messages = [{"role": "user", "content": user}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected_text
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids  # transformers 5 returns a BatchEncoding
    assert ids == list(hf_ids)


# ---- prepared data and evaluation ----


def test_prepared_chat_data_is_rebuilt_by_evaluation(tmp_path: Path, chatml: Tokenizer):
    from helpers import load_script, run_script

    from lit_qa.data.dataset import load_prepared
    from lit_qa.data.squad import load_squad
    from lit_qa.evaluation.answering import prompt_for
    from lit_qa.evaluation.run import prompt_settings

    context = "The Normans were in Normandy in the 10th century. " * 2
    answers = [{"text": "Normandy", "answer_start": context.index("Normandy")}]
    qas = [{"question": QUESTION, "id": f"q{a}", "is_impossible": False, "answers": answers} for a in range(2)]
    squad = {"version": "v2.0", "data": [{"title": f"A{a}", "paragraphs": [{"context": context, "qas": [qas[a]]}]}
                                         for a in range(2)]}  # fmt: skip
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(squad))
    out = tmp_path / "out"
    load_script("scripts/prepare_squad.py").main(train_file=train_file, checkpoint_dir=chatml.checkpoint_dir,
                                                 out_dir=out, prompt_style="chat", val_fraction=0.5)  # fmt: skip
    config = json.loads((out / "prepare_config.json").read_text())
    assert config["prompt_style"] == "chat" and config["chat_template_sha256"] == chat_template_sha256(chatml)

    # What evaluation does with a model trained on this folder: the recorded style, the same prompt tokens.
    style, no_answer = prompt_settings(out, None, None)
    encoder = QuestionEncoder(chatml, 512, style, no_answer)
    questions = {q.id: q for q in load_squad(train_file)}
    for sample in load_prepared(out, "train") + load_prepared(out, "val"):
        prompt, windowed = prompt_for(encoder, questions[sample["id"]])
        assert not windowed and torch.equal(prompt, sample["input_ids"][sample["labels"] == IGNORE_INDEX])

    # From the command line, a checkpoint without a chat template fails in one line.
    plain_dir = make_tiny_tokenizer(tmp_path / "plain")
    result = run_script("scripts/prepare_squad.py", "--train_file", str(train_file), "--checkpoint_dir",
                        str(plain_dir), "--out_dir", str(tmp_path / "o"), "--prompt_style", "chat")  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "needs a chat template" in result.stderr
    assert not (tmp_path / "o").exists()
