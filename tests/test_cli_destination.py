"""A DST that cannot take the output is refused before any work, in one line naming the path, exit
code 2: a parent that is a file, /proc, a read-only parent, a stray file named like the staging
folder, a folder inside the source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def convert_cli(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["convert", str(src), str(dst), "--quiet", "--device", "cpu", *extra]
    command = [sys.executable, "-m", "moeport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def src(checkpoint) -> Path:
    return checkpoint("qwen3_moe", "hub")


def test_parent_that_is_a_file(src, tmp_path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    dst = tmp_path / "afile" / "out"
    line = one_line_error(convert_cli(src, dst))
    assert line == f"error: {dst}: cannot be created: {tmp_path / 'afile'} is a file, not a folder"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc on this system")
def test_destination_under_proc(src) -> None:
    line = one_line_error(convert_cli(src, Path("/proc/moeport-out")))
    assert line == "error: /proc/moeport-out: cannot write in /proc (No such file or directory)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(src, tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = one_line_error(convert_cli(src, ro / "out"))
    finally:
        ro.chmod(0o755)
    assert line == f"error: {ro / 'out'}: cannot write in {ro} (Permission denied)"
    assert list(ro.iterdir()) == []


def test_staging_name_taken_by_a_file(src, tmp_path) -> None:
    dst = tmp_path / "out"
    stray = tmp_path / "out.moeport-partial"
    stray.write_text("someone else's")
    line = one_line_error(convert_cli(src, dst))
    assert line == f"error: {stray}: exists and is not a folder (remove it, or use --overwrite)"
    assert stray.read_text() == "someone else's" and not dst.exists()
    ok = convert_cli(src, dst, "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert (dst / "model.safetensors").exists() and not stray.exists()


def test_destination_inside_the_source(src, tmp_path) -> None:
    before = sorted(p.name for p in src.iterdir())
    dst = src / "sub"
    line = one_line_error(convert_cli(src, dst))
    assert line == f"error: {dst}: is inside the source checkpoint {src}; choose a DST outside it"
    assert sorted(p.name for p in src.iterdir()) == before
