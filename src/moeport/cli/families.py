"""`moeport inspect --families`: every MoE model type of the installed transformers, how it is supported."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeport.zoo.support import all_support


def print_families(out: Console, as_json: bool) -> None:
    """One row per MoE model type: zoo, derived, or not (and why)."""
    rows = all_support()
    if as_json:
        listed = [{"model_type": r.model_type, "support": r.how, "detail": r.why} for r in rows]
        print(json.dumps(listed, indent=2))
        return
    t = Table(title="MoE model types of the installed transformers", title_justify="left")
    for col in ("model_type", "support", "family / why not"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.model_type, r.how, escape(r.why))
    out.print(t)
    counts = {h: sum(r.how == h for r in rows) for h in ("zoo", "derived", "not")}
    out.print(", ".join(f"{n} {h}" for h, n in counts.items()))
    out.print(
        "a model_type transformers does not know: its experts under a per-expert name of Qwen3-MoE "
        "or Mixtral give a generic family (hub/linear layouts, RTN targets, kt)"
    )


def missing_path(ctx: typer.Context) -> None:
    """What typer says of a missing argument (the path is optional only for --families; a click
    error raised in the command itself would escape typer's formatting)."""
    import click
    from typer import rich_utils

    rich_utils.rich_format_error(click.UsageError("Missing argument 'path'.", ctx=ctx))
    raise typer.Exit(2)
