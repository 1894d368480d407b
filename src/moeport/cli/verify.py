"""`moeport verify`: print the verdict, the flagged tensors and a per-layer summary (or JSON).

Long lists are capped on the terminal (`--json` keeps them whole). A long run is not silent: on
stderr, a spinner names the layer being compared (a plain line per layer when not a terminal).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def run_verify(
    src: Path,
    output: Path,
    as_json: bool,
    plot_file: Path | None,
    lossless: bool | None,
    max_rel_error: float,
    console: Console,
    quiet: bool = False,
    verbose: bool = False,
    max_memory: int | None = None,
) -> None:
    from moeport.verify.run import verify

    if plot_file is not None:  # before the comparison, which can take minutes
        from moeport.verify.plot import require_matplotlib

        require_matplotlib()
    log = Console(stderr=True, quiet=quiet)
    status = log.status("verifying: reading headers")
    start = time.monotonic()

    def on_layer(layer: int | None) -> None:
        where = "tensors outside the layers" if layer is None else f"layer {layer}"
        line = f"verifying: {where} ({time.monotonic() - start:.0f} s)"
        if log.is_terminal:
            status.update(line)
        else:  # a log (nohup, CI): one plain line per layer, as it starts
            log.print(line, highlight=False, markup=False)

    with status:
        report = verify(src, output, lossless, max_rel_error, on_layer=on_layer, max_memory=max_memory)
    if plot_file is not None:
        from moeport.verify.plot import plot

        plot(report, plot_file)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    elif quiet:
        _verdict(console, report)
    else:
        _print(console, report, verbose)
    if not report.ok:
        raise typer.Exit(1)


def _print(console: Console, report, verbose: bool = False) -> None:
    if verbose:  # every tensor, then the summary
        for r in report.tensors:
            exact = "bit-exact" if r.exact else f"rel L2 {r.rel_l2:.3g}, max abs {r.max_abs:.3g}"
            line = f"{r.name}: {exact}, cosine {r.cosine:.6f}"
            console.print(escape(line), highlight=False, soft_wrap=True)
    t = Table(title="per layer", title_justify="left")
    for col in ("layer", "tensors", "max rel L2", "min cosine", "flagged"):
        t.add_column(col, justify="right")
    for layer, s in report.per_layer().items():
        t.add_row(
            layer, str(s["tensors"]), f"{s['max_rel_l2']:.3g}", f"{s['min_cosine']:.6f}", str(s["flagged"])
        )
    console.print(t)
    flagged = report.flagged
    cap = len(flagged) if verbose else CAP
    for r in flagged[:cap]:
        console.print(
            f"[red]flagged[/] {escape(r.name)}: {escape(r.problem)}", highlight=False, soft_wrap=True
        )
    if len(flagged) > cap:
        console.print(
            f"[red]flagged[/] ... and {len(flagged) - cap} more (--json or --verbose lists them all)"
        )
    _names(console, "[red]missing[/]", report.missing, verbose)
    _names(console, "[yellow]extra[/]", report.extra, verbose)
    from moeport.sizes import format_size

    console.print(
        f"memory: at most {format_size(report.memory_bound)} beyond the interpreter (one tensor of "
        "each side in float32, compared in chunks)",
        highlight=False,
        soft_wrap=True,
    )
    _verdict(console, report)


CAP = 20  # flagged tensors listed one per line on the terminal


def _names(console: Console, label: str, names: list[str], verbose: bool = False) -> None:
    """A few names one per line; many as one line (a different model lists thousands)."""
    if len(names) <= 5 or verbose:
        for name in names:
            console.print(f"{label} {escape(name)}", highlight=False, soft_wrap=True)
        return
    examples = ", ".join(names[:3])
    console.print(
        f"{label} {len(names)} tensors, e.g. {escape(examples)} (--json or --verbose lists them all)",
        highlight=False,
        soft_wrap=True,
    )


def _verdict(console: Console, report) -> None:
    mode = "lossless (bit-exact expected)" if report.lossless else "lossy"
    exact = sum(t.exact for t in report.tensors)
    verdict = "[green]OK[/]" if report.ok else "[red]FAIL[/]"
    console.print(f"{verdict}: {len(report.tensors)} tensors compared ({exact} bit-exact), {mode}")
