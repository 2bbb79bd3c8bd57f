# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GPTQ: the algorithm, the AutoGPTQ packed format, `Int4Linear`, checkpoints and scripts/quantize_gptq.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SENTENCES, load_script, make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from lit_qa.checkpoints.folder import load_model
from lit_qa.checkpoints.gptq import (
    export_hf_gptq,
    gptq_state_dict,
    import_hf_gptq,
    load_gptq_model,
    save_gptq_checkpoint,
)
from lit_qa.errors import LitQAError, run_cli
from lit_qa.generation.generate import generate
from lit_qa.quantize.gptq import GPTQConfig, gptq_quantize, relative_error, round_to_nearest
from lit_qa.quantize.gptq_model import gptq_quantize_model
from lit_qa.quantize.int4 import Int4Linear, dequantize, pack, unpack


def correlated_inputs(n: int, features: int) -> torch.Tensor:
    """Inputs X = Z M with a random mixing matrix and a few outlier features, like real activations."""
    z = torch.randn(n, features)
    x = z @ (torch.randn(features, features) / features**0.5)
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_has_lower_output_error_than_round_to_nearest(sym, act_order):
    X = correlated_inputs(2048, 128)
    W = torch.randn(64, 128) * 0.05
    H = 2 / len(X) * X.t() @ X
    config = GPTQConfig(bits=4, group_size=32, sym=sym, act_order=act_order)
    gptq, rtn = gptq_quantize(W, H, config), round_to_nearest(W, config)
    gptq_error = ((W - gptq.dequantize()) @ X.t()).norm() ** 2 / (W @ X.t()).norm() ** 2
    rtn_error = ((W - rtn.dequantize()) @ X.t()).norm() ** 2 / (W @ X.t()).norm() ** 2
    assert gptq_error < 0.5 * rtn_error
    assert relative_error(W, gptq.dequantize(), H) == pytest.approx(float(gptq_error), rel=1e-3)
    # Every value fits the format: 4-bit integers, zero points the v1 packing can store.
    assert gptq.q.max() <= 15 and 1 <= gptq.zeros.min() and gptq.zeros.max() <= 16
    assert torch.equal(gptq.scales, gptq.scales.half().float())
    expected_groups = torch.arange(128) // 32
    if act_order:  # groups follow the permuted order, but each still has 32 columns
        assert not torch.equal(gptq.g_idx.long(), expected_groups)
        assert torch.equal(gptq.g_idx.sort().values.long(), expected_groups)
    else:
        assert torch.equal(gptq.g_idx.long(), expected_groups)


