"""typer app. User mistakes (MoeportError) become one red line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from moeport.cli.hub import resolve_source
from moeport.cli.inspect_view import print_inspect, print_kt, print_layer_bytes
from moeport.errors import MoeportError
from moeport.recipes import TARGETS, gguf, hf, kt
from moeport.report import inspect_report, kt_report
from moeport.sizes import format_size, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Convert Mixture-of-Experts checkpoints between layouts and quantization formats.",
)
out = Console()
err = Console(stderr=True)


MIN_SHARD_BYTES = 100_000  # below this a "shard size" is a typo, and would write thousands of files


@app.command()
def inspect(
    path: Annotated[
        Path | None,
        typer.Argument(help="Checkpoint folder, .safetensors file, or Hub repo id in the local cache."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also print the bytes of every layer.")] = False,
    families: Annotated[
        bool,
        typer.Option(
            "--families", help="List the MoE model types of the installed transformers, their support."
        ),
    ] = False,
    ctx: typer.Context = None,  # type: ignore[assignment]  # typer passes it; demo calls without
) -> None:
    """Detect family, layers, experts and expert storage format of a checkpoint (headers only)."""
    from moeport.detect import detect
    from moeport.sinks.kt import MANIFEST_NAME
    from moeport.sources import open_checkpoint
    from moeport.verify.kt_canonical import kt_description, kt_metadata

    if families:
        if path is not None:
            raise MoeportError("inspect --families takes no checkpoint path")
        from moeport.cli.families import print_families

        print_families(out, as_json)
        return
    if path is None:
        from moeport.cli.families import missing_path

        missing_path(ctx)
    path = resolve_source(path)
    found = kt_metadata(path) if path.is_dir() else None
    if found is not None:  # moeport's own kt-kernel output (merged or folders)
        form = "folders" if found[0].name == MANIFEST_NAME else "merged"
        report = kt_report(path, kt_description(path), found[1], form)
    else:
        from moeport.verify.run import recipe_of

        with open_checkpoint(path) as ck:
            report = inspect_report(path, detect(ck), recipe_of(ck))
    if as_json:
        print(json.dumps(report, indent=2))
    elif found is not None:
        print_kt(out, report)
    else:
        print_inspect(out, report)
        if verbose:
            print_layer_bytes(out, report["bytes"]["per_layer"])


def _targets_help() -> str:
    return "Target (any case): " + "; ".join(f"{t.name}: {t.help}" for t in TARGETS.values()) + "."


def _choices(names) -> str:
    """The metavar that shows an option's choices in --help, read from the registries."""
    return "[" + "|".join(names) + "]"


# convert's parameter behind each target-specific Options field (recipes.base.OPTION_FLAGS)
_OPTION_PARAMS = {"max_shard_bytes": "max_shard_size"}


