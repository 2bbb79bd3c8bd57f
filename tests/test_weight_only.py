# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Weight-only int8 / int4 decode modes (`lit_qa.quantize.weight_only`): the layers, the greedy outputs they give,
and the modes' refusals."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from helpers import run_script
from test_evaluation import sample_questions, squad_file
from test_quantize_bnb import make_wide_checkpoint

import lit_qa.quantize.modes as quantize_modes
import lit_qa.quantize.weight_only as weight_only
from lit_qa.errors import LitQAError
from lit_qa.generation.generate import generate
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, merge_lora_weights
from lit_qa.models.model import GPT
from lit_qa.quantize import check_quantize_args, quantize_model, weights_size_bytes
from lit_qa.quantize.bnb import BLOCK_LINEARS
from lit_qa.quantize.int4 import Int4Linear
from lit_qa.quantize.weight_only import Int8Linear, int4_linear, quantize_weight_only


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name("tiny-gqa", n_embd=64, intermediate_size=128, vocab_size=128)).eval()


def dequantized_copy(quantized: GPT) -> GPT:
    """The quantized model with every quantized layer replaced by an nn.Linear holding its dequantized weight."""
    reference = copy.deepcopy(quantized)
    for block in reference.transformer.h:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            layer = getattr(parent, child)
            linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
            linear.weight = nn.Parameter(layer.dense_weight(torch.float32), requires_grad=False)
            setattr(parent, child, linear)
    return reference


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (n,), generator=generator) for n in (5, 9, 3)]


def test_int8_layer_matches_its_dequantized_weight_and_the_original_closely():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    layer = Int8Linear.from_weight(linear.weight, linear.bias)
    x = torch.randn(7, 64)
    reference = nn.functional.linear(x, layer.dense_weight(), layer.bias)
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    # Per-row absmax int8: each weight within half a step of its row's scale.
    assert (layer.dense_weight() - linear.weight).abs().max() <= layer.scales.max() / 2 + 1e-7
    assert layer.qweight.dtype == torch.int8 and int(layer.qweight.abs().max()) == 127
    # bf16 activations use the int8 kernel too; the result is the bf16 matmul of the same numbers.
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_output_equals_the_dequantized_reference(mode):
    model = quantize_weight_only(tiny_model(), mode)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert all(isinstance(block.get_submodule(name), kind) for block in model.transformer.h for name in BLOCK_LINEARS)
    reference = dequantized_copy(model)
    ours = generate(model, prompts(), 12)
    theirs = generate(reference, prompts(), 12)
    assert [o.tolist() for o in ours] == [t.tolist() for t in theirs]
    with torch.no_grad():
        idx = torch.stack([p[:3] for p in prompts()])
        torch.testing.assert_close(model(idx), reference(idx), rtol=1e-4, atol=1e-4)


def test_bf16_greedy_decoding_equals_the_bf16_full_pass_reference():
    """The bf16 decode mode (KV cache, left-padded batch) picks, at every step, the argmax of a plain bf16 forward
    pass over the prompt and the tokens so far, each prompt alone and without a cache."""
    model = tiny_model().bfloat16()
    for prompt, new in zip(prompts(), generate(model, prompts(), 12), strict=True):
        sequence = prompt.clone()
        for token in new:
            with torch.no_grad():
                expected = model(sequence[None])[0, -1].argmax()
            assert int(token) == int(expected)
            sequence = torch.cat([sequence, expected[None]])


def test_int4_kernel_in_bf16_agrees_with_the_dense_bf16_reference():
    model = quantize_weight_only(tiny_model().bfloat16(), "int4")
    reference = dequantized_copy(model).bfloat16()
    idx = torch.stack([p[:3] for p in prompts()])
    with torch.no_grad():
        logits, expected = model(idx).float(), reference(idx).float()
    assert all(block.attn.q_proj._kernel is not None for block in model.transformer.h)  # the int4 kernel ran
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


