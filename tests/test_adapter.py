# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LLaMA-Adapter v1/v2 invariants (zero gate = base model, cached decoding, only adapters train) and save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import sgd_step
from safetensors.torch import save_file

from lit_qa.checkpoints.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    load_adapter_checkpoint,
    save_adapter_checkpoint,
)
from lit_qa.checkpoints.folder import load_state_dict, save_checkpoint
from lit_qa.errors import LitQAError
from lit_qa.generation.generate import generate
from lit_qa.models.adapter import (
    AdapterAttention,
    AdapterConfig,
    AdapterV2Linear,
    adapter_state_dict,
    apply_adapter,
    mark_only_adapter_as_trainable,
)
from lit_qa.models.config import Config
from lit_qa.models.lora import count_parameters
from lit_qa.models.model import GPT, CausalSelfAttention, left_padding_positions

NAMES = ["tiny-gqa", "tiny-mha", "tiny-tied"]
LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_model(name: str = "tiny-gqa", seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config.from_name(name)).to(dtype).eval()


def open_gates(model: nn.Module, seed: int = 1) -> None:
    """Give the (zero-initialised) gates, scales and biases values that change the output visibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterAttention):
                module.adapter_gate.copy_(torch.rand(module.adapter_gate.shape, generator=generator) * 0.5 + 0.25)
            if isinstance(module, AdapterV2Linear):
                module.adapter_bias.copy_(torch.randn(module.adapter_bias.shape, generator=generator) * 0.05)
                module.adapter_scale.copy_(1 + torch.randn(module.adapter_scale.shape, generator=generator) * 0.05)


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)


def idx_for(model: GPT, length: int = 12) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(2))


def prompts_for(model: GPT) -> list[torch.Tensor]:
    """Three prompts of different lengths: the batch is left-padded."""
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=generator) for n in (3, 11, 6)]


def expected_adapter_keys(config: Config, adapter_config: AdapterConfig) -> set[str]:
    layers = range(adapter_config.start_layer, config.n_layer)
    keys = {f"transformer.h.{i}.attn.{name}" for i in layers for name in ("adapter_wte", "adapter_gate")}
    if adapter_config.version == 2:
        linears = [f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in LINEARS] + ["lm_head"]
        keys |= {f"{linear}.{name}" for linear in linears for name in ("adapter_bias", "adapter_scale")}
        norms = [f"transformer.h.{i}.{norm}" for i in range(config.n_layer) for norm in ("norm_1", "norm_2")]
        keys |= {f"{norm}.weight" for norm in [*norms, "transformer.ln_f"]}
    return keys


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_zero_gate_keeps_base_output_and_names(name, version):
    model = make_model(name)
    base_keys = set(model.state_dict())
    base_q = model.transformer.h[1].attn.q_proj.weight
    idx = idx_for(model)
    expected = logits(model, idx)
    adapter_config = AdapterConfig(version=version, start_layer=1)
    apply_adapter(model, adapter_config)

    assert type(model.transformer.h[0].attn) is CausalSelfAttention
    assert isinstance(model.transformer.h[1].attn, AdapterAttention)
    assert model.transformer.h[1].attn.q_proj.weight is base_q  # the same Parameter, not a copy
    assert all(torch.count_nonzero(m.adapter_gate) == 0 for m in model.modules() if isinstance(m, AdapterAttention))
    # Base names are unchanged: a plain GPT state dict plus the adapter's own tensors.
    added = set(model.state_dict()) - base_keys
    assert added == {k for k in expected_adapter_keys(model.config, adapter_config) if k.rpartition(".")[2] != "weight"}
    assert set(adapter_state_dict(model)) == expected_adapter_keys(model.config, adapter_config)
    torch.testing.assert_close(logits(model, idx), expected, atol=0, rtol=0)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight

    open_gates(model)
    assert (logits(model, idx) - expected).abs().max() > 1e-3  # the adapter changes the output well beyond atol


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_zero_gate_keeps_cached_generation_of_a_padded_batch(name, version, precision):
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    model = make_model(name, dtype=dtype)
    prompts = prompts_for(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        check_zero_gate_generation(model, prompts, version)


def check_zero_gate_generation(model: GPT, prompts: list[torch.Tensor], version: int) -> None:
    dtype = model.transformer.wte.weight.dtype
    expected = generate(model, prompts, max_new_tokens=8)
    # The prefill of the padded batch through the KV cache: every row's logits, padding rows included.
    idx = torch.stack([torch.cat((torch.zeros(11 - len(p), dtype=torch.long), p)) for p in prompts])
    slot_positions = left_padding_positions(torch.tensor([11 - len(p) for p in prompts]), 16)

    def prefill(model: GPT) -> torch.Tensor:
        model.set_kv_cache(len(prompts), 16)
        try:
            with torch.no_grad():
                return model(idx, torch.arange(11), slot_positions)
        finally:
            model.clear_kv_cache()

    expected_prefill = prefill(model)
    apply_adapter(model, AdapterConfig(version=version, start_layer=0))
    assert all(p.dtype == dtype for p in model.parameters())
    outputs = generate(model, prompts, max_new_tokens=8)
    assert all(torch.equal(out, ref) for out, ref in zip(outputs, expected))
    torch.testing.assert_close(prefill(model), expected_prefill, atol=0, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_matches_the_plain_forward(name, version):
    """With open gates, each row of a padded batch decoded through the KV cache gets the logits a plain forward
    of that row alone gives: the prompt is seen by every query, padding rows included, without a mask."""
    model = apply_adapter(make_model(name), AdapterConfig(version=version, start_layer=0, prompt_length=5))
    open_gates(model)
    prompts = prompts_for(model)
    outputs = generate(model, prompts, max_new_tokens=4)
    for prompt, output in zip(prompts, outputs):
        sequence = torch.cat((prompt, output))[None]
        greedy = logits(model, sequence)[0, len(prompt) - 1 : -1].argmax(-1)
        assert torch.equal(greedy, output)

    # The same through the cache, step by step, compared on the logits themselves.
    prompt = prompts[0]
    model.set_kv_cache(1, 8)
    try:
        with torch.no_grad():
            prefill = model(prompt[None], torch.arange(len(prompt)))
            step = model(torch.tensor([[7]]), torch.tensor([len(prompt)]))
    finally:
        model.clear_kv_cache()
    full = logits(model, torch.cat((prompt, torch.tensor([7])))[None])
    torch.testing.assert_close(torch.cat((prefill, step), dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefix_attention_is_the_papers_formula():
    """One layer's output against softmax(q k_p^T / sqrt(hs)) v_p written out, with GQA (2 key/value heads)."""
    torch.manual_seed(0)
    config = Config.from_name("tiny-gqa")
    base = CausalSelfAttention(config)
    attn = AdapterAttention(base, config, prompt_length=3)
    with torch.no_grad():
        attn.adapter_gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(2, 5, config.n_embd)
    cos, sin = torch.ones(5, config.head_size), torch.zeros(5, config.head_size)  # RoPE off: q as projected
    with torch.no_grad():
        out = attn(x, cos, sin)
        q = base.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)  # (B, nh, T, hs)
        k_p = base.k_proj(attn.adapter_wte).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # (nh, aT, hs)
        v_p = base.v_proj(attn.adapter_wte).view(3, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)
        prefix = torch.softmax(q @ k_p.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v_p  # (B, nh, T, hs)
        gated = attn.adapter_gate.view(1, 4, 1, 1) * prefix
        expected = base(x, cos, sin) + base.o_proj(gated.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_only_adapter_parameters_train(name, version):
    model = make_model(name)
    adapter_config = AdapterConfig(version=version, start_layer=1, prompt_length=4)
    apply_adapter(model, adapter_config)
    open_gates(model)  # with a zero gate the prompt's gradient is zero, so it would not move in the first step
    mark_only_adapter_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_adapter_keys(model.config, adapter_config) == set(adapter_state_dict(model))
    if version == 1:
        per_layer = 4 * model.config.n_embd + model.config.n_head
        assert count_parameters(model, trainable_only=True) == per_layer * (model.config.n_layer - 1)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    sgd_step(model, idx_for(model))

    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != (key in trainable), key
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad


def test_apply_adapter_refusals():
    model = make_model()
    with pytest.raises(LitQAError, match=r"^adapter start_layer=2 leaves no layer to adapt: tiny-gqa has layers 0..1$"):
        apply_adapter(model, AdapterConfig())
    apply_adapter(model, AdapterConfig(start_layer=1))
    with pytest.raises(LitQAError, match=r"already has adapters; apply_adapter was called twice"):
        apply_adapter(model, AdapterConfig(version=2, start_layer=1))


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(version=3), r"adapter version must be 1 or 2, got version=3"),
        (dict(prompt_length=0), r"adapter prompt_length must be >= 1"),
        (dict(start_layer=-1, prompt_length=0), r"prompt_length must be >= 1.*; adapter start_layer must be >= 0"),
    ],
)
def test_adapter_config_validation(values, message):
    with pytest.raises(LitQAError, match=message):
        AdapterConfig(**values)


