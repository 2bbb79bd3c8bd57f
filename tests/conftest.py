# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_default_dtype_and_seed():
    """Tests may change the default dtype or RNG; keep them from leaking into each other."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
