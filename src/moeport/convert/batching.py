"""Batching same-shape weights for the GPU: one transfer and one kernel sequence per batch.

An expert matrix is small (1-30 MB), so on a GPU the per-call costs (a host-to-device copy, a
dozen kernel launches, a synchronous device-to-host copy) outweigh the math. While a `Batcher` is
active, `Decode` and `Encode` do not compute when realised one by one: they submit a job under a
key (codec, shapes), and the first realisation of a job runs it together with every later
pending job of the same key, up to `max_elements`: inputs stacked, one copy to the device, one
decode or encode over [B, N, K], one copy back per output part.

The plan, and so the output bytes and their order, are the same with or without batching; only
when the math runs changes. A batch holds at most `max_elements` of float32 on the device and
its results on the host until they are written; up to `host_threads` batches run at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_ELEMENTS = 64 * 2**20  # 256 MB as float32 per batch on the device
# Host threads of the GPU path: while one stacks a batch's inputs into pinned memory or waits for
# its results, another's batch runs on the device (bench/RESULTS.md, "Real-sized experts").
DEFAULT_HOST_THREADS = 2

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
    seq: int
    result: Any = None
    error: BaseException | None = None
    done: bool = False
    running: threading.Event | None = None  # set when the batch that holds this job has run


@dataclass
class Batcher:
    """Jobs are submitted in plan order by one thread and may be asked for by several (the host
    threads of the GPU path): the first to ask for a job runs its batch, the others asking for a
    job of that batch wait for it."""

    device: str
    max_elements: int = DEFAULT_MAX_ELEMENTS
    host_threads: int = DEFAULT_HOST_THREADS  # threads that prepare, run and collect batches
    _pending: dict[Hashable, list[_Job]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: int = 0  # jobs submitted so far (their sequence numbers are below this)
    jobs_run: int = 0  # jobs computed, in
    batches_run: int = 0  # this many batches

    def submit(self, key: Hashable, payload: Any, elements: int, run: RunBatch) -> Callable[[], Any]:
        """Queue one job; returns a callable giving its result (running its batch when needed).

        `run` gets the payloads of a batch, in submission order, and returns their results."""
        with self._lock:
            job = _Job((key, elements), payload, elements, run, self.submitted)
            self.submitted += 1
            self._pending.setdefault(job.key, []).append(job)

        def result() -> Any:
            if not job.done:
                self._run_from(job)
            if job.error is not None:
                raise job.error
            return job.result

        return result

    def _run_from(self, job: _Job) -> None:
        with self._lock:
            running = job.running
            if running is None:  # not started: this thread runs its batch
                queue = self._pending[job.key]
                start = queue.index(job)
                batch = queue[start : start + items_per_batch(job.elements, self.max_elements)]
                del queue[start : start + len(batch)]
                job.running = threading.Event()
                for j in batch:
                    j.running = job.running
        if running is not None:
            running.wait()
            return
        try:
            results = job.run([j.payload for j in batch])
        except BaseException as exc:  # every job of the batch reports it, in whichever thread asks
            for j in batch:
                j.error, j.done = exc, True
            raise
        else:
            for j, r in zip(batch, results, strict=True):
                j.result, j.done = r, True
            with self._lock:
                self.jobs_run += len(batch)
                self.batches_run += 1
        finally:
            job.running.set()  # type: ignore[union-attr]

    def clear(self, before: int | None = None) -> None:
        """Forget unrun jobs (their values were never asked for) submitted before job number
        `before` (default: all)."""
        with self._lock:
            for key, queue in list(self._pending.items()):
                queue[:] = [j for j in queue if before is not None and j.seq >= before]
                if not queue:
                    del self._pending[key]


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