def make_adapter(tmp_path: Path, name: str = "tiny-gqa", version: int = 1) -> tuple[GPT, AdapterConfig, Path, Path]:
    """A random base saved to tmp_path/base and a random adapter on it saved to tmp_path/adapter."""
    model = make_model(name)
    base = save_checkpoint(tmp_path / "base", model.config, model.state_dict())
    adapter_config = AdapterConfig(version=version, prompt_length=4, start_layer=1)
    apply_adapter(model, adapter_config)
    open_gates(model)
    if version == 2:
        with torch.no_grad():
            model.transformer.ln_f.weight.mul_(1.5)  # a trained norm must round-trip too
    adapter_dir = save_adapter_checkpoint(
        tmp_path / "adapter", model, adapter_config, base, extra={"hyperparameters.json": {"lr": 9e-3}}
    )
    return model.eval(), adapter_config, base, adapter_dir


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-tied"])
def test_save_and_load_round_trip(tmp_path, name, version):
    model, adapter_config, base, adapter_dir = make_adapter(tmp_path, name, version)
    assert sorted(p.name for p in adapter_dir.iterdir()) == sorted(
        [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, "base_checkpoint.json", "hyperparameters.json"]
    )
    assert set(load_state_dict(adapter_dir / ADAPTER_WEIGHTS_FILE)) == expected_adapter_keys(model.config, adapter_config)
    assert json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text()) == dict(version=version, prompt_length=4,
                                                                               start_layer=1)  # fmt: skip
    record = json.loads((adapter_dir / "base_checkpoint.json").read_text())
    assert record["path"] == str(base) and record["fingerprint"].startswith("sha256:")

    loaded, config, loaded_adapter_config = load_adapter_checkpoint(adapter_dir)  # base from the record
    assert loaded_adapter_config == adapter_config and config == model.config and not loaded.training
    idx = idx_for(model)
    torch.testing.assert_close(logits(loaded, idx), logits(model, idx), atol=0, rtol=0)
    if config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight

    loaded, _, _ = load_adapter_checkpoint(adapter_dir, dtype=torch.bfloat16)  # the adapter is cast with the base
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    torch.testing.assert_close(logits(loaded, idx).float(), logits(model, idx), atol=0.1, rtol=0.05)


