"""The one progress display of every conversion, on a terminal or in a log.

On a terminal: a bar over source bytes with %, bytes done/total, rate and ETA (transient: the
summary line replaces it). Elsewhere (nohup, CI): one plain line per finished layer, so a log
shows the run advancing. Bytes an interrupted run already converted are taken off the total
instead of counted as done, so the first rate is not a fantasy.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from moeport.sizes import format_size

STEADY_AFTER_S = 2.0  # a rate from the first second is one layer's page-cache luck, not a rate


class SteadySpeedColumn(TransferSpeedColumn):
    """The transfer rate, shown once there is enough of the run behind it to mean something."""

    def render(self, task: Task) -> Text:
        if not task.completed or (task.elapsed or 0.0) < STEADY_AFTER_S:
            return Text("?", style="progress.data.speed")
        return super().render(task)


class ConversionProgress:
    def __init__(self, console: Console, total: int, quiet: bool = False):
        self.console, self.total, self.quiet = console, total, quiet
        self.done = 0
        self.current: str | None = None  # the layer being reported on, in a log
        self.start = time.monotonic()
        self.bar: Progress | None = None
        if not quiet and console.is_terminal:
            self.bar = Progress(
                TextColumn("[cyan]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                DownloadColumn(),
                SteadySpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task("starting", total=total)

    def __enter__(self) -> ConversionProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        if self.bar is not None:
            self.bar.stop()
        elif kind is None:
            self._print_line()

    def __call__(self, label: str, nbytes: int) -> None:
        """execute's on_progress: `label` finished, `nbytes` of source behind it."""
        if label in ("starting", "resuming"):  # bytes an earlier run converted: off the total
            self.total -= nbytes
            if self.bar is not None:
                self.bar.update(self.task, total=self.total, description=label)
            return
        if self.bar is not None:
            self.done += nbytes
            self.bar.update(self.task, advance=nbytes, description=label)
            return
        # in a log: one line per finished layer (execute reports every unit of it)
        if self.current is not None and label != self.current:
            self._print_line()
        self.current = label
        self.done += nbytes

    def _print_line(self) -> None:
        if not self.quiet and self.current is not None:
            self.console.print(self.line(self.current), highlight=False, markup=False, soft_wrap=True)

    def line(self, label: str) -> str:
        seconds = time.monotonic() - self.start
        rate = self.done / seconds if seconds > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = f", {left / rate:.0f} s left" if rate > 0 and left > 0 else ""
        return (
            f"{label}: {pct:.0f}% ({format_size(self.done)} of {format_size(self.total)}), "
            f"{format_size(int(rate))}/s{eta}"
        )
