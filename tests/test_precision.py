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
