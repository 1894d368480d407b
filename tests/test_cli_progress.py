"""Progress as a log shows it (not a terminal): one plain line per finished layer; `--json`: a
machine-readable summary on stdout, progress kept off it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

LINE = re.compile(
    r"(layer \d+|other tensors): (\d+)% \([\d.]+ [KMG]?B of 7\.1 MB\), [\d.]+ [KMG]?B/s(, \d+ s left)?"
)


def moeport(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moeport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_log_gets_one_line_per_layer(tiny, tmp_path) -> None:
    result = moeport("convert", str(tiny), str(tmp_path / "out"), "--to", "fp8", "--device=cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    progress = [m for line in lines if (m := LINE.fullmatch(line))]
    assert [m[1] for m in progress] == ["other tensors", "layer 0", "layer 1", "layer 2", "layer 3"]
    percents = [int(m[2]) for m in progress]
    assert percents == sorted(percents) and percents[-1] == 100 and progress[-1][3] is None
    assert lines[len(progress)].startswith("wrote 201 tensors (")


def test_json_summary(tiny, tmp_path) -> None:
    out = tmp_path / "out"
    result = moeport("convert", str(tiny), str(out), "--to", "fp8", "--device=cpu", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["tensors"] == 201 and not summary["already_complete"]
    assert summary["bytes_in"] == 7095648 and summary["bytes_written"] > 0 and summary["seconds"] > 0
    assert all(LINE.fullmatch(line) for line in result.stderr.splitlines())
    again = json.loads(
        moeport("convert", str(tiny), str(out), "--to", "fp8", "--device=cpu", "--json").stdout
    )
    assert again["already_complete"]
    plan = json.loads(
        moeport("convert", str(tiny), str(tmp_path / "x"), "--to", "fp8", "--json", "--dry-run").stdout
    )
    assert plan["dry_run"] and plan["tensors"] == 201 and plan["bytes_in"] == 7095648
    assert not (tmp_path / "x").exists()


def _frame(buf) -> str:
    return buf.getvalue().rsplit("\r", 1)[-1]


def test_terminal_bar_shows_no_rate_until_it_means_something(monkeypatch) -> None:
    import io
    import time

    from rich.console import Console

    from moeport.cli import progress as P

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=150, color_system=None)
    with P.ConversionProgress(console, 10**9) as bar:
        bar("resuming", 6 * 10**8)  # an earlier run's bytes come off the total, not counted as done
        bar("layer 3", 10**8)
        bar.bar.refresh()
        first = _frame(buf)
        monkeypatch.setattr(P, "STEADY_AFTER_S", 0.05)
        time.sleep(0.1)
        bar("layer 4", 10**8)
        bar.bar.refresh()
        later = _frame(buf)
    assert "25% 100.0/400.0 MB ? -:--:--" in first, first
    assert re.search(r"50% 200\.0/400\.0 MB [\d.]+ [KMG]?B/s \d+:\d\d:\d\d", later), later


def test_verbose_prints_the_plan_then_converts(tiny, tmp_path) -> None:
    out = tmp_path / "out"
    result = moeport("convert", str(tiny), str(out), "--to", "fp8", "--device=cpu", "--verbose")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"plan: {tiny}")
    plan_end = next(i for i, line in enumerate(lines) if line.startswith("201 tensors, "))
    wrote = next(i for i, line in enumerate(lines) if line.startswith("wrote 201 tensors ("))
    assert plan_end < wrote and (out / "model.safetensors").exists()
