# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""One error type for bad user input, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class LitQAError(Exception):
    """Bad input from the user (a file, a flag, a checkpoint).

    The message names the file, field or id and the problem. Scripts print it as a single
    ``error: ...`` line and exit with status 2 instead of showing a traceback.
    """


def run_cli(function: Callable[..., Any], args: list[str] | None = None) -> Any:
    """Run ``function`` as a jsonargparse CLI, turning `LitQAError` into a one-line message and exit 2."""
    from jsonargparse import CLI

    try:
        return CLI(function, args=args, as_positional=False)
    except LitQAError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
