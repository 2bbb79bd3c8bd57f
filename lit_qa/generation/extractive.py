# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Span-constrained ("extractive") decoding: every answer is a piece of the context, or the no-answer string.

At each decoding step only the tokens that keep the answer so far a substring of the question's context, or a
prefix of the no-answer string, keep their logits; the others get -inf. EOS is allowed once the answer is a
non-empty substring of the context or exactly the no-answer string. Leading whitespace is free (the official
answer is stripped), so a first token may carry a word-start space ("Ġ" in byte-level BPE, "▁" in sentencepiece).

Everything is done on bytes, never on token strings, so merges across word boundaries and tokens that hold part
of a UTF-8 character are handled. Two automata are walked together from a row's current state::

    vocabulary trie (once per tokenizer)          suffix automaton of the context (once per context)
    root ─"P"─► "P" ─"a"─► "Pa" ─"r"─► ...        every path from its start spells a substring, and only those
           └─" "─► " " ─"t"─► " t" ...

A trie path that the automaton can follow spells a token whose bytes extend the answer to another substring, so
the allowed tokens of a step are the trie nodes reached, found without scanning the vocabulary.

    decoder = SpanDecoder(tokenizer, no_answer="unanswerable")
    generate(model, prompts, 32, stop_ids=tokenizer.eos_ids,
             logits_processor=decoder.processor([q.context for q in batch]))
"""

from __future__ import annotations

import re
import weakref
from collections import OrderedDict

import torch

from lit_qa.data.prompts import NO_ANSWER
from lit_qa.errors import LitQAError
from lit_qa.models.tokenizer import Tokenizer

# Bytes that `str.strip` removes (the ASCII ones): free at the start of an answer.
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback, e.g. <0xE2>
# A row's state: (suffix automaton state or None, position in the no-answer string or None, still only
# whitespace so far, UTF-8 continuation bytes still due). Plain tuples: the walks create many of them.
State = tuple[int | None, int | None, bool, int]


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character a vocabulary uses for each byte -> that byte.

    Printable Latin-1 characters stand for themselves; the other bytes are shifted to U+0100 and up (space is "Ġ").
    From https://github.com/openai/gpt-2/blob/master/src/encoder.py (``bytes_to_unicode``, MIT license).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = byte_level_alphabet()


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes each token id adds to decoded text, for either tokenizer backend.

    Each token is decoded after a fixed prefix ("a") and the prefix's text is taken off, so a word-start space is
    kept (decoding a token alone drops sentencepiece's). A token that holds part of a UTF-8 character decodes to
    U+FFFD; its bytes come from its piece instead: ``<0xNN>`` (sentencepiece byte fallback) or a byte-level BPE
    piece, whose characters map back to bytes one to one.

    Returns:
        One byte string per id below ``tokenizer.vocab_size``; ``b""`` for special tokens (which decoding with
        ``skip_special_tokens=True`` drops) and ids the vocabulary does not use.
    """
    prefix = tokenizer.encode("a", bos=False).tolist()
    base = tokenizer.decode(prefix, skip_special_tokens=True)
    pieces = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([*prefix, i], skip_special_tokens=True)
        whole = text.startswith(base) and "\ufffd" not in text  # else the decoder merged or replaced bytes
        pieces.append(text[len(base) :].encode("utf-8") if whole else _piece_bytes(_piece(tokenizer, i)))
    return pieces


def _piece(tokenizer: Tokenizer, i: int) -> str:
    # The raw vocabulary entry ("" for an unused id); only needed for the few tokens that are part of a character.
    try:
        return tokenizer.id_to_token(i)
    except LitQAError:
        return ""


def _piece_bytes(piece: str) -> bytes:
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    if all(c in _BYTE_LEVEL for c in piece):
        return bytes(_BYTE_LEVEL[c] for c in piece)
    return piece.replace("▁", " ").encode("utf-8")  # a piece that really holds U+FFFD


