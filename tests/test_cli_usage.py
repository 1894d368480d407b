"""Usage errors as a new user meets them: help, --version, and click's short usage message with
exit code 2 for a missing argument or a bad option, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from moeport.cli.app import _version


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moeport", *args],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def error_line(stderr: str) -> str:
    """The message inside typer's error panel, on one line."""
    inside = [ln.strip("│ ") for ln in stderr.splitlines() if ln.startswith("│")]
    return " ".join(inside)


@pytest.mark.parametrize(("args", "code"), [((), 2), (("-h",), 0), (("--help",), 0)])
def test_bare_command_and_h_print_help(args, code) -> None:
    result = run_cli(*args)
    assert result.returncode == code
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    assert "Usage: moeport [OPTIONS] COMMAND [ARGS]..." in text
    for command in ("inspect", "convert", "verify", "demo"):
        assert re.search(rf"│ {command} ", text), command


def test_version_comes_from_package_metadata() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"moeport {_version()}\n"


def test_subcommand_h_prints_its_help() -> None:
    result = run_cli("convert", "-h")
    assert result.returncode == 0, result.stderr
    assert "Usage: moeport convert [OPTIONS]" in result.stdout and "--max-shard-size" in result.stdout


@pytest.mark.parametrize(
    ("args", "usage", "message"),
    [
        (("inspect",), "moeport inspect", "Missing argument 'path'."),
        (("convert", "somewhere"), "moeport convert", "Missing argument 'dst'."),
        (
            ("convert", "a", "b", "--numa", "abc"),
            "moeport convert",
            "Invalid value for '--numa': Input should be a valid integer, unable to parse string as an "
            "integer",
        ),
        (("--bogus",), "moeport", "No such option: --bogus"),
        (
            ("convert", "a", "b", "--bogus"),
            "moeport convert",
            "No such option: --bogus (Possible options: --verbose)",
        ),
    ],
)
def test_usage_errors_print_the_short_usage_and_exit_2(args, usage, message) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith(f"Usage: {usage} [OPTIONS]"), result.stderr
    assert error_line(result.stderr) == message


def test_user_text_in_errors_is_not_taken_for_rich_markup(tmp_path) -> None:
    path = tmp_path / "ck[bold]x[/bold]"
    result = run_cli("inspect", str(path))
    assert result.returncode == 2
    assert result.stderr == f"error: {path}: no such file or folder\n"
