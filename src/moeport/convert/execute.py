"""Run a plan: stream every output tensor into a staging folder, then publish it in one rename.

DST appears only when complete: shards, index, config and side files are written into
`DST.moeport-partial/` and the folder is renamed at the end; any error removes the staging folder,
so a failed run never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from moeport.convert.batching import Batcher, batching
from moeport.convert.plan import Plan, apply_unit, realize_outputs
from moeport.errors import MoeportError
from moeport.sinks.sharded import INDEX_NAME, ShardedWriter, write_json_atomic
from moeport.sources.checkpoint import Checkpoint
from moeport.sources.prefetch import DEFAULT_BUDGET, Prefetcher

STAGING_SUFFIX = ".moeport-partial"
# Files of a checkpoint folder that the plan rewrites (everything else at top level is carried over).
_REWRITTEN = ("config.json", INDEX_NAME)
# Read-ahead when batching: a batch asks for up to a few hundred MB of sources at once.
BATCHED_PREFETCH_BYTES = 512 * 2**20


@dataclass
class Result:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float


def prepare_destination(dst: Path, overwrite: bool, src: Path | None = None) -> None:
    if src is not None:
        root, out = src.resolve(), dst.resolve()
        if root == out or out in root.parents:
            raise MoeportError(f"{dst}: is (or contains) the source checkpoint {src}; choose another DST")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise MoeportError(f"{dst}: already exists and is not empty (use --overwrite to replace it)")


def execute(
    plan: Plan,
    ck: Checkpoint,
    dst: Path,
    max_shard_bytes: int,
    metadata: dict[str, str],
    on_layer: Callable[[int | None, int], None] | None = None,
    batcher: Batcher | None = None,
) -> Result:
    """Write the plan's outputs to `dst` (see module doc); `on_layer(layer, bytes)` reports progress.

    With a `batcher` (the GPU path), all units of a layer are applied before any is realised, so
    the layer's same-shape weights can be decoded/encoded together (convert.batching).
    """
    start = time.perf_counter()
    staging = dst.with_name(dst.name + STAGING_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    written = 0
    budget = BATCHED_PREFETCH_BYTES if batcher is not None else DEFAULT_BUDGET
    prefetch = Prefetcher(ck, (n for u in plan.units for n in u.op.inputs), budget)
    try:
        copy_side_files(ck.root, staging)
        if plan.config is not None:
            write_json_atomic(staging / "config.json", plan.config)
        with ShardedWriter(staging, plan.specs, max_shard_bytes, metadata) as writer, batching(batcher):
            for layer, units in groupby(plan.units, key=lambda u: u.layer):
                layer_bytes = 0
                applied = [apply_unit(unit, ck, prefetch.get) for unit in units]
                for outs in applied:
                    for name, tensor in realize_outputs(outs):
                        writer.write(name, tensor)
                        n = tensor.numel() * tensor.element_size()
                        written += n
                        layer_bytes += n
                        del tensor
                del applied
                if batcher is not None:
                    batcher.clear()
                if on_layer:
                    on_layer(layer, layer_bytes)
        _publish(staging, dst)
    except BaseException:
        prefetch.close()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prefetch.close()
    return Result(dst, len(plan.specs), written, time.perf_counter() - start)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, custom code: every top-level non-weight file."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.suffix == ".safetensors" or path.name in _REWRITTEN:
            continue
        if path.name.endswith(STAGING_SUFFIX) or path.name.endswith(".partial"):
            continue
        shutil.copy2(path, dst / path.name)


def _publish(staging: Path, dst: Path) -> None:
    if dst.exists():
        if dst.is_dir():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    os.replace(staging, dst)


def describe_recipe(**fields: object) -> dict[str, str]:
    """safetensors `__metadata__` entries recording how the output was made."""
    return {"moeport": json.dumps(fields, sort_keys=True)}
