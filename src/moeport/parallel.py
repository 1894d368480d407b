"""CPU parallelism: the plan's outputs are computed on a pool of threads and written in plan order.

Why threads and not processes: the work happens in kernels that release the GIL (numba `nogil`
kernels, torch ops, pread, hashing), so threads share one copy of the plan, the read-ahead and the
writer, and each output is computed exactly as on one thread (same bytes, whatever the count).
The kernels themselves are single-threaded: the parallelism is across outputs (experts), which
is coarse enough (one expert matrix is 10-60 ms of math) that the Python between them is noise.

A task is one unit of the plan (an expert's ops, say), so the outputs sharing a decode or an encode
are computed by one thread. Memory bound: at most `threads + 2` units are in flight or finished and
waiting for their turn to be written, and (convert.execute) their outputs hold at most
max(one unit's outputs, threads x 128 MiB); each worker adds its temporaries (about one expert in
float32).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

K = TypeVar("K")
T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Workers:
    """A pool of `threads` compute threads (1: everything runs inline, in the caller's thread)."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="moeport-compute")
            if self.threads > 1
            else None
        )

    @property
    def window(self) -> int:
        """Tasks in flight at once: one per thread, and two more finished ones waiting for their
        turn, so a worker finds work while the oldest is written (tasks vary a little)."""
        return self.threads + 2

    def ordered(
        self,
        tasks: Iterable[tuple[K, Callable[[], T]]],
        cost: Callable[[K], int] | None = None,
        budget: int = 0,
    ) -> Iterator[tuple[K, T]]:
        """Yield (key, fn()) in the order of `tasks`, computing up to `window` ahead in parallel.

        With `cost` (bytes a task's result holds), tasks are also held back while the results in
        flight would exceed `budget` (one task is always let through, whatever its size).
        An error is raised at its task's turn; the tasks after it are cancelled or awaited."""
        if self._pool is None:
            for key, fn in tasks:
                yield key, fn()
            return
        pending: deque[tuple[K, Future, int]] = deque()
        held = 0
        try:
            for key, fn in tasks:
                size = cost(key) if cost is not None else 0
                while pending and (
                    len(pending) >= self.window or (cost is not None and held + size > budget)
                ):
                    head_key, head, head_size = pending.popleft()
                    held -= head_size
                    yield head_key, head.result()
                pending.append((key, self._submit(fn), size))
                held += size
            while pending:
                head_key, head, _ = pending.popleft()
                yield head_key, head.result()
        finally:
            for _, f, _ in pending:
                f.cancel()
            for _, f, _ in pending:
                if not f.cancelled():
                    with contextlib.suppress(BaseException):
                        f.result()

    def fan_out(self, jobs: list[Callable[[], None]]) -> None:
        """Run independent jobs (the experts of one stacked output) on the pool and wait for all.

        Safe from inside a worker: every job not yet started is taken back and run in the caller's
        thread, so the caller only ever waits on jobs another thread is already running."""
        if self._pool is None or len(jobs) < 2 or _inside_fan_out.get():
            for job in jobs:
                job()
            return
        futures = [self._submit(_nested(job)) for job in jobs[1:]]
        error: BaseException | None = None
        try:
            _nested(jobs[0])()
        except BaseException as exc:  # noqa: BLE001 - re-raised once the others are settled
            error = exc
        for f in futures:
            if f.cancel():
                if error is None:
                    try:
                        _nested_job(f)()
                    except BaseException as exc:  # noqa: BLE001
                        error = exc
                continue
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001
                error = error or exc
        if error is not None:
            raise error

    def _submit(self, fn: Callable[[], T]) -> Future:
        assert self._pool is not None
        context = contextvars.copy_context()  # the active pool (and batcher) follow the task
        future = self._pool.submit(context.run, fn)
        future.moeport_job = fn  # type: ignore[attr-defined] # run inline when taken back
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


_inside_fan_out: contextvars.ContextVar[bool] = contextvars.ContextVar("moeport_fan_out", default=False)
_active: contextvars.ContextVar[Workers | None] = contextvars.ContextVar("moeport_workers", default=None)


def _nested(job: Callable[[], None]) -> Callable[[], None]:
    """A fan-out job runs its own nested work inline: one level of fan-out keeps waits acyclic."""

    def run() -> None:
        token = _inside_fan_out.set(True)
        try:
            job()
        finally:
            _inside_fan_out.reset(token)

    return run


def _nested_job(future: Future) -> Callable[[], None]:
    return future.moeport_job  # type: ignore[attr-defined]


def fan_out(jobs: list[Callable[[], None]]) -> None:
    """Run jobs on the active pool (inline when there is none)."""
    workers = _active.get()
    if workers is None:
        for job in jobs:
            job()
    else:
        workers.fan_out(jobs)


@contextlib.contextmanager
def working(workers: Workers) -> Iterator[Workers]:
    """Make `workers` the pool that `fan_out` uses, and shut it down afterwards."""
    token = _active.set(workers)
    try:
        yield workers
    finally:
        _active.reset(token)
        workers.close()


def once(fn: Callable[[], T]) -> Callable[[], T]:
    """`fn` computed at most once, even when several threads ask at the same time (the others
    wait for the first): an encode serves its weight and its scales, a decode its NUMA slices."""
    lock = threading.Lock()
    box: list[T] = []
    todo: list[Callable[[], T]] = [fn]  # dropped once computed, with what its closure holds

    def get() -> T:
        if not box:
            with lock:
                if not box:
                    box.append(todo.pop()())
        return box[0]

    return get
