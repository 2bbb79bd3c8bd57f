# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Span-constrained decoding: token bytes for both tokenizer backends, the automata against brute force, and
constrained generation with a tiny random model on random (unicode) contexts."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import SENTENCES, SHARED_SQUAD, TINY, make_tiny_tokenizer, real_smollm2

from lit_qa.checkpoints.folder import load_model
from lit_qa.data.prompts import NO_ANSWER, build_prompt
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.generation.extractive import SpanDecoder, SuffixAutomaton, token_bytes
from lit_qa.generation.generate import generate
from lit_qa.models.config import Config
from lit_qa.models.model import GPT
from lit_qa.models.tokenizer import Tokenizer

WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
WORDS = ["the", "Normans", "river", "Paris", "in", "1999", "duchy", "ruled", "answer", "un", "able", "Question"]
UNICODE_WORDS = ["café", "naïve", "e\u0301te\u0301", "🙂", "👍🏽", "🇫🇷", "שלום", "مرحبا", "日本語", "Ångström", "über", "ß"]
TEXTS = ["Paris is the capital.", "  two  spaces\n", "café naïve e\u0301 👍🏽 שלום مرحبا 日本語", "unanswerable", "x"]


def make_sentencepiece_tokenizer(folder: Path) -> Path:
    """A LLaMA-like sentencepiece tokenizer (byte fallback, identity normalization) on the tiny model's sentences."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, model_type="bpe", vocab_size=330, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "</s>"}))
    return folder


@pytest.fixture(scope="module", params=["huggingface", "sentencepiece"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "huggingface":
        tokenizer = Tokenizer(make_tiny_tokenizer(folder))
    else:
        tokenizer = Tokenizer(make_sentencepiece_tokenizer(folder))
    assert tokenizer.backend == request.param
    return tokenizer


def tiny_model(seed: int = 0, tokenizer: Tokenizer | None = None) -> GPT:
    """A tiny random model with sharp weights (answers depend on the prompt) and a likely EOS.

    With ``tokenizer``, every token that is not whole text on its own (special, unused, part of a character)
    gets a zero logit, below the best of the others: the free answers are then plain text.
    """
    torch.manual_seed(seed)
    model = GPT(Config(**TINY)).eval()
    state_dict = {name: p * 3 if p.ndim > 1 else p for name, p in model.state_dict().items()}
    head = state_dict["lm_head.weight"]
    if tokenizer is not None:
        pieces = token_bytes(tokenizer)
        for i in range(head.size(0)):
            if not (i in tokenizer.eos_ids or i < len(pieces) and pieces[i] and is_text(pieces[i])):
                head[i] = 0
    head[sorted(tokenizer.eos_ids if tokenizer else [2])] *= 2
    model.load_state_dict(state_dict)
    return model


def is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def random_context(rng: random.Random) -> str:
    words = [rng.choice(WORDS if rng.random() < 0.6 else UNICODE_WORDS) for _ in range(rng.randint(1, 12))]
    return "".join(word + rng.choice([" ", " ", ", ", "\n"]) for word in words).rstrip()


def reference_allowed(pieces: list[bytes], answer: bytes, context: bytes, no_answer: bytes | None) -> set[int]:
    """The allowed next tokens by definition, scanning the whole vocabulary (what the automata must reproduce)."""
    allowed = set()
    for token, piece in enumerate(pieces):
        text = (answer + piece).lstrip(WHITESPACE)
        if not piece:
            continue
        if not text or (text in context and not 0x80 <= text[0] < 0xC0):
            allowed.add(token)
        elif no_answer is not None and no_answer.startswith(text):
            allowed.add(token)
    return allowed


def may_end(answer: bytes, context: bytes, no_answer: bytes | None) -> bool:
    text = answer.lstrip(WHITESPACE)
    return bool(text) and (text in context and is_text(text) or text == no_answer)


# ---- token bytes ----


def test_token_bytes_reproduce_decode(tokenizer: Tokenizer):
    pieces = token_bytes(tokenizer)
    assert len(pieces) == tokenizer.vocab_size
    assert all(pieces[i] == b"" for i in tokenizer.eos_ids | {tokenizer.bos_id})  # specials add no text
    for text in TEXTS:
        ids = tokenizer.encode(text, bos=False).tolist()
        joined = b"".join(pieces[i] for i in ids)
        decoded = tokenizer.decode(ids).encode("utf-8")
        # Sentencepiece puts a "▁" in front of the text and decoding drops it: the bytes keep it.
        assert joined == (b" " + decoded if tokenizer.backend == "sentencepiece" else decoded), text
    # Random token sequences, not only what encode makes: pieces of characters must join into characters.
    rng = random.Random(0)
    useful = [i for i, piece in enumerate(pieces) if piece]
    prefix = tokenizer.encode("a", bos=False).tolist()
    checked = 0
    for _ in range(300):
        ids = [rng.choice(useful) for _ in range(rng.randint(1, 6))]
        joined = b"".join(pieces[i] for i in ids)
        if is_text(joined):
            checked += 1
            assert tokenizer.decode(prefix + ids) == "a" + joined.decode("utf-8"), ids
    assert checked > 50


def test_tokens_that_are_part_of_a_character_are_single_bytes(tokenizer: Tokenizer):
    pieces = token_bytes(tokenizer)
    ids = tokenizer.encode("🙂", bos=False).tolist()
    byte_tokens = [pieces[i] for i in ids if pieces[i].strip()]
    assert b"".join(byte_tokens) == "🙂".encode() and all(len(p) == 1 for p in byte_tokens)


# ---- the automata ----


def test_suffix_automaton_accepts_exactly_the_substrings():
    rng = random.Random(1)
    for _ in range(50):
        data = bytes(rng.choice(b"abc") for _ in range(rng.randint(0, 30)))
        automaton = SuffixAutomaton(data)
        for _ in range(40):
            probe = bytes(rng.choice(b"abc") for _ in range(rng.randint(0, 6)))
            assert automaton.accepts(probe) == (probe in data), (data, probe)
        assert len(automaton.next) <= max(1, 2 * len(data))  # linear size


@pytest.mark.parametrize("allow_no_answer", [True, False])
def test_allowed_tokens_equal_a_scan_of_the_vocabulary(tokenizer, allow_no_answer):
    """Random walks through random contexts: at every step the trie x automaton walk finds exactly the tokens
    that the definition allows, and EOS exactly when the answer may end."""
    pieces = token_bytes(tokenizer)
    decoder = SpanDecoder(tokenizer, NO_ANSWER)
    no_answer = NO_ANSWER.encode() if allow_no_answer else None
    eos = set(tokenizer.eos_ids)
    rng = random.Random(2)
    steps = 0
    for _ in range(40):
        context = random_context(rng) + (" unanswerable" if rng.random() < 0.2 else "")
        constraint = decoder.processor([context], allow_no_answer)
        answer = b""
        for _ in range(rng.randint(1, 8)):
            allowed = set(constraint.allowed(0).tolist())
            assert allowed - eos == reference_allowed(pieces, answer, context.encode(), no_answer), (context, answer)
            assert (eos <= allowed) == may_end(answer, context.encode(), no_answer), (context, answer)
            choices = sorted(allowed - eos)
            if not choices:
                break
            token = rng.choice(choices)
            constraint.advance([token])
            answer += pieces[token]
            steps += 1
    assert steps > 100


def answer_with(decoder: SpanDecoder, tokenizer: Tokenizer, context: str, text: str, allow_no_answer: bool = True):
    """A one-row constraint that was fed the tokens of ``text``, each checked to be allowed on the way."""
    constraint = decoder.processor([context], allow_no_answer)
    constraint(torch.zeros(1, tokenizer.vocab_size), None)
    for token in tokenizer.encode(text, bos=False).tolist():
        assert token in constraint.allowed(0).tolist(), (text, token)
        constraint(torch.zeros(1, tokenizer.vocab_size), torch.tensor([token]))
    return constraint


def test_eos_needs_a_whole_span_or_the_whole_no_answer_string(tmp_path):
    tokenizer = Tokenizer(make_tiny_tokenizer(tmp_path))
    decoder = SpanDecoder(tokenizer, "unanswerable")
    context = "Paris is in France, café."
    may_end = {"": False, "Paris": True, "Paris is": True, "is in Fr": True, "unans": False, "unanswerable": True}
    for text, expected in may_end.items():
        assert (tokenizer.eos_id in answer_with(decoder, tokenizer, context, text).allowed(0)) == expected, text
    # Best-span mode: no-answer prefixes are not allowed at all.
    first = tokenizer.encode("unans", bos=False)[0]
    assert first in decoder.processor([context]).allowed(0)
    assert first not in decoder.processor([context], allow_no_answer=False).allowed(0)
    assert answer_with(decoder, tokenizer, "unanswerable", "unanswerable", allow_no_answer=False)  # a span here
    # Byte-level BPE spells "é" with two byte tokens; after the first, the answer ends inside a character.
    *caf, e1, e2 = tokenizer.encode("café", bos=False).tolist()
    assert token_bytes(tokenizer)[e1] + token_bytes(tokenizer)[e2] == "é".encode()
    half = answer_with(decoder, tokenizer, context, "caf")
    half(torch.zeros(1, tokenizer.vocab_size), torch.tensor([e1]))
    assert tokenizer.eos_id not in half.allowed(0) and e2 in half.allowed(0)
    # No answer starts inside a character, or ends before it started.
    start = decoder.processor(["é"]).allowed(0).tolist()
    assert e1 in start and e2 not in start and tokenizer.eos_id not in start


def test_the_last_step_only_completes_answers(tmp_path):
    """At the last step (``max_new_tokens``) a token may not leave the answer inside a character or half-way
    through the no-answer string, unless nothing else is possible."""
    tokenizer = Tokenizer(make_tiny_tokenizer(tmp_path))
    decoder = SpanDecoder(tokenizer, "unanswerable")
    e1, un, a = (int(tokenizer.encode(text, bos=False)[0]) for text in ("é", "u", "a"))  # "u": as in "unanswerable"
    logits = torch.zeros(1, 512)
    for max_new_tokens, allowed in ((None, {e1, un, a}), (2, {e1, un, a}), (1, {a})):
        constraint = decoder.processor(["é a"], max_new_tokens=max_new_tokens)
        finite = set(torch.isfinite(constraint(logits, None))[0].nonzero()[:, 0].tolist())
        assert finite & {e1, un, a} == allowed, max_new_tokens
    # Nothing completes an answer from "é" in one token: the usual set is allowed (better than nothing).
    only_half = decoder.processor(["é"], allow_no_answer=False, max_new_tokens=1)
    finite = set(torch.isfinite(only_half(logits, None))[0].nonzero()[:, 0].tolist())
    assert e1 in finite and tokenizer.eos_id not in finite


def test_finished_rows_cost_nothing(tmp_path):
    tokenizer = Tokenizer(make_tiny_tokenizer(tmp_path))
    constraint = SpanDecoder(tokenizer).processor(["Paris is big.", "Rome."])
    logits = torch.randn(2, 512)
    first = constraint(logits, None)
    assert torch.isfinite(first).sum(-1).tolist() == [len(constraint.allowed(r)) for r in range(2)]
    assert torch.equal(first[torch.isfinite(first)], logits[torch.isfinite(first)])  # allowed logits unchanged
    paris = int(tokenizer.encode("Paris", bos=False)[0])
    after = constraint(logits, torch.tensor([tokenizer.eos_id, paris]))  # row 0 ends (with a disallowed EOS)
    assert constraint.done == [True, False]
    assert torch.isfinite(after[0]).nonzero()[:, 0].tolist() == [tokenizer.eos_id]  # its token is thrown away
    assert tokenizer.eos_id in torch.isfinite(after[1]).nonzero()[:, 0].tolist()  # "Paris" may end
    after = constraint(logits, torch.tensor([tokenizer.eos_id, tokenizer.eos_id]))  # the pad of a finished row
    assert constraint.done == [True, True] and torch.isfinite(after).sum().item() == 2


# ---- constrained generation ----


def prompts_for(tokenizer: Tokenizer, contexts: list[str], questions: list[str]) -> list[torch.Tensor]:
    return [tokenizer.encode(build_prompt(c, q)) for c, q in zip(contexts, questions, strict=True)]


def test_generate_calls_the_processor_at_every_step_with_the_last_tokens():
    model = tiny_model()
    prompts = [torch.randint(3, 300, (n,)) for n in (4, 9)]
    free = generate(model, prompts, 6)
    banned = int(free[0][0])  # the free model's first choice
    seen = []

    def forbid(logits, last_tokens):
        seen.append(None if last_tokens is None else last_tokens.tolist())
        return logits.index_fill(-1, torch.tensor([banned]), float("-inf"))

    out = generate(model, prompts, 6, logits_processor=forbid)
    assert seen[0] is None and len(seen) == 6
    assert seen[1:] == [[int(row[step]) for row in out] for step in range(5)]  # the tokens just chosen
    assert all(banned not in row.tolist() for row in out)


@pytest.mark.parametrize("allow_no_answer", [True, False])
def test_constrained_answers_are_spans_of_random_unicode_contexts(tokenizer, allow_no_answer):
    pieces = token_bytes(tokenizer)
    no_answer = NO_ANSWER.encode() if allow_no_answer else None
    rng = random.Random(3)
    contexts = [random_context(rng) for _ in range(12)]
    questions = [rng.choice(SENTENCES[3:4] + ["Who ruled?", "Où est-ce ?"]) for _ in contexts]
    prompts = prompts_for(tokenizer, contexts, questions)
    model = tiny_model(seed=1)
    decoder = SpanDecoder(tokenizer)
    max_new_tokens = 10
    free = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.eos_ids)
    out = generate(model, prompts, max_new_tokens, stop_ids=tokenizer.eos_ids,
                   logits_processor=decoder.processor(contexts, allow_no_answer, max_new_tokens))  # fmt: skip
    ended = 0
    for context, answer_ids, free_ids in zip(contexts, out, free, strict=True):
        answer = b"".join(pieces[i] for i in answer_ids.tolist())
        text = answer.lstrip(WHITESPACE)
        assert all(pieces[i] for i in answer_ids.tolist())  # no special tokens
        assert text in context.encode() or no_answer is not None and no_answer.startswith(text)
        if len(answer_ids) < max_new_tokens or may_end(answer, context.encode(), no_answer):
            ended += 1  # stopped at EOS, or cut at a point where it could have: a whole answer
            assert may_end(answer, context.encode(), no_answer), (context, answer)
            decoded = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
            assert decoded in context or decoded == NO_ANSWER
    assert ended >= len(contexts) // 2
    # Ids past the tokenizer's vocabulary (the model has 512 rows) are no text at all: b"\\xff" is in no context.
    free_text = [b"".join(pieces[i] if i < len(pieces) else b"\xff" for i in f.tolist()) for f in free]
    not_spans = [f for f, c in zip(free_text, contexts) if f.lstrip(WHITESPACE) not in c.encode()]
    assert len(not_spans) >= len(contexts) // 2  # not vacuous: left alone, the model answers anything


def test_constrained_equals_free_decoding_when_the_free_answer_is_a_span(tokenizer):
    """A free run's answers, written into the contexts the constraint is given, come out unchanged."""
    pieces = token_bytes(tokenizer)
    rng = random.Random(4)
    contexts = [random_context(rng) for _ in range(10)]
    prompts = prompts_for(tokenizer, contexts, ["Who ruled the duchy of Normandy?"] * len(contexts))
    model = tiny_model(seed=2, tokenizer=tokenizer)
    free = generate(model, prompts, 8, stop_ids=tokenizer.eos_ids)
    answers = [b"".join(pieces[i] for i in f.tolist()).decode("utf-8") for f in free]  # plain text: see tiny_model
    assert sum(bool(a.strip()) for a in answers) >= 8 and len(set(answers)) >= 3
    assert any(len(f) < 8 for f in free) and any(len(f) == 8 for f in free)  # stopped at EOS, and cut
    with_answers = [c + "\n" + a + " and more." for c, a in zip(contexts, answers, strict=True)]
    constraint = SpanDecoder(tokenizer).processor(with_answers, max_new_tokens=8)
    constrained = generate(model, prompts, 8, stop_ids=tokenizer.eos_ids, logits_processor=constraint)
    for f, c, a in zip(free, constrained, answers, strict=True):
        if a.strip():  # an all-whitespace answer is not a span: EOS stays forbidden
            assert c.tolist() == f.tolist(), a
    # And with the original contexts (which do not hold those answers), the answers change.
    original = generate(model, prompts, 8, stop_ids=tokenizer.eos_ids,
                        logits_processor=SpanDecoder(tokenizer).processor(contexts, max_new_tokens=8))  # fmt: skip
    assert [o.tolist() for o in original] != [f.tolist() for f in free]


