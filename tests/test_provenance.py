"""Outputs name their source by folder name and content fingerprint, never by a local path
(checkpoints get published)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from moeport.recipes.provenance import source_fingerprint
from moeport.sources import open_checkpoint
from moeport.synthetic import SyntheticSpec, write_synthetic


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("private-home") / "deepseek-tiny"
    write_synthetic(src, SyntheticSpec.tiny())
    return src


def fingerprint(path: Path) -> str:
    with open_checkpoint(path) as ck:
        return source_fingerprint(ck)


@pytest.mark.parametrize(
    "args",
    [
        ("--to", "hf"),
        ("--to", "w4a16", "--group-size", "32"),
        ("--to", "kt-int4"),
        ("--to", "kt-int8", "--kt-layout", "folders"),
    ],
)
def test_no_local_path_in_any_output_file(tiny, tmp_path, args) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "moeport",
        "convert",
        str(tiny),
        str(out),
        *args,
        "--quiet",
        "--device=cpu",
    ]
    result = subprocess.run([*command, "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert str(tiny.parent).encode() not in path.read_bytes(), path
    recipe = json.loads((out / "moeport-journal.json").read_text())["recipe"]
    assert recipe["source"] == "deepseek-tiny" and recipe["source_fingerprint"] == fingerprint(tiny)
    if args[1] == "hf":
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["moeport"])["source"] == "deepseek-tiny"


def test_fingerprint_follows_content_not_place(tiny, tmp_path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny, moved)
    assert fingerprint(moved) == fingerprint(tiny)
    other = tmp_path / "other"  # the same architecture, other values: a fine-tune, say
    write_synthetic(other, SyntheticSpec(seed=1))
    assert fingerprint(other) != fingerprint(tiny)
