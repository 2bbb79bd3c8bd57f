# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The ``lit-qa`` command: one entry point for the standalone scripts, which it runs unchanged.

    lit-qa --help                          # every command, with its script
    lit-qa finetune lora --data_dir data/squad2 ...   # = python finetune/lora.py --data_dir data/squad2 ...
    lit-qa evaluate lora --lora_dir out/finetune/lora/final ...
    lit-qa convert --to gguf --source out/merged --out_dir out/gguf
    lit-qa serve --path out/finetune/lora/final    # = python scripts/serve.py --path ...

A command is a script path and nothing else: the script is run as ``__main__`` with the remaining arguments, its
own folder first on ``sys.path``, exactly as ``python <script> ...`` runs it, so its flags, help and errors are the
script's. The scripts live in the source checkout (``pip install -e .``, as scripts/setup_env.sh installs).
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# command -> subcommand -> script, relative to the repository. The finetune/, evaluate/ and generate/ folders are
# read as they are (every script there is a subcommand), so a new script needs no entry here.
FIXED = {
    "convert": {"": "scripts/convert_checkpoint.py"},
    "quantize": {"gptq": "scripts/quantize_gptq.py"},
    "prepare": {"squad": "scripts/prepare_squad.py", "model": "scripts/prepare_default_model.py"},
    "estimate": {"": "scripts/estimate_memory.py"},
    "merge": {"lora": "scripts/merge_lora.py"},
    "compare": {"quantized": "scripts/compare.py", "results": "scripts/compare_results.py"},
    "serve": {"": "scripts/serve.py"},
}
FOLDERS = ("finetune", "evaluate", "generate")


def commands() -> dict[str, dict[str, Path]]:
    """Every command's subcommands and their scripts ("" for a command without subcommands)."""
    table = {
        folder: {path.stem: path for path in sorted((REPO / folder).glob("*.py")) if not path.name.startswith("_")}
        for folder in FOLDERS
    }
    table.update({name: {sub: REPO / script for sub, script in subs.items()} for name, subs in FIXED.items()})
    return table


def summary(script: Path) -> str:
    """The first line of a script's docstring."""
    try:
        doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage(table: dict[str, dict[str, Path]], only: str | None = None) -> str:
    """The help text: each command and subcommand with its script and what it does."""
    lines = [
        "usage: lit-qa <command> [<subcommand>] [script arguments ...]",
        "",
        (
            "Runs the standalone script of the command with the arguments as given; "
            "`lit-qa <command> [<subcommand>] --help` shows the script's flags."
        ),
        "",
    ]
    for name, subs in table.items():
        if only is not None and name != only:
            continue
        for sub, script in subs.items():
            command = f"{name} {sub}".strip()
            lines.append(f"  {command:<22} {script.relative_to(REPO)}: {summary(script)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the script a command names (see the module docstring); exits with its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    table = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(table))
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in table:
        _fail(f"unknown command {name!r}; one of: {', '.join(table)} (lit-qa --help)")
    subs = table[name]
    if "" in subs:
        script = subs[""]
    elif rest and rest[0] in subs:
        script, rest = subs[rest[0]], rest[1:]
    elif not rest or rest[0] in ("-h", "--help"):
        print(usage(table, only=name))
        raise SystemExit(0 if rest else 2)
    else:
        _fail(f"unknown subcommand {rest[0]!r} of {name}; one of: {', '.join(subs)}")
    if not script.is_file():
        _fail(f"{script} is missing: the command runs the scripts of a source checkout (pip install -e <checkout>)")
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


def _fail(message: str) -> None:
    print(f"lit-qa: error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
