# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Tokenizer tests on tiny tokenizers trained inside the test (no downloads)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lit_qa.errors import LitQAError
from lit_qa.models.tokenizer import TOKENIZER_FILES, Tokenizer, check_vocab_matches

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Who wrote the book in 1999? Answer: the author.",
    "Context: Paris is the capital of France, and Berlin is the capital of Germany.",
    "Unanswerable questions have no answer in the context.",
] * 20

ROUND_TRIP = [
    "hello world",
    "Paris is the capital of France.",
    "numbers 0123456789 and 3.14",
    "two  spaces\nnew line\n\n\ttab",
    "Café naïve Ångström über",
    "emoji 🙂🚀 and 日本語",
    "",
]

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


@pytest.fixture
def sentencepiece_dir(tmp_path: Path) -> Path:
    """A LLaMA-like sentencepiece folder: unk 0, <s> 1, </s> 2, identity normalization, byte fallback."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=model,
        model_type="bpe",
        vocab_size=320,  # byte_fallback alone takes 256 + 3 specials
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "</s>"}))
    return tmp_path


@pytest.fixture
def huggingface_dir(tmp_path: Path) -> Path:
    """A SmolLM2-Instruct-like folder: byte-level BPE, <|im_end|> is EOS, no BOS by default."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    # A post-processor that adds specials on its own: the Tokenizer must not let it run.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A <|endoftext|>", special_tokens=[("<|im_start|>", 1), ("<|endoftext|>", 0)]
    )
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return tmp_path


def test_tokenizer_files_constant():
    expected = {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"}
    assert expected <= set(TOKENIZER_FILES)


def test_sentencepiece_backend(sentencepiece_dir: Path):
    tokenizer = Tokenizer(sentencepiece_dir)
    assert tokenizer.backend == "sentencepiece"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids) == (1, 2, {2})
    assert tokenizer.vocab_size == 320
    assert tokenizer.add_bos is True
    assert tokenizer.chat_template is None
    assert tokenizer.token_to_id("</s>") == 2
    assert tokenizer.token_to_id("<not a piece>") is None

    ids = tokenizer.encode("hello world")
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids[0].item() == 1 and (ids == 1).sum().item() == 1  # BOS by default, exactly once
    assert torch.equal(tokenizer.encode("hello world", bos=True), ids)
    assert torch.equal(tokenizer.encode("hello world", bos=False), ids[1:])
    with_eos = tokenizer.encode("hello world", eos=True)
    assert with_eos[-1].item() == 2 and torch.equal(with_eos[:-1], ids)
    assert torch.equal(tokenizer.encode("hello world", max_length=3), ids[:3])

    assert tokenizer.decode(with_eos, skip_special_tokens=True) == "hello world"
    assert tokenizer.decode(with_eos) == "<s>hello world</s>"


