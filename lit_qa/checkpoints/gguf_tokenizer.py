# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Rebuilding a Hugging Face ``tokenizer.json`` (and its config files) from a GGUF file's tokenizer metadata.

The rebuild follows the ideas of transformers' ``integrations/gguf/gguf_tokenizer_mapping.py`` (Apache 2.0) and
the pre-tokenizer regexes of llama.cpp's ``src/llama-vocab.cpp``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lit_qa.checkpoints.gguf_reader import GGUFFile
from lit_qa.models.config import Config

_UNKNOWN, _CONTROL, _USER_DEFINED = gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED

# Llama-3's split regex, as in its tokenizer.json and llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's: 's|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # StarCoder and SmolLM split every digit off first (llama.cpp's regex list starts with \p{N}).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()])


def _llama3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )



# tokenizer.ggml.pre -> how text is cut into words before the merges run (llama.cpp's llama-vocab.cpp).
_BYTE_LEVEL_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo"), _gpt2_pre_tokenizer),
    **dict.fromkeys(("starcoder", "refact", "smollm", "codeshell"), _digits_gpt2_pre_tokenizer),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe"), _llama3_pre_tokenizer),
}

def gguf_tokenizer_files(source: GGUFFile, config: Config) -> dict[str, str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` in Hugging Face's formats."""
    kind = source.get("tokenizer.ggml.model", None)
    if kind is None:
        raise source.error("the file has no tokenizer (metadata key 'tokenizer.ggml.model' is missing)")
    tokens = source.get("tokenizer.ggml.tokens")
    if len(tokens) > config.padded_vocab_size:
        raise source.error(f"{len(tokens)} tokens but the embedding has only {config.padded_vocab_size} rows")
    ids = _special_token_ids(source, len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(source, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(source, tokens, ids.get("unknown"))
    else:
        raise source.error(f"tokenizer model {kind!r} is not supported yet (only 'gpt2' and 'llama')")
    _add_special_tokens(tokenizer, tokens, source.get("tokenizer.ggml.token_type", None))

    # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
    add_bos = bool(source.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos" in ids
    add_eos = bool(source.get("tokenizer.ggml.add_eos_token", False)) and "eos" in ids
    _set_post_processor(tokenizer, kind, tokens, ids, add_bos, add_eos)

    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _to_json(_tokenizer_config(source, config, tokens, ids, add_bos, add_eos)),
        "generation_config.json": _to_json(_generation_config(ids)),
    }


def _tokenizer_config(
    source: GGUFFile, config: Config, tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool
) -> dict[str, Any]:
    tokenizer_config: dict[str, Any] = {"add_bos_token": add_bos, "add_eos_token": add_eos}
    for hf_name, kind in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if kind in ids:
            tokenizer_config[f"{hf_name}_token"] = tokens[ids[kind]]
    if (chat_template := source.get("tokenizer.chat_template", None)) is not None:
        tokenizer_config["chat_template"] = chat_template
    tokenizer_config.update(
        clean_up_tokenization_spaces=False,
        model_max_length=config.block_size,
        tokenizer_class="PreTrainedTokenizerFast",  # lets transformers' AutoTokenizer open the folder too
    )
    return tokenizer_config


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    generation_config: dict[str, Any] = {"bos_token_id": ids.get("bos")}
    # Chat models may end a turn with EOT/EOM rather than EOS (Llama-3); generation stops on any of them.
    stop_ids = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    generation_config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids or None
    if "padding" in ids:
        generation_config["pad_token_id"] = ids["padding"]
    return generation_config


def _to_json(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=2, ensure_ascii=False) + "\n"


def _special_token_ids(source: GGUFFile, n_tokens: int) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        token_id = source.get(f"tokenizer.ggml.{kind}_token_id", None)
        if token_id is None:
            continue
        if not 0 <= token_id < n_tokens:
            raise source.error(f"tokenizer.ggml.{kind}_token_id={token_id} is outside the {n_tokens} tokens")
        ids[kind] = token_id
    return ids


def _bpe_merges(source: GGUFFile) -> list[tuple[str, str]] | None:
    merges = source.get("tokenizer.ggml.merges", None)
    if merges is None:
        return None
    pairs = [tuple(merge.split(" ")) for merge in merges]
    if bad := [merge for merge, pair in zip(merges, pairs) if len(pair) != 2]:
        raise source.error(f"malformed tokenizer merges, e.g. {bad[0]!r}")
    return pairs


def _byte_level_bpe(source: GGUFFile, tokens: list[str]) -> Tokenizer:
    """GPT-2 style byte-level BPE (SmolLM2, Llama-3): tokens are already spelled in GPT-2's byte alphabet."""
    pre = source.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        known = ", ".join(sorted(_BYTE_LEVEL_PRE_TOKENIZERS))
        raise source.error(f"pre-tokenizer {pre!r} is not supported yet (known: {known})")
    merges = _bpe_merges(source)
    if merges is None:
        raise source.error("byte-level BPE tokenizer without 'tokenizer.ggml.merges'")
    tokenizer = Tokenizer(_bpe_model(source, {t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = _BYTE_LEVEL_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(source: GGUFFile, tokens: list[str], unk_id: int | None) -> Tokenizer:
    """SentencePiece BPE (LLaMA 1/2): ``▁`` marks word starts, unknown bytes fall back to ``<0xNN>`` tokens.

    This is the tokenizer.json transformers builds for ``LlamaTokenizer`` (legacy=False).
    """
    merges = _bpe_merges(source)
    if merges is None:
        merges = _merges_from_scores(tokens, source.get("tokenizer.ggml.scores"))
    unk = tokens[unk_id] if unk_id is not None else None
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = _bpe_model(source, vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(bpe)
    add_prefix = bool(source.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # drop the space the encoder put in front
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary, which keeps a score per piece instead of a merge list.

    Each split of a piece into two known pieces is a merge ranked by the piece's score, best first; ties go to
    shorter left, then right, parts. Same order as transformers' ``generate_merges``, so both tokenize alike.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates += [(left, right, score) for left, right in pairs]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _bpe_model(source: GGUFFile, vocab: dict[str, int], merges: list[tuple[str, str]], **kwargs: Any) -> models.BPE:
    try:
        return models.BPE(vocab=vocab, merges=merges, **kwargs)
    except Exception as e:  # tokenizers raises a bare Exception for merges naming unknown tokens
        raise source.error(f"cannot build the BPE tokenizer: {e}") from None


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int] | None) -> None:
    """Keep control tokens (``<|im_start|>``, ``<s>``) and user-defined ones whole instead of splitting them."""
    types = token_types or []
    special = [t for t, kind in zip(tokens, types) if kind in (_UNKNOWN, _CONTROL)]
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    # They are in the vocabulary already, so adding them gives no new ids, only whole-token matching.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(
    tokenizer: Tokenizer, kind: str, tokens: list[str], ids: dict[str, int], add_bos: bool, add_eos: bool
) -> None:
    """BOS/EOS as Hugging Face writes them (lit-qa's `Tokenizer` adds them itself and ignores this)."""
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    added = [k for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
    if added:
        bos = [tokens[ids["bos"]]] if add_bos else []
        eos = [tokens[ids["eos"]]] if add_eos else []
        single = " ".join([*bos, "$A", *eos])
        pair = " ".join([single, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)])
        special = [(tokens[ids[k]], ids[k]) for k in added]
        steps.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=special))
    if steps:
        tokenizer.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