def test_weights_shrink_and_merged_lora_is_quantized_exactly_like_a_plain_linear():
    base = tiny_model()
    full = weights_size_bytes(base)
    adapted = copy.deepcopy(base)
    apply_lora(adapted, LoRAConfig(r=4, alpha=8, query=True, value=True))
    for layer in adapted.modules():
        if hasattr(layer, "lora_B"):
            nn.init.normal_(layer.lora_B, std=0.02)
    merge_lora_weights(adapted)
    merged_weights = {k: v for k, v in adapted.state_dict().items() if "lora_" not in k}
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged_weights, strict=False)
    quantize_weight_only(adapted, "int8")
    quantize_weight_only(plain, "int8")
    assert [o.tolist() for o in generate(adapted, prompts(), 8)] == [o.tolist() for o in generate(plain, prompts(), 8)]
    int8, int4 = weights_size_bytes(plain), weights_size_bytes(quantize_weight_only(tiny_model(), "int4"))
    assert int4 < int8 < full


def test_modes_refuse_clearly():
    with pytest.raises(LitQAError, match="weight-only quantization is one of"):
        quantize_weight_only(tiny_model(), "int3")
    model = quantize_weight_only(tiny_model(), "int8")
    with pytest.raises(LitQAError, match="already quantized"):
        quantize_weight_only(model, "int4")
    odd = GPT(Config.from_name("tiny-gqa", n_embd=32, intermediate_size=64, vocab_size=128))
    with pytest.raises(LitQAError, match="multiple of the int4 group size 64"):
        quantize_weight_only(odd, "int4")
    check_quantize_args("int8")  # no bitsandbytes, no checkpoint needed
    modes = set(weight_only.WEIGHT_ONLY_MODES)
    assert modes == set(quantize_modes.WEIGHT_ONLY_MODES) and modes <= set(quantize_modes.QUANTIZE_CHOICES)
    with pytest.raises(LitQAError, match="--gptq_checkpoint is only used"):
        check_quantize_args("int4", "somewhere")
    assert isinstance(quantize_model(tiny_model(), "int8").transformer.h[0].attn.q_proj, Int8Linear)


def test_int4_linear_keeps_the_bias_and_moves_with_to():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=True)
    layer = int4_linear(linear.weight, linear.bias)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dense_weight(), linear.bias.half().float()))
    layer = Int8Linear.from_weight(linear.weight).to(torch.bfloat16)
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32


def test_generate_and_evaluate_scripts_decode_in_the_weight_only_modes(tmp_path):
    checkpoint = make_wide_checkpoint(tmp_path)
    result = run_script("generate/base.py", "--checkpoint_dir", str(checkpoint), "--prompt", "The Normans",
                        "--max_new_tokens", "5", "--precision", "32-true", "--quantize", "int8")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8" in result.stderr and "MB of weights" in result.stderr
    eval_file = squad_file(tmp_path / "eval.json", sample_questions())
    metrics, stderr = {}, {}
    for quantize in ("int4", "int8", None):
        out = tmp_path / f"eval-{quantize}"
        args = ["--quantize", quantize] if quantize else []
        result = run_script("evaluate/base.py", "--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file),
                            "--out_dir", str(out), "--max_new_tokens", "4", "--precision", "32-true",
                            *args)  # fmt: skip
        assert result.returncode == 0, result.stderr
        stderr[quantize] = result.stderr
        metrics[quantize] = json.loads((out / "metrics.json").read_text())
        assert metrics[quantize]["quantize"] == quantize and metrics[quantize]["total"] == len(sample_questions())
    # In fp32 the int4 kernel cannot run: one line says so (and the answers are still those of the int4 weights).
    assert "int4 kernel only with bf16" in stderr["int4"] and "int4 kernel" not in stderr["int8"]
    assert metrics["int4"]["weights_bytes"] < metrics["int8"]["weights_bytes"] < metrics[None]["weights_bytes"]
