# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import pytest
import torch

from lit_qa import precision
from lit_qa.errors import LitQAError


def test_auto_follows_native_bf16_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "32-true"


def test_explicit_precision_is_kept_and_unknown_refused():
    assert precision.resolve_precision("32-true", "cpu") == "32-true"
    with pytest.raises(LitQAError, match="--precision"):
        precision.resolve_precision("fp8", "cpu")


def test_weights_dtype():
    assert precision.weights_dtype("bf16-true") is torch.bfloat16
    assert precision.weights_dtype("bf16-mixed") is torch.float32
    assert precision.weights_dtype("32-true") is torch.float32


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")  # AVX-512 without bf16
    assert not precision.cpu_has_native_bf16(cpuinfo)
    assert not precision.cpu_has_native_bf16(tmp_path / "missing")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert precision.cpu_has_native_bf16(tmp_path / "missing")


def test_bf16_decoding_falls_back_on_a_cpu_without_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.inference_precision("bf16-true", "cpu") == "32-true"
    assert capsys.readouterr().err.count("\n") == 1  # one line says so
    assert precision.inference_precision("auto", "cpu") == "32-true" and capsys.readouterr().err == ""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.inference_precision("bf16-true", "cpu") == "bf16-true"
    assert precision.inference_precision("auto", "cpu") == "bf16-true" and capsys.readouterr().err == ""
    assert precision.resolve_precision("bf16-true", "cpu") == "bf16-true"  # training keeps what it is given
