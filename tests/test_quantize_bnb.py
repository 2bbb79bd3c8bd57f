# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""bitsandbytes quantization (`lit_qa.quantize.bnb`): the swapped layers, their accuracy, sizes, flags and scripts.

The tiny model is 64 wide: bitsandbytes' CPU 4-bit kernels need rows of whole 64-weight blocks (they get
narrower rows wrong, so `quantize_bnb` refuses them), and its CPU inference layout tiles 32 output rows.

Accuracy against full precision, measured on `wide_model` (seed 0) with bitsandbytes 0.50.2 on CPU; the
asserted bounds leave headroom for other CPUs and bitsandbytes versions:

    mode   weights' rel. error   logits' rel. error   top-1 agreement   bounds asserted
    int8   0.006                 0.008                0.99              0.01 / 0.02 / 0.95
    nf4    0.092                 0.096                0.85              0.10 / 0.15 / 0.75
    fp4    0.122                 0.143                0.80              0.13 / 0.20 / 0.70

The weights' error is the format's own (NF4 at block size 64 loses ~9 % on normal weights, on real models
too); the logits' error is that error carried through the network. A random model's logits are nearly flat,
so top-1 flips easily, and greedy generation is compared to full precision for int8 only. On SmolLM2-135M
(the slow test, a 134-token Wikipedia paragraph) the weights' errors are the same but compound over 30 layers:
logits' rel. error 0.08 / 0.32 / 0.41, top-1 agreement 0.90 / 0.66 / 0.60, and the next-token loss rises
from 2.97 to 3.01 / 3.17 / 3.45 nats.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, make_tiny_tokenizer, real_smollm2, run_script
from test_evaluation import sample_questions, squad_file

from lit_qa.checkpoints.folder import load_model, save_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.generation.generate import generate
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, merge_lora_weights
from lit_qa.models.model import GPT
from lit_qa.quantize import check_quantize_args, quantize_model, weights_size_bytes
from lit_qa.quantize.bnb import BLOCK_LINEARS, import_bitsandbytes, is_bnb_layer

MODES = ("bnb.int8", "bnb.nf4", "bnb.fp4")
# mode: (weights' rel. error, logits' rel. error, top-1 agreement) bounds; see the module docstring.
BOUNDS = {"bnb.int8": (0.01, 0.02, 0.95), "bnb.nf4": (0.10, 0.15, 0.75), "bnb.fp4": (0.13, 0.20, 0.70)}
WIDE = {**TINY, "name": "tiny-wide", "n_embd": 64, "intermediate_size": 128}