def test_batched_constrained_rows_equal_each_alone(tokenizer):
    rng = random.Random(5)
    contexts = [random_context(rng) for _ in range(5)]
    prompts = prompts_for(tokenizer, contexts, ["Who?", "Which river flows through Paris?", "When?", "Où ?", "?"])
    model = tiny_model(seed=3)
    decoder = SpanDecoder(tokenizer)
    batched = generate(model, prompts, 8, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.eos_id or 0,
                       logits_processor=decoder.processor(contexts, max_new_tokens=8))  # fmt: skip
    alone = [generate(model, [p], 8, stop_ids=tokenizer.eos_ids,
                      logits_processor=decoder.processor([c], max_new_tokens=8))[0]
             for p, c in zip(prompts, contexts, strict=True)]  # fmt: skip
    assert [b.tolist() for b in batched] == [a.tolist() for a in alone]
    assert len({len(b) for b in batched}) > 1  # rows finish at different steps


# ---- the real model ----


@pytest.mark.slow
def test_real_smollm2_token_bytes_and_span_answers(tmp_path):
    demo_eval = SHARED_SQUAD / "demo-eval-v2.0.json"
    if not demo_eval.is_file():
        pytest.skip(f"{demo_eval} is missing")
    checkpoint = real_smollm2(tmp_path / "smol")
    tokenizer = Tokenizer(checkpoint)
    pieces = token_bytes(tokenizer)  # 49,152 byte-level BPE tokens, digits split one by one
    questions = select_subset(load_squad(demo_eval), 40)
    for question in questions:
        ids = tokenizer.encode(question.context + " " + question.question, bos=False).tolist()
        assert b"".join(pieces[i] for i in ids) == (question.context + " " + question.question).encode()

    model = load_model(checkpoint)[0].eval()
    kwargs = dict(max_new_tokens=12, na_threshold=None)
    spans = score_questions(model, tokenizer, questions[:8], DecodingSettings(extractive=True, **kwargs)).final
    assert all(spans[q.id] in q.context for q in questions[:8])
    free = score_questions(model, tokenizer, questions[:8], DecodingSettings(**kwargs)).final
    assert any(free[q.id] not in q.context for q in questions[:8])  # the base model, left alone, rambles
