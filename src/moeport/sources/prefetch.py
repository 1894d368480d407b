"""Read source tensors ahead, in plan order, on a background thread, within a byte budget.

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


class Prefetcher:
    def __init__(self, ck: Checkpoint, names: Iterable[str], budget: int = DEFAULT_BUDGET):
        self.ck = ck
        self._names = list(dict.fromkeys(names))
        self._budget = budget
        self._ready: dict[str, torch.Tensor] = {}
        self._taken: set[str] = set()  # asked for before the reader got there
        self._held = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="moeport-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for name in self._names:
                size = self.ck.info(name).nbytes
                if size > self._budget:
                    continue  # never hold a whole big tensor early: the consumer reads it itself
                with self._cv:
                    self._cv.wait_for(lambda size=size: self._room_for(size))
                    if self._stop:
                        return
                    if name in self._taken:
                        continue
                t = self.ck.read(name)
                with self._cv:
                    if name in self._taken:
                        continue
                    self._ready[name] = t
                    self._held += size
                    self._cv.notify_all()
        except BaseException as exc:  # surfaced to the consumer on its next get
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _room_for(self, size: int) -> bool:
        return self._stop or self._held + size <= self._budget

    def get(self, name: str) -> torch.Tensor:
        with self._cv:
            if self._error is not None:
                raise self._error
            t = self._ready.pop(name, None)
            if t is not None:
                self._held -= self.ck.info(name).nbytes
                self._cv.notify_all()
                return t
            self._taken.add(name)
        return self.ck.read(name)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._ready.clear()
            self._cv.notify_all()
        self._thread.join()
