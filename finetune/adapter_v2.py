# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""LLaMA-Adapter V2 fine-tuning for SQuAD 2.0 (Gao et al. 2023, https://arxiv.org/abs/2304.15010).

V1's gated adaption prompts (finetune/adapter.py), plus "bias tuning": a trainable scale and bias on every
linear layer (attention, MLP, output head) and trainable RMSNorm weights; still well under 1% of a 7B's
parameters. This is finetune/adapter.py run with ``--adapter.version 2 --out_dir out/finetune/adapter_v2``
first, so every flag of that script works here and overrides those two (``--help`` lists the flags with
finetune/adapter.py's defaults; ``--print_config`` shows the values this script will use). Defaults follow
lit-llama's ``finetune/adapter_v2.py``: lr 9e-3, weight decay 0.02, global batch 64.

    python finetune/adapter_v2.py --data_dir data/squad2 --checkpoint_dir checkpoints/Llama-2-7b
    python finetune/adapter_v2.py --devices 8 --strategy fsdp ...

Evaluate the result with ``python evaluate/adapter.py --adapter_dir out/finetune/adapter_v2/final``.
"""

from __future__ import annotations

import sys

from adapter import setup  # finetune/adapter.py: a script's own folder is first on sys.path

from lit_qa.errors import run_cli

V2_DEFAULTS = ["--adapter.version", "2", "--out_dir", "out/finetune/adapter_v2"]

if __name__ == "__main__":
    run_cli(setup, V2_DEFAULTS + sys.argv[1:])  # later flags win
