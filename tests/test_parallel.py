"""The CPU thread pool (moeport.parallel): outputs come back in plan order, nested fan-out cannot
deadlock, shared values are computed once, and a conversion writes the same bytes with any
number of threads."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from fixtures import shard_bytes
from test_batching import convert

from moeport.errors import MoeportError
from moeport.parallel import Workers, fan_out, once, working
from moeport.recipes.gpu import Recipe


def test_ordered_keeps_order_and_bounds_the_work_in_flight() -> None:
    rng = random.Random(0)
    delays = [rng.random() * 0.004 for _ in range(60)]
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def task(i: int):
        def run() -> int:
            with lock:
                running[0] += 1
                running[1] = max(running[1], running[0])
            time.sleep(delays[i])
            with lock:
                running[0] -= 1
            return i * i

        return run

    with working(Workers(3)) as workers:
        got = list(workers.ordered((i, task(i)) for i in range(60)))
    assert got == [(i, i * i) for i in range(60)]
    assert 1 < running[1] <= 3  # in parallel, never more than the threads


def test_an_error_surfaces_at_its_turn_and_later_tasks_stop() -> None:
    ran: list[int] = []

    def task(i: int):
        def run() -> int:
            ran.append(i)
            if i == 5:
                raise MoeportError("weight 5: bad")
            return i

        return run

    with working(Workers(2)) as workers:
        seen = []
        with pytest.raises(MoeportError, match="weight 5: bad"):
            for key, _ in workers.ordered((i, task(i)) for i in range(100)):
                seen.append(key)
    assert seen == [0, 1, 2, 3, 4]
    assert max(ran) < 5 + workers.window + 1  # nothing far past the error was started


def test_fan_out_inside_every_worker_finishes() -> None:
    """Each ordered task fans out more jobs than there are threads; the pool must not deadlock."""
    out = torch.zeros(8, 16)

    def task(row: int):
        def run() -> float:
            def cell(c: int) -> None:
                time.sleep(0.0005)
                out[row, c] = row * 100 + c

            fan_out([lambda c=c: cell(c) for c in range(16)])
            return float(out[row].sum())

        return run

    with working(Workers(2)) as workers:
        sums = dict(workers.ordered((r, task(r)) for r in range(8)))
    expected = torch.arange(8)[:, None] * 100 + torch.arange(16)[None, :]
    assert torch.equal(out, expected.float())
    assert sums == {r: float(expected[r].sum()) for r in range(8)}


def test_fan_out_reports_a_failing_job() -> None:
    done: list[int] = []

    def job(i: int):
        def run() -> None:
            if i == 3:
                raise MoeportError("expert 3: bad")
            done.append(i)

        return run

    with working(Workers(2)), pytest.raises(MoeportError, match="expert 3: bad"):
        fan_out([job(i) for i in range(6)])


def test_once_computes_once_under_contention() -> None:
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        time.sleep(0.01)
        return torch.randn(4, generator=torch.Generator().manual_seed(1))

    shared = once(compute)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(shared())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 6
    assert all(r is results[0] for r in results)


JOBS = [  # (model type, source layout, source format, recipe or (layout, dtype))
    ("qwen3_moe", "fused", "fp8-block", ("hub", "bf16")),  # a stacked source decoded per expert
    ("deepseek_v3", "hub", "fp8-block", ("fused", "bf16")),  # a stacked output filled per expert
    ("qwen3_moe", "hub", "fp8-block", Recipe("w4a16", group_size=32, targets="all-linear")),
    ("mixtral", "hub", "bf16", Recipe("w8a16", group_size=None)),
]


@pytest.mark.parametrize(("model_type", "layout", "fmt", "job"), JOBS)
def test_threads_write_the_same_bytes(checkpoint, tmp_path, model_type, layout, fmt, job) -> None:
    src = checkpoint(model_type, layout, fmt)
    convert(src, tmp_path / "one", job, None, threads=1)
    convert(src, tmp_path / "four", job, None, threads=4)
    one, four = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "four")
    assert one and one.keys() == four.keys()
    for name in one:
        assert one[name] == four[name], name


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeport", *args], capture_output=True, text=True)


def test_threads_must_be_positive(tmp_path, tiny) -> None:
    done = _cli("convert", str(tiny), str(tmp_path / "out"), "--threads", "0")
    assert done.returncode == 2 and "--threads" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_weight_decoded_in_row_jobs_on_the_pool_is_the_same() -> None:
    """FP8 decode cuts a weight into jobs of whole scale blocks of rows (verify's decodes use every
    core that way): the same floats as one call, for a stack and a ragged last block."""
    from moeport.codecs.fp8 import Fp8BlockCodec

    w = torch.randn(2, 2500, 384, generator=torch.Generator().manual_seed(21)) * 0.02
    fp8 = Fp8BlockCodec()
    parts = fp8.encode(w)
    alone = fp8.decode(parts)
    with working(Workers(3)):
        pooled = fp8.decode(parts)
    assert torch.equal(alone, pooled)
