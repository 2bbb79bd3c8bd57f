# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import pytest

from lit_qa.errors import LitQAError, expand_bare_bool_flags, run_cli


def _command(count: int = 1, overwrite: bool = False, name: str = "x") -> tuple:
    """A command.

    Args:
        count: A number.
        overwrite: A flag.
        name: A name.
    """
    if count < 0:
        raise LitQAError(f"--count must be >= 0, got {count}")
    return count, overwrite, name


def test_bare_bool_flag_means_true():
    assert expand_bare_bool_flags(_command, ["--overwrite", "--count", "2"]) == ["--overwrite=true", "--count", "2"]
    assert expand_bare_bool_flags(_command, ["--overwrite", "false"]) == ["--overwrite", "false"]
    assert run_cli(_command, ["--count", "3", "--overwrite"]) == (3, True, "x")
    assert run_cli(_command, ["--overwrite", "false"]) == (1, False, "x")


def test_user_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_command, ["--count", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --count must be >= 0, got -1\n"
