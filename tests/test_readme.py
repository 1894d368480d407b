"""The README's code blocks run as written: every Python block in a fresh interpreter, and the
moeport commands of the quick start (the install steps around them are the reader's machine's)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def test_every_block_says_its_language() -> None:
    assert BLOCKS and all(lang in ("python", "bash", "text") for lang, _ in BLOCKS), [b[0] for b in BLOCKS]


@pytest.mark.parametrize("code", [code for lang, code in BLOCKS if lang == "python"])
def test_python_block_runs(code, tmp_path) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def _steps(marker: str) -> list[str]:
    block = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", README, flags=re.S)
    assert block, marker
    return [step.strip() for step in block[1].split("&&")]


def test_quick_start_installs_what_pyproject_offers() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for marker in ("main-command", "test-command"):
        for step in _steps(marker):
            for extra in re.findall(r'-e "?\.\[(\w+)\]', step):
                assert extra in extras, (marker, step)


def test_main_command_runs(tmp_path) -> None:
    for step in _steps("main-command"):
        if step.startswith("moeport "):
            args = shlex.split(step)[1:]
            result = subprocess.run(
                [sys.executable, "-m", "moeport", *args], capture_output=True, text=True, cwd=tmp_path
            )
            assert result.returncode == 0, result.stderr[-3000:]
            from moeport.recipes import TARGETS

            # one verified output per registered target that writes this model
            written = [t for t in TARGETS if not re.search(rf"(?m)^ *{re.escape(t)}: not for", result.stdout)]
            assert result.stdout.count("verified") == len(written) > len(TARGETS) - 3
            assert "FAILED" not in result.stdout
