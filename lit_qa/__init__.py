# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""lit-qa: fine-tune, quantize and evaluate LLaMA-family models for SQuAD 2.0 question answering."""

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.model import GPT

__all__ = ["GPT", "Config", "LitQAError"]
