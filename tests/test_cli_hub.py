"""`org/name` where a folder is expected: the snapshot in the local Hugging Face cache (offline),
or one line saying how to download it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moeport.synthetic import SyntheticSpec, write_synthetic

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def moeport(cache: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "moeport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_repo_id_resolves_from_the_cache(tmp_path) -> None:
    """The cache as huggingface_hub lays it out: refs/main names the snapshot folder."""
    repo = tmp_path / "hub" / "models--acme--tiny-moe"
    write_synthetic(repo / "snapshots" / COMMIT, SyntheticSpec.tiny())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    result = moeport(tmp_path / "hub", tmp_path, "inspect", "acme/tiny-moe", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "deepseek_v3" and report["path"] == str(repo / "snapshots" / COMMIT)
    out = tmp_path / "out"
    done = moeport(
        tmp_path / "hub", tmp_path, "convert", "acme/tiny-moe", str(out), "--quiet", "--device=cpu"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "moeport-journal.json").read_text())["recipe"]["source"] == "acme/tiny-moe"


def test_repo_not_in_the_cache_says_how_to_get_it(tmp_path) -> None:
    result = moeport(tmp_path / "hub", tmp_path, "inspect", "acme/absent")
    assert result.returncode == 2
    assert result.stderr == (
        "error: acme/absent: no such file or folder, nor a repo in the local Hugging Face cache (to "
        "fetch the Hub repo: hf download acme/absent)\n"
    )


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path) -> None:
    (tmp_path / "demo-out").mkdir()
    result = moeport(tmp_path / "hub", tmp_path, "inspect", "demo-out/deepseek-v3-tinyy")
    assert result.returncode == 2
    assert result.stderr == "error: demo-out/deepseek-v3-tinyy: no such file or folder\n"
