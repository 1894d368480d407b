"""Batched execution (the GPU path's way of running the math) writes exactly the bytes of the
one-by-one path. Run here on the CPU with small batches, so every batch boundary is crossed; the
CUDA runs of the same comparison are in test_gpu_path.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import shard_bytes

from moeport.convert.batching import Batcher
from moeport.convert.execute import execute
from moeport.detect import detect
from moeport.recipes.gpu import Recipe, plan_gpu
from moeport.recipes.hf import DTYPES, plan_hf
from moeport.sources import open_checkpoint

JOBS = [  # (model type, source layout, source format, recipe or (layout, dtype))
    ("qwen3_moe", "hub", "fp8-block", ("hub", "bf16")),
    ("qwen3_moe", "fused", "fp8-block", ("hub", "bf16")),
    ("deepseek_v3", "hub", "fp8-block", ("fused", "bf16")),
    ("qwen3_moe", "hub", "bf16", Recipe("w4a16", group_size=32)),
    ("mixtral", "hub", "bf16", Recipe("w8a16", group_size=None)),
    ("qwen3_moe", "hub", "fp8-block", Recipe("w4a16", group_size=32, targets="all-linear")),
    ("deepseek_v3", "hub", "fp8-block", Recipe("fp8")),
    ("qwen3_moe", "hub", "bf16", Recipe("fp8-block")),
]


def convert(src: Path, out: Path, job, batcher: Batcher | None, threads: int | None = None) -> None:
    with open_checkpoint(src) as ck:
        det = detect(ck)
        if isinstance(job, Recipe):
            plan = plan_gpu(ck, det, job)
        else:
            plan = plan_hf(ck, det, job[0], DTYPES[job[1]])
        execute(plan, ck, out, 5 * 10**9, {}, batcher=batcher, threads=threads)


@pytest.mark.parametrize("host_threads", [1, 3])
@pytest.mark.parametrize(("model_type", "layout", "fmt", "job"), JOBS)
def test_batched_output_is_byte_identical(
    checkpoint, tmp_path, model_type, layout, fmt, job, host_threads
) -> None:
    """Batches give the one-by-one bytes, also when several host threads ask for their jobs at
    once (a job's batch runs once; the others wait for it)."""
    src = checkpoint(model_type, layout, fmt)
    convert(src, tmp_path / "one-by-one", job, None)
    # a few experts per batch: partial batches too
    batcher = Batcher("cpu", max_elements=3 * 64 * 64, host_threads=host_threads)
    convert(src, tmp_path / "batched", job, batcher, threads=host_threads)
    assert batcher.jobs_run > batcher.batches_run > 0  # it did batch
    plain, batched = shard_bytes(tmp_path / "one-by-one"), shard_bytes(tmp_path / "batched")
    assert plain and plain.keys() == batched.keys()
    for name in plain:
        assert plain[name] == batched[name], name


@pytest.mark.parametrize(("batched", "threads"), [(False, 1), (True, 1), (False, 4), (True, 3)])
def test_a_bad_weight_is_named(checkpoint, tmp_path, batched, threads) -> None:
    """A NaN code in one FP8 expert fails the conversion, batched or not, on one thread or on the
    pool (moeport.parallel), with that tensor's name, and leaves no output."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    from moeport.errors import MoeportError

    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe", "hub", "fp8-block"), src)
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(str(shard))
    bad = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensors[bad].view(torch.uint8)[3, 5] = 0x7F
    save_file(tensors, str(shard), metadata={"format": "pt"})
    batcher = Batcher("cpu", max_elements=4 * 64 * 64, host_threads=threads) if batched else None
    with pytest.raises(MoeportError, match=rf"^{re.escape(bad)}: FP8 weight contains NaN codes"):
        convert(src, tmp_path / "out", ("hub", "bf16"), batcher, threads=threads)
    assert not (tmp_path / "out").exists()
