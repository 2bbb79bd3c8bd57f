# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The memory estimator: hand-computed parameter bytes on tiny-gqa, the activation formula against what autograd
really keeps, and the script end to end."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import run_script

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.training.loss import token_loss_sum
from lit_qa.training.memory import (
    GB,
    TrainingSetup,
    activation_bytes,
    block_activation_bytes,
    estimate_memory,
    largest_micro_batch,
)

# tiny-gqa: 2 layers, n_embd 32, 4 heads of 8, 2 key/value groups (k, v: 16 wide), MLP 64, vocab 100, untied.
# Per block: q 32*32 + k 32*16 + v 32*16 + o 32*32 + gate, up, down 3 * 32*64 = 9216 linear weights.
BLOCK_LINEAR = 1024 + 512 + 512 + 1024 + 3 * 2048
ALL_PARAMS = 2 * BLOCK_LINEAR + 2 * 100 * 32 + 5 * 32  # blocks, embedding + head, 5 RMSNorms = 24992
LORA_QV = 2 * (8 * (32 + 32) + 8 * (32 + 16))  # r (in + out) for q and v in 2 layers = 1792


@pytest.fixture
def config() -> Config:
    return Config.from_name("tiny-gqa")


def setup(**overrides) -> TrainingSetup:
    return TrainingSetup(**{"micro_batch_size": 2, "seq_length": 16, "adapter_start_layer": 1, **overrides})


def test_full_fine_tuning_bytes(config):
    fp32 = estimate_memory(config, setup(method="full", precision="32-true"))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * ALL_PARAMS, 4 * ALL_PARAMS, 8 * ALL_PARAMS)
    bf16 = estimate_memory(config, setup(method="full", precision="bf16-true"))
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (2 * ALL_PARAMS, 2 * ALL_PARAMS, 4 * ALL_PARAMS)
    # -mixed keeps fp32 weights (they are the master copy), so fp32 gradients and optimizer states.
    mixed = estimate_memory(config, setup(method="full", precision="bf16-mixed"))
    assert (mixed.weights, mixed.gradients, mixed.optimizer) == (fp32.weights, fp32.gradients, fp32.optimizer)


def test_lora_trains_only_the_adapter(config):
    lora = estimate_memory(config, setup(method="lora", precision="bf16-true", lora_r=8, lora_targets=("q", "v")))
    assert lora.weights == 2 * (ALL_PARAMS + LORA_QV)
    assert (lora.gradients, lora.optimizer) == (2 * LORA_QV, 4 * LORA_QV)


def test_fsdp_shards_over_world_size_and_ddp_replicates(config):
    single = estimate_memory(config, setup(method="full"))
    fsdp = estimate_memory(config, setup(method="full", devices=2, num_nodes=2, strategy="fsdp"))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (single.weights / 4, single.gradients / 4,
                                                              single.optimizer / 4)  # fmt: skip
    assert fsdp.transient > 0  # gathered blocks and root
    ddp = estimate_memory(config, setup(method="full", devices=4, strategy="ddp"))
    assert (ddp.weights, ddp.optimizer) == (single.weights, single.optimizer)
    assert ddp.gradients == 2 * single.gradients  # DDP's gradient buckets


def test_qlora_quantizes_block_linears_only(config):
    qlora = estimate_memory(config, setup(method="qlora", precision="bf16-true"))
    # nf4: half a byte plus an fp32 absmax per 64 values; everything else and the LoRA tensors in bf16.
    assert qlora.weights == 2 * BLOCK_LINEAR * (0.5 + 4 / 64) + 2 * (ALL_PARAMS - 2 * BLOCK_LINEAR + LORA_QV)
    assert qlora.gradients == 2 * LORA_QV
    with pytest.raises(LitQAError, match="qlora"):
        estimate_memory(config, setup(method="qlora", precision="bf16-mixed"))