@pytest.mark.parametrize("text", [*ROUND_TRIP, " leading space", "  two leading spaces"])
def test_sentencepiece_round_trip(sentencepiece_dir: Path, text: str):
    tokenizer = Tokenizer(sentencepiece_dir)
    ids = tokenizer.encode(text, bos=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids.tolist()) == text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_add_bos_default_without_config(sentencepiece_dir: Path):
    (sentencepiece_dir / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer(sentencepiece_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)  # from the model file itself
    assert tokenizer.add_bos is True


def test_huggingface_backend(huggingface_dir: Path):
    tokenizer = Tokenizer(huggingface_dir)
    assert tokenizer.backend == "huggingface"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.eos_ids == {0, 2}  # tokenizer_config's eos plus every generation_config eos_token_id
    assert tokenizer.add_bos is False
    assert tokenizer.chat_template == CHAT_TEMPLATE
    vocab = json.loads((huggingface_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokenizer.vocab_size == max(vocab.values()) + 1
    assert tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.token_to_id("<|nope|>") is None

    # The saved post-processor would add <|im_start|> ... <|endoftext|>; encode must ignore it.
    ids = tokenizer.encode("hello world")
    assert 0 not in ids.tolist() and 1 not in ids.tolist()
    with_bos = tokenizer.encode("hello world", bos=True)
    assert with_bos[0].item() == 1 and torch.equal(with_bos[1:], ids)
    with_eos = tokenizer.encode("hello world", eos=True)
    assert with_eos[-1].item() == 2 and torch.equal(with_eos[:-1], ids)

    # Special tokens written in the text are recognized, and BOS is not doubled.
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    chat_ids = tokenizer.encode(chat, bos=True)
    assert chat_ids[0].item() == 1 and (chat_ids == 1).sum().item() == 1 and 2 in chat_ids.tolist()
    assert tokenizer.decode(chat_ids) == chat
    assert tokenizer.decode(chat_ids, skip_special_tokens=True) == "user\nhi\n"


@pytest.mark.parametrize("text", [*ROUND_TRIP, " leading space", "   three\n spaces ", "accents: àéîõü ß"])
def test_huggingface_round_trip(huggingface_dir: Path, text: str):
    tokenizer = Tokenizer(huggingface_dir)
    ids = tokenizer.encode(text, bos=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True), skip_special_tokens=True) == text


def test_huggingface_add_bos_follows_post_processor(huggingface_dir: Path):
    # Without add_bos_token, the default is whatever tokenizer.json's post-processor does (here: adds BOS).
    config = json.loads((huggingface_dir / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    (huggingface_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(huggingface_dir)
    assert tokenizer.add_bos is True
    ids = tokenizer.encode("hello")
    assert ids[0].item() == 1 and (ids == 1).sum().item() == 1
    assert ids[-1].item() != 0  # the post-processor's trailing <|endoftext|> is still not added


def test_chat_template_from_jinja_file(huggingface_dir: Path):
    config = json.loads((huggingface_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (huggingface_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(huggingface_dir).chat_template is None
    (huggingface_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert Tokenizer(huggingface_dir).chat_template == CHAT_TEMPLATE


def test_huggingface_preferred_over_sentencepiece(huggingface_dir: Path):
    # The tokenizer.model is never opened (it would fail to parse) when tokenizer.json is there.
    (huggingface_dir / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert Tokenizer(huggingface_dir).backend == "huggingface"


def test_missing_folder(tmp_path: Path):
    with pytest.raises(LitQAError, match="does not exist") as info:
        Tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_empty_folder(tmp_path: Path):
    (tmp_path / "lit_model.pth").write_bytes(b"")
    with pytest.raises(LitQAError, match="no tokenizer.json or tokenizer.model") as info:
        Tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "lit_model.pth" in message and "\n" not in message


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_file(tmp_path: Path, name: str):
    (tmp_path / name).write_bytes(b"\x00\xffgarbage{not a tokenizer")
    with pytest.raises(LitQAError) as info:
        Tokenizer(tmp_path)
    assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"add_bos_token": "yes"}', "add_bos_token"),
        ('{"eos_token": "<|missing|>"}', "not in the tokenizer's vocabulary"),
    ],
)
def test_malformed_tokenizer_config(huggingface_dir: Path, content: str, match: str):
    (huggingface_dir / "tokenizer_config.json").write_text(content)
    with pytest.raises(LitQAError, match=match) as info:
        Tokenizer(huggingface_dir)
    assert "tokenizer_config.json" in str(info.value)


def test_check_vocab_matches(huggingface_dir: Path):
    tokenizer = Tokenizer(huggingface_dir)
    check_vocab_matches(tokenizer, tokenizer.vocab_size, huggingface_dir)
    check_vocab_matches(tokenizer, tokenizer.vocab_size + 64, huggingface_dir)  # padded rows are fine
    with pytest.raises(LitQAError, match=f"has {tokenizer.vocab_size} tokens but the model's vocabulary has 32 rows"):
        check_vocab_matches(tokenizer, 32, huggingface_dir)


def test_sentencepiece_specials_in_text(sentencepiece_dir: Path):
    tokenizer = Tokenizer(sentencepiece_dir)
    text = "<s>[INST] hello world [/INST]"
    plain = tokenizer.encode(text, bos=False)
    assert 1 not in plain.tolist() and tokenizer.decode(plain) == text  # by default: plain text, in pieces
    ids = tokenizer.encode(text, bos=False, specials=True).tolist()
    # <s> is its one id; the rest is encoded on its own, as Meta's Llama-2 chat code does.
    assert ids == [1, *tokenizer.encode("[INST] hello world [/INST]", bos=False).tolist()]
    both = tokenizer.encode("hi</s><s>there", bos=True, specials=True).tolist()
    hi, there = tokenizer.encode("hi", bos=False).tolist(), tokenizer.encode("there", bos=False).tolist()
    assert both == [1, *hi, 2, 1, *there]
    assert tokenizer.encode("<unk>", bos=False, specials=True).tolist() == [0]
    assert torch.equal(tokenizer.encode("no specials", specials=True), tokenizer.encode("no specials"))


def test_id_to_token_sentencepiece(sentencepiece_dir: Path):
    tokenizer = Tokenizer(sentencepiece_dir)
    assert (tokenizer.id_to_token(1), tokenizer.id_to_token(2)) == ("<s>", "</s>")
    with pytest.raises(LitQAError, match="no token with id 100000"):
        tokenizer.id_to_token(100_000)


def test_id_to_token_huggingface(huggingface_dir: Path):
    tokenizer = Tokenizer(huggingface_dir)
    assert (tokenizer.id_to_token(1), tokenizer.id_to_token(2)) == ("<|im_start|>", "<|im_end|>")
    with pytest.raises(LitQAError, match="no token with id 100000"):
        tokenizer.id_to_token(100_000)


def test_chat_template_file(huggingface_dir: Path):
    assert Tokenizer(huggingface_dir).chat_template_file == huggingface_dir / "tokenizer_config.json"
    config = json.loads((huggingface_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (huggingface_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(huggingface_dir).chat_template_file is None
    (huggingface_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert Tokenizer(huggingface_dir).chat_template_file == huggingface_dir / "chat_template.jinja"


# Llama-2-chat's template, shortened: it writes BOS itself and has no generation prompt (the reply follows [/INST]).
LLAMA2_CHAT = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def test_sentencepiece_chat_prompt(sentencepiece_dir: Path):
    from lit_qa.data.dataset import IGNORE_INDEX
    from lit_qa.data.prepare import QuestionEncoder
    from lit_qa.data.prompts import USER_TEMPLATE, encode_prompt
    from lit_qa.data.squad import Question

    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2_CHAT}
    (sentencepiece_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(sentencepiece_dir)
    context, question = "Paris is the capital of France.", "Who wrote the book?"
    ids = encode_prompt(tokenizer, context, question, "chat").tolist()
    user = USER_TEMPLATE.format(context=context, question=question, no_answer="unanswerable")
    assert ids == [1, *tokenizer.encode(f"[INST] {user} [/INST]", bos=False).tolist()]  # one BOS, as one id
    sample = QuestionEncoder(tokenizer, 512, "chat")(Question("q", "T", context, question, [], [], True)).sample
    assert tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]) == "unanswerable</s>"
