"""`moeport convert`: pick the target from the registry, print the plan (--dry-run) or run it.

Every target goes the same way: detect, build (plan + sink), check DST, execute with a progress
bar, resume where an interrupted run of the same command stopped.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeport.cli.progress import ConversionProgress
from moeport.errors import MoeportError
from moeport.recipes.base import Options
from moeport.sizes import format_size as _size

INTERRUPTED = "interrupted: run the same command again to continue where it stopped"


@dataclass(frozen=True)
class RunFlags:
    """How to run (not what to make): these never change the output's bytes."""

    dry_run: bool = False
    overwrite: bool = False
    quiet: bool = False
    max_memory: int | None = None
    as_json: bool = False  # a JSON summary on stdout (progress, if any, on stderr)
    verbose: bool = False  # the plan, as --dry-run prints it, before the work
    threads: int | None = None  # CPU compute threads (None: every core this process may use)


def run_convert(
    src: Path,
    dst: Path,
    to: str,
    options: Options,
    flags: RunFlags,
    console: Console,
    given: Iterable[str] = (),
) -> None:
    """`given`: the Options fields the user set explicitly (refused where the target ignores them)."""
    from moeport.convert.batching import Batcher
    from moeport.convert.execute import describe_recipe, execute
    from moeport.detect import detect
    from moeport.device import resolve_device
    from moeport.recipes import TARGETS, job_recipe
    from moeport.sources import open_checkpoint

    target = TARGETS.get(to.lower())
    if target is None:
        raise MoeportError(f"--to {to}: unknown target; expected one of {', '.join(TARGETS)}")
    target.refuse_unused(given)
    device = resolve_device(options.device)
    from moeport.convert.destination import staging_of

    options = Options(**{**options.__dict__, "device": device, "staging": str(staging_of(dst))})
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
        # past a file-size limit, writes fail with EFBIG (reported) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with open_checkpoint(src) as ck:
        det = detect(ck)
        recipe = job_recipe(target, options, ck, det)
        plan, sink = target.build(ck, det, options, describe_recipe(**recipe))
        for warning in plan.warnings:
            Console(stderr=True).print(warning, highlight=False, markup=False, soft_wrap=True)
        if flags.dry_run and flags.as_json:
            print(json.dumps(_plan_summary(plan, ck, dst), indent=2))
            return
        if flags.dry_run or (flags.verbose and not flags.as_json):
            _print_plan(console, plan, ck)
        if flags.dry_run:
            return
        total = sum(ck.info(n).nbytes for u in plan.units for n in u.op.inputs)
        shown = Console(stderr=True) if flags.as_json else console
        with ConversionProgress(shown, total, flags.quiet) as on_progress:
            # On a GPU, same-shape weights of a layer are decoded/encoded in batches: one transfer
            # and one kernel sequence per batch instead of per weight (convert.batching).
            batcher = Batcher(device) if device != "cpu" else None
            try:
                result = execute(
                    plan, ck, dst, sink, None, on_progress, batcher,
                    recipe=recipe, overwrite=flags.overwrite, max_memory=flags.max_memory,
                    threads=flags.threads,
                )  # fmt: skip
            except KeyboardInterrupt:  # typer would exit 130 without a word; say how to resume
                Console(stderr=True).print(INTERRUPTED, highlight=False, markup=False)
                raise SystemExit(130) from None
    if flags.as_json:
        print(json.dumps(_summary(result, plan, dst), indent=2))
        return
    if flags.quiet:
        return
    if result.already_complete:
        line = f"{dst}: already complete ({plan.title}); nothing to do"
        console.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    resumed = f", {result.pieces_kept} piece(s) kept from an interrupted run" if result.pieces_kept else ""
    speed = int(result.bytes_in / result.seconds) if result.seconds > 0 else 0
    console.print(
        f"wrote {result.tensors} tensors ({_size(result.bytes_written)}) to {dst} in "
        f"{result.seconds:.1f} s ({_size(speed)}/s of source){resumed}",
        highlight=False,
        markup=False,
    )
    for note in plan.notes:
        console.print(f"- {note}", highlight=False, markup=False, soft_wrap=True)


def _summary(result, plan, dst: Path) -> dict:
    """convert --json: what a script needs to know of a finished run."""
    return {
        "output": str(dst),
        "title": plan.title,
        "already_complete": result.already_complete,
        "tensors": result.tensors,
        "bytes_in": result.bytes_in,
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "pieces_kept": result.pieces_kept,
        "notes": plan.notes,
    }


def _plan_summary(plan, ck, dst: Path) -> dict:
    stats = plan.layer_stats(ck)
    return {
        "output": str(dst),
        "title": plan.title,
        "dry_run": True,
        "tensors": len(plan.specs),
        "bytes_in": sum(s["in_bytes"] for s in stats.values()),
        "bytes_out": sum(s.nbytes for s in plan.specs),
        "peak_memory_estimate": plan.peak_estimate(ck),
        "notes": plan.notes,
    }


def _print_plan(console: Console, plan, ck) -> None:
    stats = plan.layer_stats(ck)
    t = Table(title=escape(f"plan: {ck.root}"), title_justify="left")
    for col in ("layer", "tensors in", "bytes in", "tensors out", "bytes out"):
        t.add_column(col, justify="right")
    for layer in sorted(stats, key=lambda L: -1 if L is None else L):
        s = stats[layer]
        t.add_row(
            "-" if layer is None else str(layer),
            str(s["in"]),
            _size(s["in_bytes"]),
            str(s["out"]),
            _size(s["out_bytes"]),
        )
    console.print(t)
    total_in = sum(s["in_bytes"] for s in stats.values())
    total_out = sum(s.nbytes for s in plan.specs)
    console.print(plan.title, highlight=False, markup=False)
    console.print(
        f"{len(plan.specs)} tensors, {_size(total_in)} in, {_size(total_out)} out; "
        f"peak memory estimate {_size(plan.peak_estimate(ck))}"
    )
    for note in plan.notes:
        console.print(f"- {note}", highlight=False, markup=False, soft_wrap=True)