def make_wide_checkpoint(root: Path) -> Path:
    """`helpers.make_tiny_checkpoint`, but 64 wide, so that every layer suits bitsandbytes' CPU 4-bit kernels."""
    tokenizer_dir = make_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    config = Config(**WIDE)
    files = {name: tokenizer_dir / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_checkpoint(root / "wide", config, GPT(config).state_dict(), extra_files=files)


@pytest.fixture
def wide_model() -> GPT:
    torch.manual_seed(0)
    return GPT(Config.from_name("tiny-gqa", n_embd=64, intermediate_size=128, vocab_size=128)).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().float(), expected.detach().float()
    return float((actual - expected).norm() / expected.norm())


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes layer holds, as full-precision values (call before its first eval forward)."""
    functional = import_bitsandbytes().functional
    if hasattr(layer, "state"):  # int8: codes times row scales / 127
        return functional.int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB)
    return functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def dequantized_copy(model: GPT, quantized: GPT) -> GPT:
    """A full-precision copy of ``model`` whose block linears hold exactly the quantized layers' weights."""
    reference = copy.deepcopy(model)
    for name, layer in quantized.named_modules():
        if is_bnb_layer(layer):
            reference.get_submodule(name).weight.data.copy_(dequantized_weight(layer))
    return reference


@pytest.mark.parametrize("mode", MODES)
def test_block_linears_are_swapped_and_the_rest_is_untouched(wide_model, mode):
    expected_class = "Linear8bitLt" if mode == "bnb.int8" else "Linear4bit"
    keys, wte, head = set(wide_model.state_dict()), wide_model.transformer.wte, wide_model.lm_head
    quantize_model(wide_model, mode)
    swapped = {name for name, module in wide_model.named_modules() if is_bnb_layer(module)}
    assert swapped == {f"transformer.h.{i}.{layer}" for i in range(2) for layer in BLOCK_LINEARS}
    assert {type(wide_model.get_submodule(name)).__name__ for name in swapped} == {expected_class}
    assert wide_model.transformer.wte is wte and wide_model.lm_head is head
    assert type(head) is torch.nn.Linear and head.weight.dtype == wte.weight.dtype == torch.float32
    assert all(not p.requires_grad for name, p in wide_model.named_parameters() if ".attn." in name or ".mlp." in name)
    # The quantized weight keeps its key (bitsandbytes adds its statistics next to it).
    assert keys <= set(wide_model.state_dict())
    with pytest.raises(LitQAError, match="already quantized"):
        quantize_model(wide_model, mode)


@pytest.mark.parametrize("mode", MODES)
def test_logits_are_close_to_full_precision(wide_model, mode):
    weight_bound, logits_bound, top1_bound = BOUNDS[mode]
    idx = torch.randint(0, 128, (4, 32))
    with torch.no_grad():
        expected = wide_model(idx)
    quantized = quantize_model(copy.deepcopy(wide_model), mode)
    for name, layer in quantized.named_modules():
        if is_bnb_layer(layer):  # the values of the loaded weights are kept, to the format's precision
            assert relative_error(dequantized_weight(layer), wide_model.get_submodule(name).weight) < weight_bound
    with torch.no_grad():
        logits = quantized(idx)
    assert logits.dtype == torch.float32
    assert relative_error(logits, expected) < logits_bound
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= top1_bound


@pytest.mark.parametrize("for_training", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_quantized_model_computes_with_its_quantized_weights(wide_model, mode, for_training):
    """The bnb model equals full precision run on its dequantized weights: exactly where bitsandbytes dequantizes
    and multiplies in fp32 (training mode, and 4-bit with ``for_training``); within bf16 / int8-activation
    rounding in its CPU inference kernels (4-bit packed for AVX512-bf16, LLM.int8's int8 activations)."""
    quantized = quantize_model(copy.deepcopy(wide_model), mode, for_training=for_training)
    reference = dequantized_copy(wide_model, quantized)
    idx = torch.randint(0, 128, (3, 20))
    with torch.no_grad():
        expected = reference(idx)
        torch.testing.assert_close(quantized.train()(idx), expected, rtol=1e-5, atol=1e-5)
        inference = quantized.eval()(idx)
    exact = for_training and mode != "bnb.int8"
    assert relative_error(inference, expected) < (1e-6 if exact else 2e-2)

    # Greedy generation (KV cache, batched, left-padded) through the quantized layers.
    prompts = [torch.randint(0, 128, (n,)) for n in (5, 9, 3)]
    generated, reference_generated = generate(quantized, prompts, 8), generate(reference, prompts, 8)
    if exact:
        assert [t.tolist() for t in generated] == [t.tolist() for t in reference_generated]
    else:
        agree = sum((a == b).sum() for a, b in zip(generated, reference_generated)) / 24
        assert agree >= 0.75


def test_int8_greedy_generation_mostly_agrees_with_full_precision(wide_model):
    """Only int8 is close enough for a random model's flat logits; 4-bit is compared to its own dequantized
    weights above, and to full precision on the real model in the slow test."""
    prompts = [torch.randint(0, 128, (n,)) for n in (5, 9, 13, 7)]
    expected = generate(wide_model, prompts, 12)
    quantized = quantize_model(copy.deepcopy(wide_model), "bnb.int8")
    agree = sum((a == b).sum() for a, b in zip(generate(quantized, prompts, 12), expected)) / 48
    assert agree >= 0.75  # measured 0.81


def test_4bit_on_cpu_needs_rows_of_whole_blocks():
    torch.manual_seed(0)
    narrow = GPT(Config.from_name("tiny-gqa"))  # n_embd 32: half a 64-weight block per row
    with pytest.raises(LitQAError, match="multiple of 64"):
        quantize_model(copy.deepcopy(narrow), "bnb.nf4")
    quantize_model(narrow, "bnb.int8")  # int8 scales whole rows: any width works


def test_weights_size_bytes():
    torch.manual_seed(0)
    config = Config(name="size", block_size=16, vocab_size=64, n_layer=1, n_head=4, n_embd=256, intermediate_size=512)
    model = GPT(config)
    linear = sum(p.numel() for name, p in model.named_parameters() if ".attn." in name or ".mlp." in name)
    rest = sum(p.numel() for p in model.parameters()) * 4 - linear * 4
    assert weights_size_bytes(model) == rest + linear * 4  # fp32; the RoPE cache is not a weight
    model.set_kv_cache(batch_size=2)
    assert weights_size_bytes(model) == rest + linear * 4  # nor is the KV cache
    model.clear_kv_cache()
    # Linear part, fp32 -> nf4: 4 bytes -> 0.5 + 1/64 (8-bit absmax per block of 64) + code tables: ~7.6x.
    # (The often-quoted ~4x is against bf16 weights.) int8: 1 byte + a 4-byte scale per row of 256: ~3.9x.
    nf4 = weights_size_bytes(quantize_model(copy.deepcopy(model), "bnb.nf4")) - rest
    int8 = weights_size_bytes(quantize_model(copy.deepcopy(model), "bnb.int8")) - rest
    assert 7.3 < linear * 4 / nf4 < 4 / 0.5 and 3.8 < linear * 4 / int8 < 4.0
    tied = GPT(Config.from_name("tiny-tied"))
    assert weights_size_bytes(tied) == 4 * sum(p.numel() for p in tied.parameters())  # the shared matrix once


def test_lora_must_be_merged_before_quantizing(wide_model):
    apply_lora(wide_model, LoRAConfig(r=2, alpha=4, query=True, value=True))
    with pytest.raises(LitQAError, match="unmerged LoRA"):
        quantize_model(copy.deepcopy(wide_model), "bnb.nf4")
    merge_lora_weights(wide_model)
    quantize_model(wide_model, "bnb.nf4")
    assert is_bnb_layer(wide_model.transformer.h[0].attn.q_proj)  # the merged LoRA layer was replaced


def test_bad_modes_and_flags_are_one_line_errors(tmp_path, wide_model):
    cases = [
        (lambda: quantize_model(wide_model, "bnb.int3"), "bnb.int3"),
        (lambda: quantize_model(wide_model, "gptq.int4"), "gptq.int4"),
        (lambda: check_quantize_args("int3"), "--quantize must be one of"),  # int8 is a mode now
        (lambda: check_quantize_args("gptq.int4"), "needs --gptq_checkpoint"),
        (lambda: check_quantize_args("gptq.int4", tmp_path / "missing"), "not found"),
        (lambda: check_quantize_args("bnb.nf4", tmp_path), "only used with --quantize gptq.int4"),
        (lambda: check_quantize_args(None, tmp_path), "only used with --quantize gptq.int4"),
    ]
    for call, message in cases:
        with pytest.raises(LitQAError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    check_quantize_args(None)
    check_quantize_args("bnb.nf4")
    check_quantize_args("gptq.int4", tmp_path)


def test_generate_and_evaluate_scripts_with_quantize(tmp_path):
    checkpoint = make_wide_checkpoint(tmp_path)
    result = run_script("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", "The Normans",
                        "--max_new_tokens", "5", "--precision", "32-true", "--quantize", "bnb.nf4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bnb.nf4" in result.stderr and "MB of weights" in result.stderr
    assert "gemm_4bit" not in result.stderr and "warning" not in result.stderr.lower()  # bitsandbytes kept quiet
    bad = run_script("generate/base.py", "--checkpoint_dir", str(checkpoint), "--quantize", "gptq.int4")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--gptq_checkpoint" in bad.stderr

    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    sizes = {}
    for quantize in ("bnb.int8", None):
        out = tmp_path / f"eval-{quantize}"
        args = ["--quantize", quantize] if quantize else []
        result = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file),
                            "--out_dir", str(out), "--max_new_tokens", "4", "--precision", "32-true",
                            *args)  # fmt: skip
        assert result.returncode == 0, result.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["quantize"] == quantize and metrics["total"] == len(sample_questions())
        sizes[quantize] = metrics["weights_bytes"]
    assert sizes["bnb.int8"] < sizes[None] == weights_size_bytes(load_model(checkpoint)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_quantize_onto_the_gpu(wide_model):
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = wide_model(idx)
    for mode in MODES:
        quantized = quantize_model(copy.deepcopy(wide_model), mode, device="cuda")
        assert all(p.device.type == "cuda" for p in quantized.parameters())
        with torch.no_grad():
            assert relative_error(quantized(idx.cuda()).cpu(), expected) < BOUNDS[mode][1]


PARAGRAPH = (
    "The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who in the 10th and 11th "
    'centuries gave their name to Normandy, a region in France. They were descended from Norse ("Norman" comes '
    'from "Norseman") raiders and pirates from Denmark, Iceland and Norway who, under their leader Rollo, agreed '
    "to swear fealty to King Charles III of West Francia. Through generations of assimilation and mixing with the "
    "native Frankish and Roman-Gaulish populations, their descendants would gradually merge with the Carolingian-"
    "based cultures of West Francia."
)


@pytest.mark.slow
def test_real_smollm2_quantized(tmp_path):
    checkpoint = real_smollm2(tmp_path / "smol")
    from lit_qa.models.tokenizer import Tokenizer

    model = load_model(checkpoint, dtype=torch.float32)[0]
    idx = Tokenizer(checkpoint).encode(PARAGRAPH)[None]
    model.max_seq_length = idx.size(1)
    with torch.no_grad():
        expected = model(idx)
    loss = torch.nn.functional.cross_entropy(expected[0, :-1], idx[0, 1:])
    # mode: bounds on (logits' rel. error, top-1 agreement, next-token loss increase in nats); measured
    # 0.08 / 0.90 / 0.04, 0.32 / 0.66 / 0.19, 0.41 / 0.60 / 0.48.
    bounds = {"bnb.int8": (0.15, 0.85, 0.1), "bnb.nf4": (0.45, 0.55, 0.35), "bnb.fp4": (0.6, 0.5, 0.8)}
    for mode, (logits_bound, top1_bound, loss_bound) in bounds.items():
        quantized = quantize_model(copy.deepcopy(model), mode)
        with torch.no_grad():
            logits = quantized(idx)
        assert relative_error(logits, expected) < logits_bound, mode
        assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= top1_bound, mode
        assert torch.nn.functional.cross_entropy(logits[0, :-1], idx[0, 1:]) - loss < loss_bound, mode


def test_evaluate_adapter_script_with_quantize(tmp_path):
    from lit_qa.checkpoints.adapter import save_adapter_checkpoint
    from lit_qa.models.adapter import AdapterConfig, apply_adapter

    checkpoint = make_wide_checkpoint(tmp_path)
    model, _ = load_model(checkpoint)
    adapter_config = AdapterConfig(version=2, prompt_length=4, start_layer=0)
    adapter_dir = save_adapter_checkpoint(tmp_path / "adapter", apply_adapter(model, adapter_config), adapter_config,
                                          checkpoint)  # fmt: skip
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    out = tmp_path / "eval-nf4"
    result = run_script("evaluate/adapter.py", "--adapter_dir", str(adapter_dir), "--eval_file", str(eval_file),
                        "--out_dir", str(out), "--max_new_tokens", "4", "--precision", "32-true",
                        "--quantize", "bnb.nf4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantize"] == "bnb.nf4" and metrics["total"] == len(sample_questions())
    # The block linears shrink ~7x; the fp32 embedding and head (half of this tiny model) stay as they are.
    assert metrics["weights_bytes"] < 0.65 * weights_size_bytes(load_model(checkpoint)[0])
    bad = run_script("evaluate/adapter.py", "--adapter_dir", str(adapter_dir), "--eval_file", str(eval_file),
                     "--out_dir", str(tmp_path / "bad"), "--quantize", "gptq.int4")  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--gptq_checkpoint" in bad.stderr