def test_gptq_with_a_shorter_last_group_and_dead_inputs():
    X = correlated_inputs(512, 96)
    X[:, 5] = 0  # an input that is always zero
    W = torch.randn(16, 96)
    H = 2 / len(X) * X.t() @ X
    config = GPTQConfig(group_size=64, sym=False)
    gptq = gptq_quantize(W, H, config)
    # As in AutoGPTQ: ceil(96 / 64) = 2 groups, the second one 32 columns wide.
    assert gptq.scales.shape == (2, 16) and torch.equal(gptq.g_idx.long(), torch.arange(96) // 64)
    assert torch.all(gptq.dequantize()[:, 5] == 0)
    assert relative_error(W, gptq.dequantize(), H) < relative_error(W, round_to_nearest(W, config).dequantize(), H)


def random_quantized(out_features, in_features, bits, group_size, act_order):
    n_groups = -(-in_features // group_size)
    q = torch.randint(0, 2**bits, (out_features, in_features), dtype=torch.uint8)
    scales = (torch.rand(n_groups, out_features) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(1, 2**bits + 1, (n_groups, out_features), dtype=torch.int32)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features)]
    return q, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_is_exact(bits, act_order):
    q, scales, zeros, g_idx = random_quantized(32, 96, bits, 32, act_order)
    packed = pack(q, scales, zeros, g_idx, bits)
    per = 32 // bits
    assert packed["qweight"].shape == (96 // per, 32) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (3, 32 // per) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    q2, scales2, zeros2, g_idx2 = unpack(**packed, bits=bits)
    assert torch.equal(q2, q) and torch.equal(zeros2, zeros) and torch.equal(g_idx2, g_idx)
    assert torch.equal(scales2.float(), scales)


def autogptq_pack(q: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bit loops of AutoGPTQ's ``QuantLinear.pack`` (qlinear_cuda_old.py), written out on Python ints."""
    per = 32 // bits
    intweight = q.t().tolist()  # (in, out)
    qweight = [[0] * len(intweight[0]) for _ in range(len(intweight) // per)]
    for row in range(len(qweight)):
        for j in range(per):
            for col, value in enumerate(intweight[row * per + j]):
                qweight[row][col] |= value << (bits * j)
    stored = (zeros - 1).tolist()  # (groups, out)
    qzeros = [[0] * (len(stored[0]) // per) for _ in stored]
    for g, row in enumerate(stored):
        for col in range(len(qzeros[g])):
            for j in range(per):
                qzeros[g][col] |= row[col * per + j] << (bits * j)

    def as_int32(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[v - (1 << 32) if v >= 1 << 31 else v for v in r] for r in rows], dtype=torch.int32)

    return as_int32(qweight), as_int32(qzeros)


def test_packing_matches_autogptq_bit_layout():
    q, scales, zeros, g_idx = random_quantized(16, 32, 4, 32, act_order=False)
    packed = pack(q, scales, zeros, g_idx)
    qweight, qzeros = autogptq_pack(q, zeros, 4)
    assert torch.equal(packed["qweight"], qweight) and torch.equal(packed["qzeros"], qzeros)
    # Symmetric 4-bit: zero 8 is stored as 7 in every nibble, the 0x77777777 seen in every sym GPTQ checkpoint.
    sym = pack(q, scales, torch.full_like(zeros, 8), g_idx)
    assert torch.all(sym["qzeros"] == 0x77777777)


def test_pack_rejects_values_the_format_cannot_hold():
    q, scales, zeros, g_idx = random_quantized(16, 32, 4, 32, act_order=False)
    with pytest.raises(ValueError, match="zero points"):
        pack(q, scales, torch.zeros_like(zeros), g_idx)
    with pytest.raises(ValueError, match="bits=3"):
        pack(q, scales, zeros, g_idx, bits=3)


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_linear_fallback_equals_dequantized_matmul(act_order):
    q, scales, zeros, g_idx = random_quantized(48, 96, 4, 64, act_order)
    layer = Int4Linear.from_packed(pack(q, scales, zeros, g_idx), bits=4, group_size=64)
    x = torch.randn(2, 5, 96)
    weight = dequantize(q, scales, zeros, g_idx)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, weight))
    assert layer._kernel is None and layer._dense is not None  # fp32 activations: cached dense weight
    layer.cache_dense = False
    layer.prepare(torch.float32)
    assert layer._dense is None and torch.equal(layer(x), torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_linear_cpu_kernel_is_close_to_dequantized_matmul(act_order):
    # 96 inputs in groups of 64: the kernel runs groups of 32 that share their GPTQ group's scale.
    q, scales, zeros, g_idx = random_quantized(48, 96, 4, 64, act_order)
    layer = Int4Linear.from_packed(pack(q, scales, zeros, g_idx), bits=4, group_size=64)
    x = torch.randn(3, 4, 96).bfloat16()
    y = layer(x)
    assert layer._kernel is not None, "the bf16 CPU path should use torch's int4 kernel"
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4, 48)
    expected = x.float() @ dequantize(q, scales, zeros, g_idx).t()
    assert (y.float() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_int4_linear_keeps_its_format_dtypes_when_the_model_is_cast():
    q, scales, zeros, g_idx = random_quantized(16, 32, 4, 32, act_order=False)
    layer = Int4Linear.from_packed(pack(q, scales, zeros, g_idx), bits=4, group_size=32)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    with pytest.raises(ValueError, match="cannot be packed"):
        Int4Linear(30, 16)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny checkpoint, a text calibration file, and the script's output for them."""
    root = tmp_path_factory.mktemp("gptq")
    checkpoint = make_tiny_checkpoint(root)
    calibration = root / "calibration.txt"
    calibration.write_text("\n".join(SENTENCES))
    out_dir = root / "gptq"
    script = load_script("scripts/quantize_gptq.py")
    script.main(checkpoint, out_dir, calibration, group_size=32, seq_length=64, n_samples=8, export_hf=root / "hf")
    return checkpoint, calibration, out_dir, root / "hf"


def test_script_writes_a_checkpoint_close_to_the_original(quantized):
    checkpoint, _, out_dir, hf_dir = quantized
    assert {p.name for p in out_dir.iterdir()} == {
        "model.safetensors", "lit_config.json", "quantize_config.json", "tokenizer.json", "tokenizer_config.json"
    }  # fmt: skip
    tensors = load_file(out_dir / "model.safetensors")
    assert tensors["transformer.h.0.attn.q_proj.qweight"].shape == (32 // 8, 32)
    assert "transformer.h.0.attn.q_proj.weight" not in tensors and "lm_head.weight" in tensors  # head unquantized
    original, _ = load_model(checkpoint)
    idx = torch.randint(0, 400, (2, 48))
    with torch.no_grad():
        expected = original(idx)
        for dtype in (None, torch.bfloat16):
            model, _ = load_gptq_model(out_dir, dtype=dtype)
            assert isinstance(model.transformer.h[1].mlp.down_proj, Int4Linear)
            # A tiny random model at 4 bits, groups of 32: measured ~0.05 (fp32) and ~0.06 (bf16 kernel).
            logits = model(idx).float()
            assert (logits - expected).norm() / expected.norm() < 0.1
            assert len(generate(model, [idx[0, :10]], max_new_tokens=4)[0]) == 4
    # The Hugging Face copy loads to the same model.
    hf_model, _ = load_gptq_model(hf_dir)
    with torch.no_grad():
        assert torch.equal(hf_model(idx), load_gptq_model(out_dir)[0](idx))


def test_hf_export_and_import_round_trip(quantized, tmp_path):
    _, _, out_dir, hf_dir = quantized
    hf_tensors = load_file(hf_dir / "model.safetensors")
    assert {"model.layers.0.self_attn.q_proj.qweight", "model.layers.1.mlp.down_proj.g_idx"} <= hf_tensors.keys()
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= hf_tensors.keys()
    hf_config = json.loads((hf_dir / "config.json").read_text())
    quantize_config = json.loads((out_dir / "quantize_config.json").read_text())
    assert hf_config["quantization_config"] == quantize_config
    assert quantize_config["quant_method"] == "gptq" and quantize_config["checkpoint_format"] == "gptq"
    assert json.loads((hf_dir / "quantize_config.json").read_text()) == quantize_config

    import_hf_gptq(hf_dir, tmp_path / "back")
    original, back = load_file(out_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    assert json.loads((tmp_path / "back" / "quantize_config.json").read_text()) == quantize_config
    export_hf_gptq(tmp_path / "back", tmp_path / "hf2")
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    assert all(torch.equal(hf_tensors[k], again[k]) for k in hf_tensors) and hf_tensors.keys() == again.keys()


def test_convert_checkpoint_imports_and_exports_gptq_folders(quantized, tmp_path):
    _, _, out_dir, hf_dir = quantized
    convert = load_script("scripts/convert_checkpoint.py")
    convert.main(hf_dir, tmp_path / "imported")  # detected as GPTQ from config.json's quantization_config
    original, imported = load_file(out_dir / "model.safetensors"), load_file(tmp_path / "imported" / "model.safetensors")
    assert original.keys() == imported.keys() and all(torch.equal(original[k], imported[k]) for k in original)
    convert.main(tmp_path / "imported", tmp_path / "exported", to="hf")  # detected from quantize_config.json
    hf_tensors, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert hf_tensors.keys() == exported.keys() and all(torch.equal(hf_tensors[k], exported[k]) for k in hf_tensors)
    with pytest.raises(LitQAError, match="--dtype does not apply"):
        convert.main(hf_dir, tmp_path / "cast", dtype="bfloat16")


def test_act_order_asymmetric_model_quantization(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path)
    model, config = load_model(checkpoint)
    original = [p.clone() for p in model.parameters()]
    idx = torch.randint(0, 400, (1, 48))
    with torch.no_grad():
        expected = model(idx)
    calibration = [torch.randint(0, 400, (n,)) for n in (64, 40, 64, 50)]
    gptq_config = GPTQConfig(group_size=-1, sym=False, act_order=True, true_sequential=False)
    packed, reports = gptq_quantize_model(model, calibration, gptq_config, progress=False)
    assert len(packed) == len(reports) == 7 * config.n_layer
    assert all(r.error < r.rtn_error for r in reports)
    assert not all(torch.equal(a, b) for a, b in zip(original, model.parameters()))  # weights now dequantized
    state = gptq_state_dict(model, packed)
    save_gptq_checkpoint(tmp_path / "q", config, state, gptq_config.to_quantize_config())
    loaded, _ = load_gptq_model(tmp_path / "q", dtype=torch.bfloat16)
    assert loaded.transformer.h[0].attn.q_proj._kernel is not None  # act_order still runs on the int4 kernel
    with torch.no_grad():
        assert torch.allclose(loaded(idx).float(), model(idx), atol=0.05)  # same as the dequantized weights
        assert (loaded(idx).float() - expected).norm() / expected.norm() < 0.15


def one_line_error(capsys, script, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_script_errors_are_one_line(quantized, tmp_path, capsys):
    checkpoint, calibration, _, _ = quantized
    script = load_script("scripts/quantize_gptq.py")
    base = ["--checkpoint_dir", str(checkpoint), "--out_dir", str(tmp_path / "out")]
    assert "does not exist" in one_line_error(capsys, script, [*base, "--calibration", str(tmp_path / "nope.txt")])
    assert "bits=3" in one_line_error(capsys, script, [*base, "--calibration", str(calibration), "--bits", "3"])
    err = one_line_error(capsys, script, [*base, "--calibration", str(calibration), "--group_size", "48"])
    assert "group_size=48" in err
    err = one_line_error(capsys, script, [*base, "--calibration", str(calibration), "--device", "gpu"])
    assert "not a device name" in err
    (tmp_path / "c.json").write_text("{}")
    assert ".txt file" in one_line_error(capsys, script, [*base, "--calibration", str(tmp_path / "c.json")])
    assert not (tmp_path / "out").exists()


def test_loading_broken_checkpoints_fails_with_one_line(quantized, tmp_path):
    import shutil

    _, _, out_dir, _ = quantized

    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(out_dir, folder)
        return folder

    folder = broken("no-config")
    (folder / "quantize_config.json").unlink()
    with pytest.raises(LitQAError, match="missing quantize_config.json"):
        load_gptq_model(folder)

    for field, value, message in [("bits", 3, "bits=3"), ("checkpoint_format", "gptq_v2", "gptq_v2")]:
        folder = broken(f"bad-{field}")
        values = json.loads((folder / "quantize_config.json").read_text())
        (folder / "quantize_config.json").write_text(json.dumps({**values, field: value}))
        with pytest.raises(LitQAError, match=message):
            load_gptq_model(folder)

    folder = broken("bad-shape")
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.0.attn.k_proj.scales"] = tensors["transformer.h.0.attn.k_proj.scales"][:, :8].contiguous()
    del tensors["transformer.h.1.mlp.up_proj.g_idx"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LitQAError) as error:
        load_gptq_model(folder)
    message = str(error.value)
    assert "missing tensors transformer.h.1.mlp.up_proj.g_idx" in message
    assert "k_proj.scales has shape (1, 8)" in message
    assert "\n" not in message