@app.command()
def convert(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="Source checkpoint folder, or Hub repo id in the local cache.")],
    dst: Annotated[Path, typer.Argument(help="Output folder (must not exist or be empty).")],
    to: Annotated[str, typer.Option("--to", metavar="TARGET", help=_targets_help())] = "hf",
    layout: Annotated[
        str,
        typer.Option(
            metavar=_choices(hf.LAYOUTS),
            help="hf: hub (per-expert names, as on the Hub) or fused (transformers v5).",
        ),
    ] = "hub",
    dtype: Annotated[
        str,
        typer.Option(
            metavar=_choices(("keep", *hf.DTYPES)),
            help="hf: keep (re-layout only, scales carried along), or a float dtype (dequantize).",
        ),
    ] = "keep",
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")] = "5GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty DST.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Print the plan (as --dry-run does), then convert.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary (or, with --dry-run, the plan's totals).")
    ] = False,
    numa: Annotated[
        int, typer.Option("--numa", help="kt targets: NUMA slices T (kt's threadpool_count).")
    ] = 1,
    kt_layout: Annotated[
        str,
        typer.Option(
            "--kt-layout",
            metavar=_choices(kt.KT_LAYOUTS),
            help="kt targets: merged (safetensors) or folders (_layer_L/*.kt).",
        ),
    ] = "merged",
    flavor: Annotated[
        str,
        typer.Option(
            "--flavor",
            metavar="compressed-tensors|modelopt|gpt-oss",
            help="nvfp4/mxfp4: checkpoint flavour (default compressed-tensors: what vLLM loads as A16).",
        ),
    ] = "",
    gguf_type: Annotated[
        str,
        typer.Option("--gguf-type", metavar=_choices(gguf.GGUF_TYPES), help="gguf: the weights' GGML type."),
    ] = "bf16",
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="Refuse to start if the estimated peak memory exceeds this."),
    ] = None,
    group_size: Annotated[
        int, typer.Option(help="w4a16/w8a16: RTN group size along the input dim; 0 = per channel.")
    ] = 128,
    targets: Annotated[
        str, typer.Option(help="w4a16/w8a16/fp8/fp8-block: quantize 'experts' or 'all-linear'.")
    ] = "experts",
    device: Annotated[
        str,
        typer.Option(
            help="Where decode/quantize math runs: cpu, cuda[:N], or auto (the CPU with 8 or more "
            "threads, else CUDA when it is usable). Same bytes either way; CUDA helps machines with "
            "few cores (bench/RESULTS.md)."
        ),
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="CPU threads computing experts in parallel (default: every core this process may "
            "use). Same bytes with any count; memory grows by about 2 output tensors per thread.",
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            help="GPU targets: a module to keep unquantized (repeatable): its name or a regex, with or "
            "without llmcompressor's 're:' prefix, searched in module names; routers, norms, "
            "embeddings and lm_head are always kept."
        ),
    ] = None,
    allow_nonfinite: Annotated[
        bool,
        typer.Option(
            "--allow-nonfinite",
            help="Quantize weights holding NaN/Inf instead of refusing them (kt formats cannot hold them).",
        ),
    ] = False,
    kt_any_cpu: Annotated[
        bool,
        typer.Option(
            "--kt-any-cpu",
            help="kt: write a method this CPU could not run in kt-kernel (for another machine).",
        ),
    ] = False,
    input_scales: Annotated[
        str,
        typer.Option(
            "--input-scales",
            metavar="FILE",
            help="nvfp4: JSON or safetensors of each module's input absmax from calibration -> W4A4 "
            "with static input scales (default: weight-only).",
        ),
    ] = "",
    method: Annotated[
        str, typer.Option(metavar="rtn|gptq", help="w4a16/w8a16/kt-gptq-int4: RTN or GPTQ.")
    ] = "rtn",
    calibration: Annotated[
        Path | None, typer.Option(help="gptq: token ids (.json/.pt/.npy) or text.")
    ] = None,
    samples: Annotated[int, typer.Option(help="gptq: calibration samples.")] = 512,
    seq_len: Annotated[int, typer.Option("--seq-len", help="gptq: tokens per sample.")] = 2048,
    dampening: Annotated[float, typer.Option(help="gptq: fraction of mean(diag H) added to H.")] = 0.01,
    act_order: Annotated[
        bool, typer.Option("--act-order", help="gptq: columns by decreasing activation.")
    ] = False,
    all_experts: Annotated[
        bool, typer.Option("--all-experts", help="gptq: every token calibrates every expert.")
    ] = False,
    spill_states: Annotated[
        bool | None,
        typer.Option(
            "--spill-states/--no-spill-states",
            help="gptq: keep the calibration states in a file of the staging folder, a chunk in memory "
            "(default: when in + out exceed 2 GiB). Same bytes either way.",
        ),
    ] = None,
) -> None:
    """Convert a checkpoint layer by layer in bounded memory; a re-run resumes an interrupted one."""
    from moeport.cli.convert import RunFlags, run_convert
    from moeport.recipes import Options
    from moeport.recipes.base import OPTION_FLAGS

    given = {
        f
        for f in OPTION_FLAGS
        if (source := ctx.get_parameter_source(_OPTION_PARAMS.get(f, f))) is not None
        and source.name not in ("DEFAULT", "DEFAULT_MAP")
    }
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    if shard_bytes < MIN_SHARD_BYTES:
        raise MoeportError(
            f"--max-shard-size {max_shard_size}: below the {format_size(MIN_SHARD_BYTES)} floor "
            "(shards are usually 1GB to 10GB)"
        )
    if group_size < 0:
        raise MoeportError(f"--group-size {group_size}: expected a positive size, or 0 for per channel")
    options = Options(
        layout=layout,
        dtype=dtype,
        max_shard_bytes=shard_bytes,
        group_size=group_size or None,
        targets=targets,
        ignore=tuple(ignore or ()),
        numa=numa,
        kt_layout=kt_layout,
        flavor=flavor,
        allow_nonfinite=allow_nonfinite,
        kt_any_cpu=kt_any_cpu,
        input_scales=input_scales,
        gguf_type=gguf_type,
        device=device,
        **dict(method=method, calibration=str(calibration or ""), samples=samples, seq_len=seq_len),
        **dict(dampening=dampening, act_order=act_order, all_experts=all_experts, spill_states=spill_states),
    )
    limit = None if max_memory is None else parse_size(max_memory, "--max-memory")
    if limit is not None and limit <= 0:
        raise MoeportError(f"--max-memory {max_memory}: expected a positive size")
    resolved = resolve_source(src)
    if resolved != src:  # a Hub repo id: the output names its source by it, not by a snapshot hash
        options = Options(**{**options.__dict__, "source_label": str(src)})
    flags = RunFlags(dry_run, overwrite, quiet, limit, as_json, verbose, threads)
    run_convert(resolved, dst, to, options, flags, out, given)