def test_different_base_is_refused(tmp_path):
    _, _, _, adapter_dir = make_adapter(tmp_path)
    other = save_checkpoint(tmp_path / "other", make_model(seed=1).config, make_model(seed=1).state_dict())
    with pytest.raises(LitQAError, match=rf"^LLaMA-Adapter in {adapter_dir} was trained on a different base checkpoint \("):
        load_adapter_checkpoint(adapter_dir, other)
    load_adapter_checkpoint(adapter_dir, other, allow_different_base=True)

    mha = save_checkpoint(tmp_path / "mha", make_model("tiny-mha").config, make_model("tiny-mha").state_dict())
    with pytest.raises(LitQAError, match=r"another architecture .*n_query_groups 2 vs 4"):
        load_adapter_checkpoint(adapter_dir, mha, allow_different_base=True)


@pytest.mark.parametrize("edit", ["wrong shape", "missing", "unexpected"])
def test_bad_adapter_tensors_are_refused(tmp_path, edit):
    _, _, _, adapter_dir = make_adapter(tmp_path, version=2)
    tensors = load_state_dict(adapter_dir / ADAPTER_WEIGHTS_FILE)
    key = "transformer.h.1.attn.adapter_wte"
    if edit == "wrong shape":
        tensors[key] = torch.zeros(5, 32)
        message = rf"{key} has shape \(5, 32\) but adapter_config.json and the base need \(4, 32\)$"
    elif edit == "missing":
        del tensors[key]
        message = rf"missing LLaMA-Adapter tensors {key}$"
    else:
        tensors["transformer.h.0.attn.adapter_wte"] = torch.zeros(4, 32)  # layer 0 is below start_layer
        message = r"unexpected tensors transformer.h.0.attn.adapter_wte$"
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_FILE)
    with pytest.raises(LitQAError, match=message) as error:
        load_adapter_checkpoint(adapter_dir)
    assert "\n" not in str(error.value)


