"""The one progress display of every conversion: a bar over source bytes, with GB/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def conversion_progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("[cyan]{task.description}"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )
