# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The ``lit-qa`` command (`lit_qa.cli`): every subcommand's ``--help`` is its script's, and mistakes exit 2."""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from helpers import REPO

from lit_qa.cli import commands

LIT_QA = shutil.which("lit-qa", path=str(Path(sys.executable).parent))  # installed by pip install -e .


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_the_command_is_installed_and_lists_every_script():
    assert LIT_QA is not None, "pip install -e . installs the lit-qa console script"
    result = run(LIT_QA, "--help")
    assert result.returncode == 0
    table = commands()
    for name in ("finetune lora", "evaluate lora", "convert", "quantize gptq", "prepare squad", "estimate"):
        assert f"  {name} " in result.stdout
    for subs in table.values():
        for script in subs.values():
            assert str(script.relative_to(REPO)) in result.stdout
    assert {path.stem for path in (REPO / "finetune").glob("*.py")} == set(table["finetune"])


def test_every_subcommand_help_is_its_scripts_help():
    pairs = [(f"{name} {sub}".split(), script) for name, subs in commands().items() for sub, script in subs.items()]

    def both(pair):
        words, script = pair
        ours = run(sys.executable, "-m", "lit_qa.cli", *words, "--help")
        theirs = run(sys.executable, str(script.relative_to(REPO)), "--help")
        return words, ours, theirs

    with ThreadPoolExecutor(2) as pool:
        for words, ours, theirs in pool.map(both, pairs):
            assert theirs.returncode == 0 and "--" in theirs.stdout, words
            assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), words


def test_mistakes_exit_2_with_one_line():
    for args, message in [(("finetune", "lorra"), "unknown subcommand 'lorra' of finetune"),
                          (("train",), "unknown command 'train'")]:  # fmt: skip
        result = run(sys.executable, "-m", "lit_qa.cli", *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"lit-qa: error: {message}")
    listing = run(sys.executable, "-m", "lit_qa.cli", "finetune")
    assert listing.returncode == 2 and "finetune lora" in listing.stdout and "evaluate" not in listing.stdout
