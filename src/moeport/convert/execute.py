"""The one executor: run any target's plan into its sink, resumably, and publish DST whole.

Every target (recipes/) is a plan of units plus a sink (sinks/). The executor checks DST and the
journal (convert.destination), skips the units whose outputs all lie in pieces already published
by an interrupted run, streams the rest layer by layer (read-ahead threads, batched math on a GPU,
write-behind thread), records each published piece with its checksum, then writes side files and
the sink's completion marker and renames the staging folder to DST. A crash, Ctrl-C or a failed
write (disk full) keeps the staging folder: re-running the same command continues, byte-identical
to an uninterrupted run. An error in the input (a NaN weight, a changed source) removes it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

import torch

from moeport.convert.batching import Batcher, batching
from moeport.convert.destination import (
    JOURNAL_NAME,
    STAGING_SUFFIX,
    check_destination,
    check_writable,
    locked,
    open_staging,
    preflight,
    publish,
    recorded_pieces,
    staging_of,
)
from moeport.convert.plan import Plan, Unit, apply_unit, realize_outputs
from moeport.errors import MoeportError, OutputWriteError
from moeport.parallel import Workers, available_cores, working
from moeport.sinks.pieces import Piece, PieceFile, PieceWriter
from moeport.sinks.safetensors_file import TensorSpec
from moeport.sinks.sharded import INDEX_NAME, HfSink, write_json_atomic
from moeport.sinks.write_behind import WRITE_BEHIND_BYTES
from moeport.sources.checkpoint import Checkpoint
from moeport.sources.prefetch import DEFAULT_BUDGET, Prefetcher

# Files of a checkpoint folder that the conversion writes itself (the rest at top level is carried).
_REWRITTEN = ("config.json", INDEX_NAME, JOURNAL_NAME)
# Read-ahead when batching: a batch asks for up to a few hundred MB of sources at once.
BATCHED_PREFETCH_BYTES = 512 * 2**20

Progress = Callable[[str, int], None]  # (label, source bytes done)


class Sink(Protocol):
    """Where a plan's tensors go: cut into pieces, written, re-checked on resume, finished."""

    def pieces(self, specs: list[TensorSpec]) -> list[Piece]: ...

    def open_piece(self, out_dir: Path, piece: Piece) -> PieceFile: ...

    def still_valid(self, out_dir: Path, piece: Piece, record: dict[str, Any]) -> bool: ...

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None: ...


@dataclass
class Result:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float
    bytes_in: int = 0
    pieces_kept: int = 0  # published by an earlier, interrupted run
    already_complete: bool = False


def execute(
    plan: Plan,
    ck: Checkpoint,
    dst: Path,
    sink: Sink | int,
    metadata: dict[str, str] | None = None,
    on_progress: Progress | None = None,
    batcher: Batcher | None = None,
    *,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_memory: int | None = None,
    threads: int | None = None,
) -> Result:
    """Write the plan's outputs to `dst` (see module doc). `sink` may be a shard size in bytes
    (an HF sink with `metadata`); `recipe` (default: the metadata) identifies the job for resume.
    `threads` compute threads on the CPU (default: every core this process may use); the output
    bytes do not depend on it."""
    threads = threads or available_cores()
    check_writable(dst, overwrite)  # a DST we cannot create fails here, before the lock beside it
    with locked(dst):
        return _execute(
            plan, ck, dst, sink, metadata, on_progress, batcher, recipe, overwrite, max_memory, threads
        )


