# Copyright lit-qa authors. Licensed under the Apache License 2.0.
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lit-qa",
    version="0.1.0",
    description="Fine-tune, quantize and evaluate LLaMA-family models for SQuAD 2.0 with Lightning Fabric",
    long_description=(Path(__file__).parent / "README.md").read_text() if (Path(__file__).parent / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lit_qa", "lit_qa.*"]),
    # `lit-qa finetune lora ...` runs finetune/lora.py of the checkout (lit_qa/cli.py): install with pip install -e .
    entry_points={"console_scripts": ["lit-qa=lit_qa.cli:main"]},
    # Loose on purpose: the set-up scripts and requirements.txt pin the versions used here.
    install_requires=[
        "torch>=2.4",
        "lightning>=2.4",
        "jsonargparse[signatures]>=4.30",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "gguf>=0.10",
        "numpy",
        "tqdm",
        "tensorboard",
        "pyyaml",
        "litserve>=0.2",  # scripts/serve.py (lit-qa serve)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "transformers>=4.45"],
        "benchmark": ["transformers>=4.45", "peft>=0.12"],
    },
)
