"""`moeport convert`: choose the recipe, print the plan (--dry-run) or run it with a progress bar."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moeport.cli.progress import conversion_progress
from moeport.errors import MoeportError

TARGETS = ("hf", "w4a16", "w8a16", "fp8", "fp8-block", "kt-int4", "kt-int8")
GPU_TARGETS = ("w4a16", "w8a16", "fp8", "fp8-block")
LAYOUTS = ("hub", "fused")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", text.upper())
    if not m:
        raise MoeportError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    base = 1024 if m[3] else 1000
    return int(float(m[1]) * base ** " KMGT".index(m[2] or " "))


def run_convert(
    src: Path,
    dst: Path,
    to: str,
    layout: str,
    dtype: str,
    max_shard_size: str,
    dry_run: bool,
    overwrite: bool,
    quiet: bool,
    console: Console,
    numa: int = 1,
    kt_layout: str = "merged",
    max_memory: str | None = None,
    group_size: int = 128,
    targets: str = "experts",
    ignore: tuple[str, ...] = (),
    device: str = "auto",
) -> None:
    from moeport.cli.convert_kt import KT_TARGETS, run_convert_kt
    from moeport.device import resolve_device

    device = resolve_device(device)
    if to in KT_TARGETS:
        run_convert_kt(src, dst, to, numa, kt_layout, max_memory, dry_run, overwrite, quiet, console, device)
        return
    from moeport.convert.batching import Batcher
    from moeport.convert.execute import describe_recipe, execute, prepare_destination
    from moeport.convert.hf import DTYPES, plan_hf
    from moeport.detect import detect
    from moeport.sources import open_checkpoint

    if to not in TARGETS:
        raise MoeportError(f"--to {to}: unknown target; expected one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise MoeportError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    if dtype != "keep" and dtype not in DTYPES:
        raise MoeportError(f"--dtype {dtype}: expected keep or one of {', '.join(DTYPES)}")
    recipe = _gpu_recipe(to, layout, group_size, targets, ignore) if to in GPU_TARGETS else None
    shard_bytes = parse_size(max_shard_size)
    if not dry_run:
        prepare_destination(dst, overwrite, src)
    with open_checkpoint(src) as ck:
        det = detect(ck)
        if recipe is not None:
            from moeport.convert.gpu_formats import plan_gpu

            plan = plan_gpu(ck, det, recipe, device)
        else:
            plan = plan_hf(ck, det, layout, DTYPES.get(dtype), device)
        if dry_run:
            _print_plan(console, plan, ck, det, layout, dtype if recipe is None else to)
            return
        total = sum(s.nbytes for s in plan.specs)
        fields = dict(to=to, layout=layout, dtype=dtype, source=str(src), family=det.family.name)
        if recipe is not None:
            fields.update(group_size=recipe.group_size, targets=targets, ignore=list(ignore))
        meta = describe_recipe(**fields)
        with conversion_progress(console, quiet) as progress:
            task = progress.add_task("converting", total=total)

            def on_layer(layer: int | None, nbytes: int) -> None:
                label = f"layer {layer}" if layer is not None else "other tensors"
                progress.update(task, advance=nbytes, description=label)

            # On a GPU, same-shape weights of a layer are decoded/encoded in batches: one transfer
            # and one kernel sequence per batch instead of per expert (convert.batching).
            batcher = Batcher(device) if device != "cpu" else None
            result = execute(plan, ck, dst, shard_bytes, meta, on_layer, batcher)
    if not quiet:
        console.print(
            f"wrote {result.tensors} tensors ({result.bytes_written / 1e9:.3f} GB) to {dst} "
            f"in {result.seconds:.1f} s"
        )


def _gpu_recipe(to: str, layout: str, group_size: int, targets: str, ignore: tuple[str, ...]):
    from moeport.convert.gpu_formats import Recipe

    if layout != "hub":
        raise MoeportError(
            f"--to {to} writes per-expert (hub) names, as vLLM/SGLang load them; drop --layout"
        )
    if targets not in ("experts", "all-linear"):
        raise MoeportError(f"--targets {targets}: expected experts or all-linear")
    if group_size < 0:
        raise MoeportError(f"--group-size {group_size}: expected a positive size, or 0 for per channel")
    for pattern in ignore:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise MoeportError(f"--ignore {pattern!r}: not a regular expression ({exc})") from None
    return Recipe(to, group_size or None, targets, tuple(ignore))


def _print_plan(console: Console, plan, ck, det, layout: str, dtype: str) -> None:
    stats = plan.layer_stats(ck)
    t = Table(title=f"plan: {ck.root} -> layout {layout}, {dtype}", title_justify="left")
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
    console.print(
        f"{det.family.title}: {det.layout.kind} -> {layout}; {len(plan.specs)} tensors, "
        f"{_size(total_in)} in, {_size(total_out)} out; peak memory estimate {_size(plan.peak_estimate(ck))}"
    )
    for note in plan.notes:
        console.print(f"- {note}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