def _execute(
    plan, ck, dst, sink, metadata, on_progress, batcher, recipe, overwrite, max_memory, threads
) -> Result:
    start = time.perf_counter()
    if isinstance(sink, int):
        sink = HfSink(sink, dict(metadata or {}))
    recipe = recipe if recipe is not None else {"metadata": metadata or {}}
    if check_destination(dst, ck.root, recipe, overwrite):
        return Result(dst, len(plan.specs), 0, time.perf_counter() - start, already_complete=True)
    pieces = sink.pieces(plan.specs)
    preflight(dst, pieces, recorded_pieces(dst, recipe), plan.peak_estimate(ck), max_memory)
    journal = open_staging(dst, recipe, pieces, sink.still_valid, overwrite)
    staging = staging_of(dst)
    kept = set(journal.steps)
    piece_of = {s.name: p.name for p in pieces for s in p.specs}
    todo = [u for u in plan.units if not all(piece_of[o] in kept for o in u.op.outputs)]
    report = on_progress or (lambda _label, _n: None)
    report("resuming" if kept else "starting", _in_bytes(plan.units, ck) - _in_bytes(todo, ck))
    # on a GPU, a few host threads keep batches going; on the CPU, a thread per core computes
    workers = Workers(min(threads, batcher.host_threads) if batcher is not None else threads)
    budget = BATCHED_PREFETCH_BYTES if batcher is not None else prefetch_budget(workers.threads)
    write_queue = BATCHED_PREFETCH_BYTES if batcher is not None else WRITE_BEHIND_BYTES
    reads = (n for u in todo for n in u.op.inputs if n not in u.op.sliced_inputs)
    prefetch = Prefetcher(ck, reads, budget)
    written = 0
    try:
        with (
            # a GPU batch's outputs arrive at once: queue a batch's worth so the next one computes
            # while the disk writes (a fixed budget, like the read-ahead's)
            PieceWriter(staging, pieces, sink.open_piece, kept, journal.record, write_queue) as writer,
            batching(batcher),
            working(workers),
            # the CPU kernels run one per worker thread; torch's own threads would oversubscribe
            _torch_threads(max(1, threads // workers.threads) if batcher is not None else 1),
        ):
            out_bytes = {spec.name: spec.nbytes for spec in plan.specs}
            eager = workers.threads > 1
            steps = _tasks(todo, ck, prefetch.get, writer.skips, out_bytes, eager, batcher)
            budget = workers.threads * IN_FLIGHT_BYTES_PER_THREAD
            for step, outputs in workers.ordered(steps, lambda s: s.out_bytes, budget):
                for name, tensor in outputs:
                    writer.write(name, tensor)
                    written += tensor.numel() * tensor.element_size()
                    del tensor
                del outputs
                report(step.label, _in_bytes([step.unit], ck))  # progress moves within a layer too
                if step.last:  # the layer is written
                    if batcher is not None:  # its jobs nobody asked for (outputs kept on resume)
                        batcher.clear(before=step.submitted)
                    ck.check_unchanged()
        copy_side_files(ck.root, staging)
        if plan.config is not None:
            write_json_atomic(staging / "config.json", plan.config)
        elif (ck.root / "config.json").is_file():
            shutil.copy2(ck.root / "config.json", staging / "config.json")
        for name, doc in plan.side_files.items():
            if doc is None:
                (staging / name).unlink(missing_ok=True)
            else:
                write_json_atomic(staging / name, doc)
        sink.finish(staging, pieces)
        ck.check_unchanged()  # the last word before DST appears
        journal.finish()
        publish(staging, dst)
    except OSError as exc:
        raise OutputWriteError(f"{exc.filename or dst}: {exc.strerror or exc}") from None
    except MoeportError as exc:
        if not isinstance(exc, OutputWriteError):  # the input must change: nothing to resume
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        prefetch.close()
    seconds = time.perf_counter() - start
    return Result(dst, len(plan.specs), written, seconds, _in_bytes(todo, ck), len(kept))


def _in_bytes(units, ck: Checkpoint) -> int:
    return sum(ck.info(n).nbytes for u in units for n in u.op.inputs)


@dataclass(frozen=True)
class _Step:
    """One unit of the plan in the ordered stream (`last`: the last of its layer)."""

    unit: Unit
    label: str
    last: bool
    out_bytes: int
    submitted: int = 0  # batched jobs submitted up to the end of this unit's layer


def _tasks(
    todo: list[Unit],
    ck: Checkpoint,
    fetch,
    skips,
    out_bytes: dict[str, int],
    eager: bool,
    batcher: Batcher | None = None,
) -> Iterator[tuple[_Step, Callable[[], Any]]]:
    """The plan as (unit, compute) pairs in write order; compute gives the unit's (name, tensor)
    outputs, all computed in the calling thread when `eager` (a pool's worker: the outputs sharing
    a decode or an encode stay on one thread), else one at a time as they are written.
    All units of a layer are applied (lazily) before any output is asked for, so a batcher sees
    the layer's same-shape weights together."""
    for layer, group in groupby(todo, key=lambda u: u.layer):
        units = list(group)
        label = f"layer {layer}" if layer is not None else "other tensors"
        applied = [apply_unit(unit, ck, fetch) for unit in units]
        submitted = batcher.submitted if batcher is not None else 0
        for i, (unit, outs) in enumerate(zip(units, applied, strict=True)):
            wanted = {n: v for n, v in outs.items() if not skips(n)}
            outs.clear()
            size = sum(out_bytes[n] for n in wanted)
            step = _Step(unit, label, i == len(units) - 1, size, submitted)
            yield step, functools.partial(_compute if eager else realize_outputs, wanted)
        del applied


def _compute(outs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    return list(realize_outputs(outs))


# Outputs of units computed ahead on the CPU pool: threads x this, or one unit when that is bigger.
IN_FLIGHT_BYTES_PER_THREAD = 128 * 2**20


def prefetch_budget(threads: int) -> int:
    """Read-ahead bytes: the fixed budget per two compute threads (workers that find their input
    not yet read read it themselves), at most the GPU batches' budget."""
    return min(BATCHED_PREFETCH_BYTES, DEFAULT_BUDGET * max(1, threads // 2))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with torch on `n` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config, chat template, custom code: every top-level non-weight file."""
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.suffix == ".safetensors" or path.name in _REWRITTEN:
            continue
        if path.name.endswith(STAGING_SUFFIX) or path.name.endswith(".partial"):
            continue
        shutil.copy2(path, dst / path.name)


def describe_recipe(**fields: object) -> dict[str, str]:
    """safetensors `__metadata__` entries recording how the output was made."""
    return {"moeport": json.dumps(fields, sort_keys=True)}
