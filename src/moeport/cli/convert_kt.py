"""`moeport convert SRC DST --to kt-int4|kt-int8`: kt-kernel CPU expert weights, resumable."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from rich.console import Console

from moeport.cli.progress import conversion_progress
from moeport.errors import MoeportError

KT_TARGETS = ("kt-int4", "kt-int8")


def parse_memory(text: str | None) -> int | None:
    if text is None:
        return None
    from moeport.cli.convert import parse_size

    try:
        return parse_size(text)
    except MoeportError:
        raise MoeportError(f"--max-memory {text!r}: expected a size such as 16GB or 512MB") from None


def _prefer_workqueue_threads() -> None:
    """numba's default OpenMP layer keeps its workers spinning between kernel launches; with one
    launch per expert matrix that steals the cores the rest of the loop needs (measured 2-3x slower
    on a busy 2-core machine). The workqueue layer sleeps instead. A user's NUMBA_THREADING_LAYER
    wins, and the setting only matters before the first parallel kernel of the process."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a regular dependency
        return
    numba.config.THREADING_LAYER = "workqueue"


def run_convert_kt(
    src: Path,
    dst: Path,
    to: str,
    numa: int,
    kt_layout: str,
    max_memory: str | None,
    dry_run: bool,
    overwrite: bool,
    quiet: bool,
    console: Console,
    device: str = "cpu",
) -> None:
    from moeport.convert.kt import plan_kt, preflight, prepare_kt, run_kt, source_label, summary
    from moeport.detect import detect
    from moeport.sources import open_checkpoint

    limit = parse_memory(max_memory)
    _prefer_workqueue_threads()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
        # past a file-size limit, writes fail with EFBIG (reported) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with open_checkpoint(src) as ck:
        det = detect(ck)
        plan = plan_kt(ck, det, to, numa, kt_layout, source_label(src))
        plan.device = device  # not part of the recipe: CPU and CUDA write the same bytes
        if dry_run:
            console.print(summary(plan))
            preflight(plan, dst, None, limit)
            console.print(f"peak memory estimate {plan.peak_estimate() / 1e9:.2f} GB")
            for note in plan.notes:
                console.print(f"- {note}")
            return
        journal = prepare_kt(plan, dst, overwrite, limit)
        if journal is None:
            if not quiet:
                console.print(
                    f"{dst}: already complete ({plan.method}, T={plan.tp}, {plan.kt_layout}); nothing to do"
                )
            return
        total = sum(plan.in_bytes(s) for s in plan.steps())
        with conversion_progress(console, quiet) as progress:
            task = progress.add_task("starting", total=total)

            def on_progress(label: str, nbytes: int) -> None:
                progress.update(task, advance=nbytes, description=label)

            result = run_kt(plan, dst, journal, on_progress)
    if quiet:
        return
    if result.already_complete:
        console.print(
            f"{dst}: already complete ({plan.method}, T={plan.tp}, {plan.kt_layout}); nothing to do"
        )
        return
    resumed = f", {result.layers_skipped} layer(s) already done" if result.layers_skipped else ""
    speed = result.bytes_in / result.seconds / 1e9 if result.seconds > 0 else 0.0
    console.print(
        f"wrote {plan.method} T={plan.tp} ({plan.kt_layout}) for {result.layers_done} layer(s){resumed} to "
        f"{dst} in {result.seconds:.1f} s ({speed:.2f} GB/s of source)"
    )
    for note in plan.notes:
        console.print(f"- {note}")
