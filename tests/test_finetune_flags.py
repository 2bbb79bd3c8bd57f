# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The finetune scripts' command lines: `lit_qa.training.finetune.start`'s flags, shared, plus each method's own."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
from helpers import load_script
from jsonargparse import ArgumentParser

from lit_qa.errors import expand_bare_bool_flags
from lit_qa.training.args import TrainArgs
from lit_qa.training.finetune import split_args_section, start

SHARED = list(inspect.signature(start).parameters)
AFTER_FSDP = SHARED.index("fsdp") + 1
# script: (its own flags, its out_dir, its train defaults, its --seed description)
SCRIPTS = {
    "lora": (["lora", "quantize"], "out/finetune/lora", TrainArgs(), "LoRA initialisation, dropout and data order"),
    "adapter": (["adapter"], "out/finetune/adapter",
                TrainArgs(learning_rate=9e-3, global_batch_size=64, warmup_steps=100, weight_decay=0.02),
                "the prompts' initialisation and the data order"),
    "full": ([], "out/finetune/full", TrainArgs(learning_rate=3e-5), "dropout and data order"),
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_script_takes_the_shared_flags_and_its_own(script):
    own, out_dir, train, seed = SCRIPTS[script]
    setup = load_script(f"finetune/{script}.py").setup
    parameters = inspect.signature(setup).parameters
    assert list(parameters) == SHARED[:AFTER_FSDP] + own + SHARED[AFTER_FSDP:]
    assert parameters["out_dir"].default == Path(out_dir) and parameters["train"].default == train
    assert typing.get_type_hints(setup)["overwrite"] is bool  # what run_cli's bare --overwrite needs
    assert expand_bare_bool_flags(setup, ["--overwrite", "--na_head"]) == ["--overwrite=true", "--na_head=true"]

    parser = ArgumentParser()
    parser.add_function_arguments(setup)
    help_text = " ".join(parser.format_help().split())
    assert all(f"--{name}" in help_text for name in parameters)
    assert f"Random seed for {seed}." in help_text  # the script's own description replaces start's
    assert "Folder written by scripts/prepare_squad.py" in help_text  # start's, for a flag the script leaves alone


def test_split_args_section_keeps_each_entry_with_its_next_lines():
    def f():
        """Summary line.

        More text.

        Args:
            a: First, on
                two lines.
            b: Second.

        Returns:
            Nothing.
        """

    description, entries = split_args_section(f.__doc__)
    assert description == "Summary line.\n\nMore text."
    assert entries == {"a": "    a: First, on\n        two lines.", "b": "    b: Second."}