def test_incomplete_adapter_folder_is_refused(tmp_path):
    _, _, base, adapter_dir = make_adapter(tmp_path)
    base.rename(tmp_path / "moved")
    with pytest.raises(LitQAError, match=rf"base checkpoint {base} recorded in .*base_checkpoint.json does not exist"):
        load_adapter_checkpoint(adapter_dir)
    load_adapter_checkpoint(adapter_dir, tmp_path / "moved")  # the same weights elsewhere are fine

    (adapter_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps({"version": 1, "prompt_length": 4, "start_layer": 2}))
    with pytest.raises(LitQAError, match=r"start_layer=2 leaves no layer to adapt"):
        load_adapter_checkpoint(adapter_dir, tmp_path / "moved")
    (adapter_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps({"version": 1, "prompt_len": 4}))
    with pytest.raises(LitQAError, match=r"adapter_config.json: unknown LLaMA-Adapter config fields \['prompt_len'\]"):
        load_adapter_checkpoint(adapter_dir, tmp_path / "moved")
    (adapter_dir / ADAPTER_CONFIG_FILE).unlink()
    with pytest.raises(LitQAError, match=r"is not a LLaMA-Adapter checkpoint: missing adapter_config.json \(it has: "):
        load_adapter_checkpoint(adapter_dir)


def test_saving_without_an_adapter_is_refused(tmp_path):
    model = make_model()
    base = save_checkpoint(tmp_path / "base", model.config, model.state_dict())
    with pytest.raises(LitQAError, match=r"no adapter to save; call apply_adapter first"):
        save_adapter_checkpoint(tmp_path / "adapter", model, AdapterConfig(), base)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("quantize", ["bnb.int8", "bnb.nf4", "int8", "int4", "gptq.int4"])
def test_quantized_base_keeps_the_adapter_in_full_precision(tmp_path, version, quantize):
    from lit_qa.checkpoints.gptq import gptq_state_dict, save_gptq_checkpoint
    from lit_qa.quantize.bnb import is_bnb_layer
    from lit_qa.quantize.gptq import GPTQConfig
    from lit_qa.quantize.gptq_model import gptq_quantize_model
    from lit_qa.quantize.int4 import Int4Linear

    # 64 wide: bitsandbytes' CPU 4-bit kernels need rows of whole 64-weight blocks.
    torch.manual_seed(0)
    base_model = GPT(Config.from_name("tiny-gqa", n_embd=64, intermediate_size=128)).eval()
    base = save_checkpoint(tmp_path / "base", base_model.config, base_model.state_dict())
    gptq_dir = None
    if quantize == "gptq.int4":
        calibration = [torch.randint(0, base_model.config.vocab_size, (48,)) for _ in range(8)]
        quantized_base = GPT(base_model.config).eval()
        quantized_base.load_state_dict(base_model.state_dict())
        packed, _ = gptq_quantize_model(quantized_base, calibration, GPTQConfig(group_size=32), progress=False)
        gptq_dir = save_gptq_checkpoint(tmp_path / "gptq", base_model.config, gptq_state_dict(quantized_base, packed),
                                        GPTQConfig(group_size=32).to_quantize_config())  # fmt: skip
    adapter_config = AdapterConfig(version=version, prompt_length=4, start_layer=1)
    apply_adapter(base_model, adapter_config)
    open_gates(base_model)
    adapter_dir = save_adapter_checkpoint(tmp_path / "adapter", base_model, adapter_config, base)
    idx = idx_for(base_model)
    expected = logits(base_model, idx)

    model, _, _ = load_adapter_checkpoint(adapter_dir, quantize=quantize, gptq_checkpoint=gptq_dir)
    q_proj = model.transformer.h[0].attn.q_proj
    q_proj = q_proj.base_layer if version == 2 else q_proj
    from lit_qa.quantize.weight_only import Int8Linear

    kind = {"gptq.int4": Int4Linear, "int4": Int4Linear, "int8": Int8Linear}.get(quantize)
    assert isinstance(q_proj, kind) if kind else is_bnb_layer(q_proj)
    # The adapter itself is loaded exactly, in full precision.
    saved = adapter_state_dict(base_model)
    for name, tensor in adapter_state_dict(model).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, saved[name]), name
    quantized = logits(model, idx)
    error = ((quantized - expected).norm() / expected.norm()).item()
    # Quantization error bounds of the plain model (tests/test_quantize_bnb.py, tests/test_gptq.py) ...
    assert error < {"bnb.int8": 0.02, "bnb.nf4": 0.15, "int8": 0.02, "int4": 0.15, "gptq.int4": 0.1}[quantize]
    # ... and the adapter still matters: without its trained gates/scales the output is much further away.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdapterAttention):
                module.adapter_gate.zero_()
            if isinstance(module, AdapterV2Linear):
                module.adapter_bias.zero_()
                module.adapter_scale.fill_(1.0)
    assert ((logits(model, idx) - expected).norm() / expected.norm()).item() > 2 * error
