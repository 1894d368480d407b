"""`moeport verify` as a person reads it: long lists capped to one line (--json keeps them whole),
--quiet prints the verdict only, two different models are told apart in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeport.synthetic import SyntheticSpec, write_synthetic


def moeport(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moeport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def converted(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    src, out = tmp_path / "src", tmp_path / "out"
    write_synthetic(src, SyntheticSpec.tiny())
    done = moeport("convert", str(src), str(out), *args, "--quiet", "--device=cpu")
    assert done.returncode == 0, done.stderr
    return src, out


def test_many_extra_tensors_are_one_line(tmp_path) -> None:
    src, out = converted(tmp_path, "--to", "hf")
    shard = out / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        tensors[f"model.extra.{i:02d}.weight"] = torch.randn(4, 4, generator=g)
    save_file(tensors, str(shard), metadata=meta)
    result = moeport("verify", str(src), str(out))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    examples = "model.extra.00.weight, model.extra.01.weight, model.extra.02.weight"
    assert f"extra 12 tensors, e.g. {examples} (--json or --verbose lists them all)" in lines
    assert lines[-1].startswith("FAIL: ")
    full = json.loads(moeport("verify", str(src), str(out), "--json").stdout)
    assert len(full["extra"]) == 12


def test_many_flagged_tensors_are_capped_and_quiet_is_the_verdict(tmp_path) -> None:
    src, out = converted(tmp_path, "--to", "w4a16", "--group-size", "32")
    result = moeport("verify", str(src), str(out), "--lossless")  # wrong on purpose: all quantized flagged
    assert result.returncode == 1
    flagged = [line for line in result.stdout.splitlines() if line.startswith("flagged ")]
    assert (
        len(flagged) == 21 and flagged[-1] == "flagged ... and 52 more (--json or --verbose lists them all)"
    )
    quiet = moeport("verify", str(src), str(out), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == "OK: 129 tensors compared (57 bit-exact), lossy\n"


def test_different_models_are_one_line(tmp_path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    write_synthetic(src, SyntheticSpec.tiny())
    write_synthetic(other, SyntheticSpec(hidden_size=512))
    result = moeport("verify", str(src), str(other))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: the two checkpoints are different models (config.json: hidden_size 256 vs 512); verify "
        "compares a conversion with its own source\n"
    )


def test_modules_left_unquantized_by_ignore_do_not_condemn_the_rest(tmp_path) -> None:
    """Most layers' attention kept bf16 by --ignore, one layer's quantized: the recipe in the output
    explains it, so the quantized ones are not 'not bit-exact while their peers are'."""
    ignore = r"re:model\.layers\.[023]\.self_attn\."
    args = ("--to", "w8a16", "--group-size", "32", "--targets", "all-linear", "--ignore", ignore)
    src, out = converted(tmp_path, *args)
    result = moeport("verify", str(src), str(out), "--quiet")
    assert result.returncode == 0, result.stdout
    assert result.stdout == "OK: 129 tensors compared (40 bit-exact), lossy\n"


def test_a_log_gets_one_line_per_layer(tmp_path) -> None:
    src, out = converted(tmp_path, "--to", "fp8")
    result = moeport("verify", str(src), str(out))
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"\(\d+ s\)", "(N s)", line) for line in result.stderr.splitlines()]
    assert lines == ["verifying: tensors outside the layers (N s)"] + [
        f"verifying: layer {n} (N s)" for n in range(4)
    ]


def test_verbose_prints_every_tensor_and_uncapped_lists(tmp_path) -> None:
    src, out = converted(tmp_path, "--to", "w4a16", "--group-size", "32")
    result = moeport("verify", str(src), str(out), "--lossless", "--verbose")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "model.norm.weight: bit-exact, cosine 1.000000" in lines
    assert sum(": bit-exact, cosine" in line or ": rel L2 " in line for line in lines) == 129
    assert len([line for line in lines if line.startswith("flagged ")]) == 72
