"""Target options as users bring them: --ignore in llmcompressor's conventions (module names, `re:`),
each pattern's reach said in the plan, a pattern matching nothing refused; options the chosen target
does not take are refused in one line, not silently ignored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def convert_cli(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moeport", "convert", str(src), str(dst), "--device", "cpu", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_ignore_takes_module_names_and_re_prefix(checkpoint, tmp_path) -> None:
    src = checkpoint("deepseek_v3", "hub")
    dst = tmp_path / "w4"
    patterns = ["re:.*q_a_proj$", "model.layers.1.self_attn.o_proj", r".*kv_a_proj_with_mqa"]
    args = ["--to", "w4a16", "--group-size", "0", "--targets", "all-linear"]
    result = convert_cli(src, dst, *args, *(a for p in patterns for a in ("--ignore", p)))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("- --ignore")]
    assert notes == [
        "- --ignore 're:.*q_a_proj$': 3 modules matched, 3 of them spared quantization",
        "- --ignore 'model.layers.1.self_attn.o_proj': 1 module matched, 1 of them spared quantization",
        "- --ignore '.*kv_a_proj_with_mqa': 3 modules matched, 3 of them spared quantization",
    ]
    kept = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for layer in range(3):
            for proj in ("q_a_proj", "kv_a_proj_with_mqa"):
                module = f"model.layers.{layer}.self_attn.{proj}"
                assert f.get_tensor(module + ".weight").dtype == torch.bfloat16 and module in kept
        assert "model.layers.1.self_attn.o_proj" in kept
        assert "model.layers.0.self_attn.o_proj.weight_packed" in names


def test_ignore_of_untargeted_modules_says_it_spares_nothing(checkpoint, tmp_path) -> None:
    result = convert_cli(
        checkpoint("deepseek_v3", "hub"), tmp_path / "x", "--to", "fp8", "--ignore", "q_a_proj", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert "- --ignore 'q_a_proj': 3 modules matched, 0 of them spared quantization" in result.stdout


def test_ignore_matching_nothing_is_refused(checkpoint, tmp_path) -> None:
    result = convert_cli(
        checkpoint("deepseek_v3", "hub"), tmp_path / "x", "--to", "fp8", "--ignore", "re:qa_proj"
    )
    assert one_line_error(result) == (
        "error: --ignore 're:qa_proj': matches no linear module (names look like "
        "model.layers.1.mlp.experts.0.down_proj)"
    )
    assert not (tmp_path / "x").exists()


HF = "(it takes --layout, --dtype, --max-shard-size)"
KT = "(it takes --numa, --kt-layout, --kt-any-cpu)"
INT = (
    "(it takes --group-size, --targets, --ignore, --max-shard-size, --allow-nonfinite, --method, "
    "--calibration, --samples, --seq-len, --dampening, --act-order, --all-experts, --spill-states)"
)
FP8 = "(it takes --targets, --ignore, --max-shard-size, --allow-nonfinite)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-size", "64"], f"--group-size: not an option of --to hf {HF}"),
        (["--ignore", "x", "--targets", "all-linear"], f"--targets, --ignore: not options of --to hf {HF}"),
        (["--to", "kt-int4", "--layout", "hub"], f"--layout: not an option of --to kt-int4 {KT}"),
        (["--to", "kt-int8", "--max-shard-size", "1GB"], f"--max-shard-size: not an option of --to kt-int8 {KT}"),  # noqa: E501
        (["--to", "w4a16", "--numa", "2"], f"--numa: not an option of --to w4a16 {INT}"),
        (["--to", "fp8", "--dtype", "bf16", "--kt-layout", "folders"], f"--dtype, --kt-layout: not options of --to fp8 {FP8}"),  # noqa: E501
        (["--to", "fp8-block", "--group-size", "128"], f"--group-size: not an option of --to fp8-block {FP8}"),  # noqa: E501
    ],
)  # fmt: skip
def test_options_the_target_does_not_take_are_refused(checkpoint, tmp_path, args, message) -> None:
    result = convert_cli(checkpoint("qwen3_moe", "hub"), tmp_path / "x", *args)
    assert one_line_error(result) == f"error: {message}"
    assert not (tmp_path / "x").exists()
