"""Option values as a new user types them: sizes need a unit and are echoed in a fitting one, a
shard-size floor, --to in any case, --numa advice in --numa's own terms, choices shown in --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from moeport.recipes import TARGETS, hf
from moeport.sizes import format_size, parse_size


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "moeport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_numa_advice_names_the_option(tiny, tmp_path) -> None:
    result = run_cli("convert", str(tiny), str(tmp_path / "x"), "--to", "kt-int4", "--numa", "3")
    assert one_line_error(result) == (
        f"error: {tiny} experts [I=128, H=256]: AMXINT4 with --numa 3: intermediate 128 is not divisible "
        "by 3; use --numa 1"
    )


def test_max_memory_is_echoed_in_a_fitting_unit(tiny, tmp_path) -> None:
    result = run_cli("convert", str(tiny), str(tmp_path / "x"), "--max-memory", "1MB", "--device", "cpu")
    line = one_line_error(result)
    assert re.fullmatch(
        r"error: --max-memory 1 MB: this conversion needs about \d+ MB \(one unit of work at a time\)", line
    ), line  # noqa: E501
    assert not (tmp_path / "x").exists()


UNIT = "expected a size with its unit, such as 5GB, 500MB or 512MiB"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-shard-size", "5"], f"--max-shard-size 5: {UNIT}"),
        (["--max-shard-size", "5KB"], "--max-shard-size 5KB: below the 100 KB floor (shards are usually 1GB to 10GB)"),  # noqa: E501
        (["--max-memory", "3"], f"--max-memory 3: {UNIT}"),
        (["--max-memory", "0GB"], "--max-memory 0GB: expected a positive size"),
    ],
)  # fmt: skip
def test_sizes_need_a_unit_and_a_sane_value(tiny, tmp_path, args, message) -> None:
    result = run_cli("convert", str(tiny), str(tmp_path / "x"), *args)
    assert one_line_error(result) == f"error: {message}"


def test_target_names_are_case_insensitive(tiny, tmp_path) -> None:
    result = run_cli(
        "convert", str(tiny), str(tmp_path / "x"), "--to", "W4A16", "--group-size", "32", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "bf16 -> w4a16 (experts)" in result.stdout


def test_help_shows_the_choices_from_the_registry() -> None:
    result = run_cli("convert", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())
    layouts = "|".join(hf.LAYOUTS)
    for choices in (f"--layout [{layouts}]", "--dtype [keep|bf16|fp16|fp32]", "--kt-layout [merged|folders]"):
        assert choices in text, choices
    assert all(f"{name}: " in text for name in TARGETS)


def test_sizes_round_trip_in_people_units() -> None:
    assert parse_size("5GB", "-") == 5 * 10**9 and parse_size("512MiB", "-") == 512 * 2**20
    assert parse_size("600kb", "-") == 600_000 and parse_size("100B", "-") == 100
    assert [format_size(n) for n in (0, 999, 1000, 630_720_000, 5 * 10**9, 3 * 10**12)] == [
        "0 B", "999 B", "1 KB", "631 MB", "5 GB", "3 TB",
    ]  # fmt: skip
