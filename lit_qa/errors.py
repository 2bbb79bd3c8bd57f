# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""One error type for bad user input, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any


class LitQAError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint).

    The message names the file, field or id and the problem. Scripts print it as a single
    ``error: ...`` line and exit with status 2 instead of showing a traceback.
    """


def not_found(path: Any, wanted: str = "folder") -> str:
    """How ``path`` fails to be the ``wanted`` "folder" or "file": "does not exist", or what it is instead (a path
    that exists as the other kind is not "missing", and saying so sends the user looking in the wrong place)."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return "does not exist"
    return f"is a {'file' if wanted == 'folder' else 'folder'}, not a {wanted}"


def run_cli(function: Callable[..., Any], args: list[str] | None = None) -> Any:
    """Run ``function`` as a jsonargparse CLI, turning `LitQAError` into a one-line message and exit 2.

    A function whose one parameter is a dataclass (``main(args: Args)``, as the evaluate scripts') takes that
    dataclass's fields as flat flags (``--batch_size``), documented by its docstring. A boolean flag given bare
    (``--overwrite``) means true, as users expect; jsonargparse alone insists on ``--overwrite true``.
    """
    from jsonargparse import CLI

    settings = settings_class(function)
    component = function if settings is None else settings
    args = expand_bare_bool_flags(component, sys.argv[1:] if args is None else args)
    try:
        parsed = CLI(component, args=args, as_positional=False)
        return parsed if settings is None else function(parsed)
    except LitQAError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_class(function: Callable[..., Any]) -> type | None:
    """The dataclass ``function`` takes as its only parameter, or None."""
    parameters = list(inspect.signature(function).parameters)
    hint = typing.get_type_hints(function).get(parameters[0]) if len(parameters) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def expand_bare_bool_flags(function: Callable[..., Any], args: list[str]) -> list[str]:
    """Rewrite ``--flag`` into ``--flag=true`` for boolean parameters of ``function`` (or fields of a dataclass)
    given without a value."""
    hints = typing.get_type_hints(function)
    bool_flags = {f"--{name}" for name, hint in hints.items() if hint is bool}
    expanded = []
    for i, arg in enumerate(args):
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        expanded.append(f"{arg}=true" if arg in bool_flags and not has_value else arg)
    return expanded
