"""`moeport verify`: print the verdict, the flagged tensors and a per-layer summary (or JSON)."""

from __future__ import annotations

import json
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
) -> None:
    from moeport.verify.run import verify

    if plot_file is not None:  # before the comparison, which can take minutes
        from moeport.verify.plot import require_matplotlib

        require_matplotlib()
    report = verify(src, output, lossless, max_rel_error)
    if plot_file is not None:
        from moeport.verify.plot import plot

        plot(report, plot_file)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print(console, report)
    if not report.ok:
        raise typer.Exit(1)


def _print(console: Console, report) -> None:
    t = Table(title="per layer", title_justify="left")
    for col in ("layer", "tensors", "max rel L2", "min cosine", "flagged"):
        t.add_column(col, justify="right")
    for layer, s in report.per_layer().items():
        t.add_row(
            layer, str(s["tensors"]), f"{s['max_rel_l2']:.3g}", f"{s['min_cosine']:.6f}", str(s["flagged"])
        )
    console.print(t)
    for r in report.flagged:
        console.print(f"[red]flagged[/] {escape(r.name)}: {escape(r.problem)}", highlight=False)
    for name in report.missing:
        console.print(f"[red]missing[/] {escape(name)}", highlight=False)
    for name in report.extra:
        console.print(f"[yellow]extra[/] {escape(name)}", highlight=False)
    mode = "lossless (bit-exact expected)" if report.lossless else "lossy"
    exact = sum(t.exact for t in report.tensors)
    verdict = "[green]OK[/]" if report.ok else "[red]FAIL[/]"
    console.print(f"{verdict}: {len(report.tensors)} tensors compared ({exact} bit-exact), {mode}")
