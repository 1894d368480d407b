"""Read source tensors ahead, in plan order, on background threads, within a byte budget.

Disk reads (pread releases the GIL) then overlap with decode/quantize on the CPU or the GPU.
The budget bounds what is read but not yet used, so memory stays one layer + budget (a tensor
bigger than the budget is never read ahead).
A tensor asked for before the reader got to it is read directly (never a wait on the budget).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

from moeport.sources.checkpoint import Checkpoint

DEFAULT_BUDGET = 64 * 2**20  # bytes read ahead; a fixed overhead, whatever the model size


READERS = 2  # threads reading at once: one pread stream does not reach the page cache's speed


class Prefetcher:
    def __init__(
        self, ck: Checkpoint, names: Iterable[str], budget: int = DEFAULT_BUDGET, readers: int = READERS
    ):
        self.ck = ck
        self._names = list(dict.fromkeys(names))
        self._next = 0  # index in _names of the next tensor to read ahead
        self._budget = budget
        self._ready: dict[str, torch.Tensor] = {}
        self._reading: set[str] = set()  # being read ahead right now
        self._taken: set[str] = set()  # asked for before a reader got there
        self._held = 0  # bytes ready or being read (reserved before the read)
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, name=f"moeport-prefetch-{i}", daemon=True)
            for i in range(readers)
        ]
        for t in self._threads:
            t.start()

    def _claim(self) -> tuple[str, int] | None:
        """Under the lock: the next tensor to read ahead, its room reserved (None: nothing left)."""
        while True:
            if self._stop or self._next >= len(self._names):
                return None
            name = self._names[self._next]
            size = self.ck.info(name).nbytes
            if size > self._budget or name in self._taken:
                self._next += 1  # too big to hold early (the consumer reads it), or already read
                continue
            if self._held + size <= self._budget:
                self._next += 1
                self._held += size
                self._reading.add(name)
                return name, size
            self._cv.wait()

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    claim = self._claim()
                if claim is None:
                    return
                name, size = claim
                try:
                    t = self.ck.read(name)
                except BaseException:
                    with self._cv:
                        self._reading.discard(name)
                        self._held -= size
                    raise
                with self._cv:  # ready before it stops being "in flight": a waiting get finds it
                    self._reading.discard(name)
                    if self._stop:
                        self._held -= size
                    else:
                        self._ready[name] = t
                    self._cv.notify_all()
        except BaseException as exc:  # surfaced to the consumer on its next get
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def get(self, name: str) -> torch.Tensor:
        with self._cv:
            while True:
                if self._error is not None:
                    raise self._error
                t = self._ready.pop(name, None)
                if t is not None:
                    self._held -= self.ck.info(name).nbytes
                    self._cv.notify_all()
                    return t
                if name not in self._reading:
                    break
                self._cv.wait()  # a reader is on it: wait rather than read it twice
            self._taken.add(name)
        return self.ck.read(name)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._ready.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