class VocabTrie:
    """A trie over the byte strings of a vocabulary: node 0 is the root, ``ids[node]`` the tokens spelled there.

    Attributes:
        pieces: Each token id's bytes (`token_bytes`).
        children: Per node, next byte -> child node.
        ids: Per node, the token ids whose bytes end there.
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.children: list[dict[int, int]] = [{}]
        self.ids: list[list[int]] = [[]]
        for token, piece in enumerate(pieces):
            if not piece:
                continue  # special tokens add no text: never part of an answer
            node = 0
            for byte in piece:
                child = self.children[node].get(byte)
                if child is None:
                    child = len(self.children)
                    self.children[node][byte] = child
                    self.children.append({})
                    self.ids.append([])
                node = child
            self.ids[node].append(token)


_TRIES: weakref.WeakKeyDictionary[Tokenizer, VocabTrie] = weakref.WeakKeyDictionary()


def vocab_trie(tokenizer: Tokenizer) -> VocabTrie:
    """The `VocabTrie` of ``tokenizer``, built on first use and kept as long as the tokenizer lives."""
    if tokenizer not in _TRIES:
        _TRIES[tokenizer] = VocabTrie(token_bytes(tokenizer))
    return _TRIES[tokenizer]


class SuffixAutomaton:
    """The smallest automaton that accepts exactly the substrings of ``data`` (Blumer et al., 1985).

    Built online in linear time: https://cp-algorithms.com/string/suffix-automaton.html. State 0 is the start
    (the empty string); ``next[state]`` maps a byte to the next state. Only the transitions are kept.
    """

    def __init__(self, data: bytes) -> None:
        nxt: list[dict[int, int]] = [{}]
        link, length, last = [-1], [0], 0
        for byte in data:
            cur = len(nxt)
            nxt.append({})
            link.append(0)
            length.append(length[last] + 1)
            p = last
            while p != -1 and byte not in nxt[p]:
                nxt[p][byte] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][byte]
                if length[p] + 1 == length[q]:
                    link[cur] = q
                else:  # split q: the shorter strings it stood for now end elsewhere too
                    clone = len(nxt)
                    nxt.append(dict(nxt[q]))
                    link.append(link[q])
                    length.append(length[p] + 1)
                    while p != -1 and nxt[p].get(byte) == q:
                        nxt[p][byte] = clone
                        p = link[p]
                    link[q] = link[cur] = clone
            last = cur
        self.next = nxt

    def accepts(self, data: bytes) -> bool:
        """Whether ``data`` is a substring."""
        state = 0
        for byte in data:
            state = self.next[state].get(byte)
            if state is None:
                return False
        return True


class SpanDecoder:
    """Makes span-constraining logits processors for one tokenizer and no-answer string.

    It keeps the per-context work (the suffix automaton and the allowed first tokens) for the last
    ``cache_size`` contexts: SQuAD asks several questions about each paragraph.

    Args:
        tokenizer: The model's tokenizer; its vocabulary trie is built once and cached.
        no_answer: The reply that means "no answer".
        stop_ids: The tokens that end an answer (EOS); default ``tokenizer.eos_ids``. They must be the stop
            tokens `lit_qa.generation.generate.generate` is given.
        cache_size: Contexts whose automaton is kept.
    """

    def __init__(
        self, tokenizer: Tokenizer, no_answer: str = NO_ANSWER, stop_ids: set[int] | None = None, cache_size: int = 64
    ) -> None:
        self.trie = vocab_trie(tokenizer)
        self.no_answer = no_answer.encode("utf-8")
        self.stop_ids = sorted(tokenizer.eos_ids if stop_ids is None else stop_ids)
        self.cache_size = cache_size
        self._contexts: OrderedDict[str, tuple[SuffixAutomaton, dict]] = OrderedDict()

    def processor(
        self, contexts: list[str], allow_no_answer: bool = True, max_new_tokens: int | None = None
    ) -> SpanConstraint:
        """A logits processor for one call of `lit_qa.generation.generate.generate`, row ``i`` answering from
        ``contexts[i]``.

        Args:
            contexts: One context per prompt, in batch order.
            allow_no_answer: Allow the no-answer string; False allows context spans only (the "best span" mode).
            max_new_tokens: The ``max_new_tokens`` given to ``generate``: at the last step only tokens that
                complete an answer are allowed (when there are any), so a cut answer is still a whole span.
        """
        return SpanConstraint(self, contexts, allow_no_answer, max_new_tokens)

    def context(self, text: str) -> tuple[SuffixAutomaton, dict]:
        """The automaton of a context, and a dict for its cached first-step ids."""
        if text in self._contexts:
            self._contexts.move_to_end(text)
        else:
            self._contexts[text] = (SuffixAutomaton(text.encode("utf-8")), {})
            if len(self._contexts) > self.cache_size:
                self._contexts.popitem(last=False)
        return self._contexts[text]


class SpanConstraint:
    """Per-step logits processor: ``processor(logits (B, V), last_tokens (B,) or None) -> logits``.

    Called once per decoding step, the first time with ``last_tokens=None``, then with the tokens just chosen
    (those of finished rows are ignored: a row is finished once it chose a stop token). Make one per batch with
    `SpanDecoder.processor`.
    """

    def __init__(
        self, decoder: SpanDecoder, contexts: list[str], allow_no_answer: bool, max_new_tokens: int | None
    ) -> None:
        self.decoder = decoder
        self.rows = [decoder.context(c) for c in contexts]
        self.start: State = (0, 0 if allow_no_answer else None, True, 0)
        self.states: list[State | None] = [self.start] * len(contexts)
        self.done = [False] * len(contexts)
        self.max_new_tokens = max_new_tokens
        self.steps = 0
        self.stop_ids = torch.tensor(decoder.stop_ids, dtype=torch.long)

    def __call__(self, logits: torch.Tensor, last_tokens: torch.Tensor | None) -> torch.Tensor:
        """``logits`` (B, V) with every token a row may not choose next set to -inf."""
        if last_tokens is not None:
            self.advance(last_tokens.tolist())
        last_step = self.max_new_tokens is not None and self.steps == self.max_new_tokens - 1
        self.steps += 1
        # A finished row's token is thrown away; allowing EOS only spares the work (and keeps sampling defined).
        allowed = [self.stop_ids if done else self.allowed(row, last_step) for row, done in enumerate(self.done)]
        rows = torch.repeat_interleave(torch.arange(len(allowed)), torch.tensor([len(a) for a in allowed]))
        index = (rows.to(logits.device), torch.cat(allowed).to(logits.device))
        # Copy the allowed logits into a -inf tensor: one (B, V) write, where a boolean mask would take three.
        return torch.full_like(logits, float("-inf")).index_put_(index, logits[index])

    def advance(self, tokens: list[int]) -> None:
        """Move each unfinished row on by the token it chose."""
        pieces = self.decoder.trie.pieces
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            if token in self.decoder.stop_ids:
                self.done[row] = True
                continue
            state = self.states[row]
            piece = pieces[token] if token < len(pieces) else b""
            for byte in piece:
                state = self._step(row, state, byte) if state is not None else None
            self.states[row] = state if piece else None  # None: left the constraint; only EOS is allowed now

    def allowed(self, row: int, complete_only: bool = False) -> torch.Tensor:
        """The token ids row ``row`` may choose next (stop tokens included when its answer may end here).

        Args:
            row: The batch row.
            complete_only: Only tokens after which the answer is complete (when there are any).
        """
        state = self.states[row]
        if state is None:
            return self.stop_ids
        if state != self.start:
            ids = self._walk(row, state, complete_only)
            ids = ids or (self._walk(row, state, False) if complete_only else ids)
            return torch.tensor(ids or self.decoder.stop_ids, dtype=torch.long)
        cache = self.rows[row][1]  # the first step is the widest walk, and the same for every question of a context
        key = (state, complete_only)
        if key not in cache:
            ids = self._walk(row, state, complete_only) or self._walk(row, state, False)
            # Nothing at all (an empty context in best-span mode): end at once, with an empty answer.
            cache[key] = torch.tensor(ids or self.decoder.stop_ids, dtype=torch.long)
        return cache[key]

    def _walk(self, row: int, state: State, complete_only: bool) -> list[int]:
        """Walk the vocabulary trie and the row's automaton together from ``state``; collect the tokens reached."""
        children, ids = self.decoder.trie.children, self.decoder.trie.ids
        automaton = self.rows[row][0].next
        found = list(self.decoder.stop_ids) if self._complete(state) else []
        stack = [(0, state)]
        while stack:
            node, current = stack.pop()
            sam, na, leading, _ = current
            branches = children[node]
            if not leading and na is None and len(automaton[sam]) < len(branches):
                branches = {b: branches[b] for b in automaton[sam] if b in branches}  # follow the sparser side
            for byte, child in branches.items():
                new = self._step(row, current, byte)
                if new is None:
                    continue
                if not complete_only or self._complete(new):
                    found.extend(ids[child])
                stack.append((child, new))
        return found

    def _step(self, row: int, state: State, byte: int) -> State | None:
        """The state after one more byte of answer, or None if no allowed answer starts that way."""
        sam, na, leading, pending = state
        if leading and byte in _WHITESPACE:
            return state
        if leading and 0x80 <= byte < 0xC0:
            return None  # a continuation byte: the answer would start inside a character
        sam = self.rows[row][0].next[sam].get(byte) if sam is not None else None
        no_answer = self.decoder.no_answer
        na = na + 1 if na is not None and na < len(no_answer) and no_answer[na] == byte else None
        if sam is None and na is None:
            return None
        if byte < 0x80:
            pending = 0
        elif byte >= 0xC0:
            pending = 3 if byte >= 0xF0 else 2 if byte >= 0xE0 else 1
        else:
            pending -= 1
        return sam, na, False, pending

    def _complete(self, state: State) -> bool:
        """Whether the answer may end here: a non-empty span ending on a whole character, or the no-answer string."""
        sam, na, leading, pending = state
        return not leading and ((sam is not None and pending == 0) or na == len(self.decoder.no_answer))
