"""Batching same-shape weights for the GPU: one transfer and one kernel sequence per batch.

An expert matrix is small (1-30 MB), so on a GPU the per-call costs (a host-to-device copy, a
dozen kernel launches, a synchronous device-to-host copy) outweigh the math. While a `Batcher` is
active, `Decode` and `Encode` do not compute when realised one by one: they submit a job under a
key (codec, shapes), and the first realisation of a job runs it together with every later
pending job of the same key, up to `max_elements`: inputs stacked, one copy to the device, one
decode or encode over [B, N, K], one copy back per output part.

The plan, and so the output bytes and their order, are the same with or without batching; only
when the math runs changes. A batch holds at most `max_elements` of float32 on the device and
its results on the host until they are written.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_ELEMENTS = 64 * 2**20  # 256 MB as float32 per batch on the device

RunBatch = Callable[[list[Any]], list[Any]]


def items_per_batch(elements: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> int:
    """How many items of `elements` each fit in one batch (at least one)."""
    return max(1, max_elements // max(elements, 1))


@dataclass
class _Job:
    key: Hashable
    payload: Any
    elements: int
    run: RunBatch
    result: Any = None
    done: bool = False


@dataclass
class Batcher:
    device: str
    max_elements: int = DEFAULT_MAX_ELEMENTS
    _pending: dict[Hashable, list[_Job]] = field(default_factory=dict)
    jobs_run: int = 0  # jobs computed, in
    batches_run: int = 0  # this many batches

    def submit(self, key: Hashable, payload: Any, elements: int, run: RunBatch) -> Callable[[], Any]:
        """Queue one job; returns a callable giving its result (running its batch when needed).

        `run` gets the payloads of a batch, in submission order, and returns their results."""
        job = _Job((key, elements), payload, elements, run)
        self._pending.setdefault(job.key, []).append(job)

        def result() -> Any:
            if not job.done:
                self._run_from(job)
            return job.result

        return result

    def _run_from(self, job: _Job) -> None:
        queue = self._pending[job.key]
        start = queue.index(job)
        batch = queue[start : start + items_per_batch(job.elements, self.max_elements)]
        del queue[start : start + len(batch)]
        results = job.run([j.payload for j in batch])
        self.jobs_run += len(batch)
        self.batches_run += 1
        for j, r in zip(batch, results, strict=True):
            j.result, j.done = r, True

    def clear(self) -> None:
        """Forget unrun jobs (their values were never asked for)."""
        self._pending.clear()


_active: contextvars.ContextVar[Batcher | None] = contextvars.ContextVar("moeport_batcher", default=None)


def active_batcher() -> Batcher | None:
    return _active.get()


@contextlib.contextmanager
def batching(batcher: Batcher | None) -> Iterator[Batcher | None]:
    token = _active.set(batcher)
    try:
        yield batcher
    finally:
        _active.reset(token)
