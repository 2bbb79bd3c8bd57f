# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""One `Tokenizer` over the two formats LLaMA-family checkpoints ship.

* ``tokenizer.json`` (Hugging Face ``tokenizers``): SmolLM2, Llama-3, and converted Llama-2s. Preferred when present.
* ``tokenizer.model`` (sentencepiece): LLaMA 1 and Llama-2 as released by Meta.

Special tokens and the BOS policy come from ``tokenizer_config.json``, ``special_tokens_map.json`` and
``generation_config.json`` when they exist, because the tokenizer files alone do not say which token ends a
turn (Llama-3-Instruct stops on several) or whether the model was trained with a BOS token.

BOS/EOS are always added by this class, never by the ``tokenizers`` post-processor, so callers control them
with ``encode(..., bos=, eos=)`` and a BOS is never added twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lit_qa.errors import LitQAError, not_found
from lit_qa.files import file_sha256, read_json_object

# What a converter copies from a Hugging Face snapshot into a checkpoint folder (whichever exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",  # where transformers >= 4.43 saves the chat template instead of tokenizer_config.json
)


class Tokenizer:
    """Encode text to token ids and back, for a checkpoint folder.

    Attributes:
        checkpoint_dir: The folder the tokenizer was read from.
        backend: ``"huggingface"`` (``tokenizer.json``) or ``"sentencepiece"`` (``tokenizer.model``).
        vocab_size: One more than the largest token id, added tokens included. The model's embedding must
            have at least this many rows.
        bos_id: Id of the beginning-of-sequence token, or None if the tokenizer has none.
        eos_id: Id of the main end-of-sequence token, or None. This is the one ``encode(eos=True)`` appends.
        eos_ids: Every id that should stop generation: ``eos_id`` plus all of ``generation_config.json``'s
            ``eos_token_id`` (Llama-3-Instruct lists several).
        add_bos: Whether the model expects a BOS token in front of each sequence (the ``encode`` default).
        chat_template: The Jinja chat template from ``tokenizer_config.json`` or, failing that, from
            ``chat_template.jinja``; None if neither has one.
        chat_template_file: The file ``chat_template`` was read from (None without one), for messages.

    The BOS policy (``add_bos``), in order:

    1. ``add_bos_token`` in ``tokenizer_config.json`` when it is set;
    2. otherwise True for sentencepiece (what LLaMA 1 and Llama-2 were trained with);
    3. otherwise, for ``tokenizer.json``, True only if its post-processor would prepend the BOS token
       (Llama-3 does; SmolLM2 does not).

    It is always False when the tokenizer has no BOS token.

    Round trip: ``decode(encode(s, bos=False)) == s`` for any text with the byte-level BPE of ``tokenizer.json``
    and for LLaMA's sentencepiece model (identity normalization, extra whitespace kept, byte fallback).
    Sentencepiece marks a word start with ``▁`` and adds one to the front of the text ("dummy prefix"), and
    decoding drops that first one again, so leading spaces survive too. A sentencepiece model trained with
    NFKC normalization or ``remove_extra_whitespaces`` changes the text while encoding and cannot round trip.
    """

    def file_sha256(self) -> str:
        """SHA-256 of the vocabulary file (tokenizer.json or tokenizer.model): identifies the tokenizer beyond its
        size, e.g. to check that prepared data was tokenized by this very tokenizer."""
        name = "tokenizer.json" if self.backend == "huggingface" else "tokenizer.model"
        return file_sha256(self.checkpoint_dir / name)

    def __init__(self, checkpoint_dir: Path | str) -> None:
        """Read the tokenizer files of ``checkpoint_dir``.

        Args:
            checkpoint_dir: Folder holding ``tokenizer.json`` or ``tokenizer.model`` and, optionally,
                ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json`` and
                ``chat_template.jinja``.

        Raises:
            LitQAError: If the folder is missing, has no tokenizer file, or a tokenizer or metadata file cannot
                be parsed or names a token the tokenizer does not have.
        """
        self.checkpoint_dir = checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise LitQAError(f"checkpoint folder {checkpoint_dir} {not_found(checkpoint_dir)}")

        hf_path = checkpoint_dir / "tokenizer.json"
        sp_path = checkpoint_dir / "tokenizer.model"
        self._hf = None
        self._sp = None
        if hf_path.is_file():
            self.backend = "huggingface"
            self._hf = _load_hf(hf_path)
            self.vocab_size = max(self._hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        elif sp_path.is_file():
            self.backend = "sentencepiece"
            self._sp = _load_sentencepiece(sp_path)
            self.vocab_size = self._sp.get_piece_size()
        else:
            present = sorted(p.name for p in checkpoint_dir.iterdir())
            raise LitQAError(
                f"no tokenizer.json or tokenizer.model in {checkpoint_dir} (it has: {', '.join(present) or 'nothing'})"
            )

        # special_tokens_map.json is the older home of bos/eos names; tokenizer_config.json wins where both say.
        special_map = read_json_object(checkpoint_dir / "special_tokens_map.json", optional=True)
        config = read_json_object(checkpoint_dir / "tokenizer_config.json", optional=True)
        generation = read_json_object(checkpoint_dir / "generation_config.json", optional=True)
        config_path = checkpoint_dir / "tokenizer_config.json"

        self.bos_id = self._special_id("bos", config, special_map, generation)
        self.eos_id = self._special_id("eos", config, special_map, generation)

        gen_eos = generation.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {i for i in [self.eos_id, *gen_eos] if isinstance(i, int)}

        add_bos = config.get("add_bos_token")
        if add_bos is not None and not isinstance(add_bos, bool):
            raise LitQAError(f"{config_path}: add_bos_token must be true or false, got {add_bos!r}")
        if add_bos is None:
            add_bos = self.backend == "sentencepiece" or self._post_processor_adds_bos()
        self.add_bos = add_bos and self.bos_id is not None

        self.chat_template = _chat_template(config.get("chat_template"), config_path)
        self.chat_template_file = config_path if self.chat_template is not None else None
        jinja_path = checkpoint_dir / "chat_template.jinja"
        if self.chat_template is None and jinja_path.is_file():
            self.chat_template = jinja_path.read_text(encoding="utf-8")
            self.chat_template_file = jinja_path
        self._sp_specials = self._sentencepiece_specials()

    def encode(
        self,
        text: str,
        bos: bool | None = None,
        eos: bool = False,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        specials: bool = False,
    ) -> torch.Tensor:
        """Turn text into token ids.

        Args:
            text: The text. Special tokens written in it (e.g. ``<|im_start|>`` from a chat template) become
                their ids with ``tokenizer.json``; sentencepiece treats them as plain text unless ``specials``.
            bos: Prepend the BOS token. None follows the model (``self.add_bos``). Never adds a second BOS
                when the text already starts with one.
            eos: Append the EOS token (``self.eos_id``).
            max_length: Keep only the first ``max_length`` ids, counted after BOS/EOS are added (so a
                truncated sequence loses its EOS).
            device: Where to put the returned tensor.
            specials: With sentencepiece too, turn its control tokens written in the text (``<s>``, ``</s>``,
                ``<unk>``) into their ids, encoding the text between them piece by piece as Meta's Llama-2 chat
                code does. For text rendered from a chat template; ``tokenizer.json`` always does this.

        Returns:
            A 1-D ``torch.long`` tensor of ids.

        Raises:
            LitQAError: If BOS or EOS is asked for but the tokenizer has none.
        """
        if self._hf is not None:
            # add_special_tokens=False turns off the post-processor; BOS/EOS are added below instead.
            ids = self._hf.encode(text, add_special_tokens=False).ids
        elif specials and self._sp_specials is not None:
            ids = self._sp_encode_specials(text)
        else:
            ids = self._sp.encode(text)

        if bos is None:
            bos = self.add_bos
        if bos:
            if self.bos_id is None:
                raise LitQAError(f"tokenizer in {self.checkpoint_dir} has no BOS token, so cannot prepend one")
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
        if eos:
            if self.eos_id is None:
                raise LitQAError(f"tokenizer in {self.checkpoint_dir} has no EOS token, so cannot append one")
            ids = [*ids, self.eos_id]
        if max_length is not None:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text.

        Args:
            ids: A 1-D tensor or a list of ids.
            skip_special_tokens: Drop special tokens (BOS, EOS, chat markers) instead of writing them out.

        Returns:
            The text.
        """
        if isinstance(ids, torch.Tensor):
            if ids.ndim > 1:
                raise ValueError(f"decode takes a 1-D tensor of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        else:
            ids = [int(i) for i in ids]

        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

        # sentencepiece's decode always drops control tokens (<s>, </s>); to show them, decode the text
        # between them and write their pieces in place.
        sp = self._sp
        if skip_special_tokens:
            return sp.decode([i for i in ids if not sp.is_control(i)])
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if sp.is_control(i):
                parts += [sp.decode(run), sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        """Return the id of one token (e.g. ``"<|im_end|>"``), or None if the vocabulary lacks it."""
        if self._hf is not None:
            return self._hf.token_to_id(token)
        # piece_to_id answers unk_id for unknown pieces, so check the piece really is there.
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        """Return the token (piece) of one id, e.g. ``"<|im_end|>"`` for SmolLM2's EOS."""
        if self._hf is not None:
            token = self._hf.id_to_token(i)
            if token is None:
                raise LitQAError(f"tokenizer in {self.checkpoint_dir} has no token with id {i}")
            return token
        if not 0 <= i < self._sp.get_piece_size():
            raise LitQAError(f"tokenizer in {self.checkpoint_dir} has no token with id {i}")
        return self._sp.id_to_piece(i)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})"
        )

    def _special_id(self, kind: str, config: dict, special_map: dict, generation: dict) -> int | None:
        """Resolve the BOS or EOS id: named token in the configs, then generation_config, then the model file."""
        key = f"{kind}_token"
        source = "tokenizer_config.json" if key in config else "special_tokens_map.json"
        token = config[key] if key in config else special_map.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            i = self.token_to_id(token)
            if i is None:
                raise LitQAError(
                    f"{self.checkpoint_dir / source} names {key} {token!r}, which is not in the tokenizer's vocabulary"
                )
            return i
        gen = generation.get(f"{kind}_token_id")
        if isinstance(gen, list):
            gen = gen[0] if gen else None
        if isinstance(gen, int):
            return gen
        if self._sp is not None:
            i = self._sp.bos_id() if kind == "bos" else self._sp.eos_id()
            return i if i >= 0 else None  # sentencepiece says -1 for "no such token"
        return None

    def _sentencepiece_specials(self) -> re.Pattern | None:
        """A pattern matching sentencepiece's control and unknown pieces written as text (None for tokenizer.json)."""
        if self._sp is None:
            return None
        sp = self._sp
        pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
        pieces.discard("")
        # Longest first, so a piece that starts with a shorter one is matched whole.
        return re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))) if pieces else None

    def _sp_encode_specials(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._sp_specials.finditer(text):
            if match.start() > start:
                ids += self._sp.encode(text[start : match.start()])
            ids.append(self._sp.piece_to_id(match.group()))
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _post_processor_adds_bos(self) -> bool:
        """Whether tokenizer.json's post-processor would prepend BOS (the file's own default for this model)."""
        if self._hf is None or self.bos_id is None:
            return False
        with_specials = self._hf.encode("a", add_special_tokens=True).ids
        return bool(with_specials) and with_specials[0] == self.bos_id


def check_vocab_matches(tokenizer: Tokenizer, padded_vocab_size: int, checkpoint_dir: Path | str) -> None:
    """Fail early when a tokenizer can produce ids the model has no embedding row for.

    That happens when the checkpoint folder holds a tokenizer from another model; without this check the
    first out-of-range id ends in an opaque CUDA "index out of bounds" assert.

    Args:
        tokenizer: The tokenizer to check.
        padded_vocab_size: Rows of the model's embedding (``Config.padded_vocab_size``).
        checkpoint_dir: The folder named in the message.

    Raises:
        LitQAError: If ``tokenizer.vocab_size > padded_vocab_size``.
    """
    if tokenizer.vocab_size > padded_vocab_size:
        raise LitQAError(
            f"tokenizer in {checkpoint_dir} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{padded_vocab_size} rows"
        )


def _load_hf(path: Path) -> Any:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON or an unknown model
        raise LitQAError(f"cannot read {path}: {_one_line(e)}") from None
    # Some tokenizer.json files ship with truncation or padding switched on, which would silently cut or
    # pad every encoding; lengths are handled by the callers instead.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _load_sentencepiece(path: Path) -> Any:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:  # what the C++ parser raises for a bad or unreadable file
        raise LitQAError(f"cannot read {path}: {_one_line(e)}") from None


def _chat_template(value: Any, config_path: Path) -> str | None:
    """Return the chat template; some configs store a list of named templates, where "default" is the chat one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in value):
        named = {t.get("name"): t["template"] for t in value}
        return named.get("default", value[0]["template"] if value else None)
    raise LitQAError(f"{config_path}: chat_template must be a string or a list of named templates")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
