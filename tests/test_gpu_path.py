"""The CUDA path writes the same bytes as the CPU path (runs where CUDA is present; skips elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fixtures import shard_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

JOBS = [  # (source layout, source format, --to and options)
    ("hub", "fp8-block", ["--to", "hf", "--dtype", "bf16"]),
    ("hub", "fp8-block", ["--to", "hf", "--layout", "fused", "--dtype", "bf16"]),
    ("fused", "fp8-block", ["--to", "hf", "--dtype", "bf16"]),
    ("hub", "bf16", ["--to", "w4a16", "--group-size", "32"]),
    ("hub", "fp8-block", ["--to", "w8a16", "--group-size", "32", "--targets", "all-linear"]),
    ("fused", "fp8-block", ["--to", "w4a16", "--group-size", "32"]),
    ("hub", "bf16", ["--to", "fp8-block"]),
    ("hub", "bf16", ["--to", "fp8"]),
    ("hub", "bf16", ["--to", "nvfp4"]),
    ("hub", "fp8-block", ["--to", "nvfp4", "--flavor", "modelopt", "--targets", "all-linear"]),
    ("fused", "bf16", ["--to", "nvfp4", "--flavor", "modelopt"]),
    ("hub", "bf16", ["--to", "mxfp4"]),
    ("fused", "fp8-block", ["--to", "mxfp4"]),
]


def run(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "moeport", "convert", *args, "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("layout", "fmt", "args"), JOBS)
def test_cuda_output_is_byte_identical_to_cpu(checkpoint, tmp_path, layout, fmt, args) -> None:
    src = checkpoint("qwen3_moe", layout, fmt)
    run(str(src), str(tmp_path / "cpu"), *args, "--device", "cpu")
    run(str(src), str(tmp_path / "cuda"), *args, "--device", "cuda")
    cpu, cuda = shard_bytes(tmp_path / "cpu"), shard_bytes(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys() and cpu == cuda


@pytest.mark.parametrize("to", ["kt-int4", "kt-int8"])
def test_cuda_kt_output_is_byte_identical_to_cpu(tmp_path, to) -> None:
    from moeport.synthetic import SyntheticSpec, write_synthetic

    src = tmp_path / "src"
    write_synthetic(src, SyntheticSpec.tiny())
    fp8 = tmp_path / "fp8"
    run(str(src), str(fp8), "--to", "fp8-block", "--device", "cpu")
    for source in (src, fp8):
        run(str(source), str(tmp_path / f"{source.name}-cpu"), "--to", to, "--numa", "1", "--device", "cpu")
        run(str(source), str(tmp_path / f"{source.name}-cuda"), "--to", to, "--numa", "1", "--device", "cuda")
        assert shard_bytes(tmp_path / f"{source.name}-cpu") == shard_bytes(tmp_path / f"{source.name}-cuda")