def test_block_activations_by_hand(config):
    # Full fine-tuning, bf16, on CUDA: per token of one block, in bytes.
    norms = 2 * (4 * 32 + 4 + 2 * 32)  # fp32 input copy, rsqrt, normalised x (trainable norm weight)
    attention = 2 * (32 + 16 + 16 + 32) + 4 * 4  # q, k, v, output; fp32 logsumexp per head
    linear_inputs = 2 * 32 + 2 * 32 + 2 * 64  # norm_1 output (q/k/v), norm_2 output (gate/up), down's input
    swiglu = 3 * 2 * 64  # gate output, silu output, up output
    expected = norms + attention + linear_inputs + swiglu
    assert block_activation_bytes(config, setup(method="full", precision="bf16-true")) == expected == 1240


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
@pytest.mark.parametrize(
    ("method", "targets", "dropout"),
    [("full", ("q", "v"), 0.0), ("lora", ("q", "v"), 0.05), ("lora", ("k", "o", "mlp"), 0.0)],
)
def test_block_formula_matches_what_autograd_saves(precision, method, targets, dropout):
    """Count the bytes of distinct storages autograd saves in a 3- and a 2-layer model: the difference is one block."""
    spec = setup(method=method, precision=precision, lora_targets=targets, lora_dropout=dropout, accelerator="cpu")
    base = dict(block_size=64, vocab_size=100, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=96)
    measured = saved_bytes(Config(n_layer=3, **base), spec) - saved_bytes(Config(n_layer=2, **base), spec)
    tokens = spec.micro_batch_size * spec.seq_length
    assert block_activation_bytes(Config(n_layer=3, **base), spec) == pytest.approx(measured / tokens, rel=0.02)


def saved_bytes(config: Config, spec: TrainingSetup) -> int:
    model = GPT(config).to(torch.float32 if spec.precision == "32-true" else torch.bfloat16)
    model.reset_rope_cache()
    if spec.method == "lora":
        flags = {"query": "q", "key": "k", "value": "v", "projection": "o", "mlp": "mlp"}
        targets = {flag: target in spec.lora_targets for flag, target in flags.items()}
        apply_lora(model, LoRAConfig(r=spec.lora_r, dropout=spec.lora_dropout, **targets))
        mark_only_lora_as_trainable(model)
    model.train()
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    idx = torch.randint(0, config.vocab_size, (spec.micro_batch_size, spec.seq_length))
    labels = torch.full_like(idx, -100)
    labels[:, -spec.answer_tokens :] = idx[:, -spec.answer_tokens :]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_loss_sum(model, {"input_ids": idx, "labels": labels})
    return sum(storages.values())


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "adapter_v2", "qlora"])
def test_activations_linear_in_micro_batch_and_shrink_with_checkpointing(config, method):
    one, two, three = (activation_bytes(config, setup(method=method, micro_batch_size=b)) for b in (1, 2, 3))
    assert 0 < two - one == pytest.approx(three - two)
    if method in ("full", "lora", "qlora"):  # adapters add a few per-layer prompt tensors that do not grow
        assert three == pytest.approx(3 * one)
    checkpointed = activation_bytes(config, setup(method=method, micro_batch_size=1, activation_checkpointing=True))
    assert checkpointed < one


def test_adapter_v2_costs_more_than_adapter(config):
    adapter = estimate_memory(config, setup(method="adapter"))
    v2 = estimate_memory(config, setup(method="adapter_v2"))
    assert 0 < adapter.gradients < v2.gradients  # bias, scale and norms train too
    assert adapter.activations < v2.activations


def test_largest_micro_batch(config):
    spec = setup(method="full", seq_length=128)
    memory = estimate_memory(config, replace(spec, micro_batch_size=5)).total + 1
    assert largest_micro_batch(config, spec, memory) == 5
    assert largest_micro_batch(config, spec, 1e3) == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(micro_batch_size=0), "--micro_batch_size must be >= 1, got 0"),
        (dict(method="prefix"), "--method must be one of"),
        (dict(lora_targets=("q", "x")), "--lora_targets must be"),
        (dict(seq_length=129), "exceeds tiny-gqa's block_size 128"),
        (dict(method="adapter", adapter_start_layer=2), "--adapter_start_layer must be in 0..1"),
    ],
)
def test_bad_settings_raise_one_line(config, overrides, message):
    with pytest.raises(LitQAError, match=message) as error:
        estimate_memory(config, setup(**overrides))
    assert "\n" not in str(error.value)


def test_script_end_to_end():
    args = ["--model", "tiny-gqa", "--method", "full", "--precision", "32-true", "--micro_batch_size", "2",
            "--seq_length", "16", "--gpu_memory_gb", "2"]  # fmt: skip
    result = run_script("scripts/estimate_memory.py", *args)
    assert result.returncode == 0, result.stderr
    expected = estimate_memory(Config.from_name("tiny-gqa"), setup(method="full", precision="32-true"))
    total_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("total"))
    assert float(total_line.split()[1]) == pytest.approx(expected.total / GB, abs=0.005)
    assert "fits in 2 GB: yes" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "error: unknown model name 'no-such-model'"),
        (["--model", "tiny-gqa", "--micro_batch_size", "0"], "error: --micro_batch_size must be >= 1, got 0"),
        ([], "error: give exactly one of --model"),
    ],
)
def test_script_errors_are_one_line(args, message):
    result = run_script("scripts/estimate_memory.py", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)