@app.command()
def verify(
    src: Annotated[Path, typer.Argument(help="The source checkpoint (or Hub repo id in the local cache).")],
    output: Annotated[
        Path, typer.Argument(help="The converted checkpoint (hf, fused, ct, FP8 or kt merged).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full JSON report.")] = False,
    plot_file: Annotated[
        Path | None, typer.Option("--plot", help="Write a per-layer error chart (PNG).")
    ] = None,
    lossless: Annotated[
        bool | None,
        typer.Option(
            "--lossless/--lossy", help="Expect bit-exact tensors (default: from the output's recipe)."
        ),
    ] = None,
    max_rel_error: Annotated[float, typer.Option(help="Flag tensors above this relative L2 error.")] = 0.25,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print the verdict line only; no progress.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Print every tensor's errors; lists uncapped.")
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option("--max-memory", help="Refuse to start if the memory verify would hold exceeds this."),
    ] = None,
) -> None:
    """Check a conversion against its source, tensor by tensor; exit code 1 when it fails."""
    from moeport.cli.verify import run_verify

    source = resolve_source(src)
    limit = None if max_memory is None else parse_size(max_memory, "--max-memory")
    run_verify(source, output, as_json, plot_file, lossless, max_rel_error, out, quiet, verbose, limit)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the example checkpoint.")] = Path(
        "demo-out"
    ),
) -> None:
    """Write a tiny built-in DeepSeek-V3-style checkpoint, convert it to every target, verify each."""
    from moeport.cli.convert import RunFlags, run_convert
    from moeport.detect import detect
    from moeport.recipes import TARGETS, Options
    from moeport.sources import open_checkpoint
    from moeport.synthetic import SyntheticSpec, write_synthetic
    from moeport.verify.run import verify as verify_outputs

    src = out_dir / "deepseek-v3-tiny"
    write_synthetic(src, SyntheticSpec.tiny())
    out.print(f"wrote built-in example to {src}", markup=False)
    inspect(src, as_json=False)
    with open_checkpoint(src) as ck:
        det = detect(ck)
    for to, target in TARGETS.items():  # every registered target, with its default options (hf: fused)
        options = Options(layout="fused" if to == "hf" else "hub", device="auto")
        name = "fused-bf16" if to == "hf" else to
        if not target.fits(det):
            out.print(f"{name:>17}: not for {det.family.title} (its consumer reads another family's names)")
            continue
        dst = out_dir / f"deepseek-v3-tiny-{name}"
        run_convert(src, dst, to, options, RunFlags(overwrite=True, quiet=True), out)
        report = verify_outputs(src, dst)
        worst = max((t.rel_l2 for t in report.tensors), default=0.0)
        exact = sum(t.exact for t in report.tensors)
        verdict = "[green]verified[/]" if report.ok else "[red]FAILED verification[/]"
        out.print(
            f"{name:>17}: {escape(str(dst))}  {verdict}: {len(report.tensors)} tensors, {exact} bit-exact, "
            f"max relative error {worst:.3g}"
        )


def _version() -> str:
    """The installed distribution's version (what pip reports), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moeport")
    except PackageNotFoundError:
        from moeport import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        out.print(f"moeport {_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Convert Mixture-of-Experts checkpoints between layouts and quantization formats."""


def main() -> None:
    """Entry point. typer's standalone mode prints usage errors as its short usage message (exit 2)
    and help for a bare `moeport`; our own user errors become one line, exit 2."""
    try:
        app(prog_name="moeport")
    except MoeportError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
