"""Writes run in order on one background thread, so the disk works while the next tensors are
computed (pwrite and hashing release the GIL). At most `max_bytes` wait for it, which bounds the
memory this costs; an error surfaces at the next submit or at drain."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

WRITE_BEHIND_BYTES = 64 * 2**20  # like the read-ahead: a fixed overhead, whatever the model size


class WriteBehind:
    def __init__(self, max_bytes: int = WRITE_BEHIND_BYTES, name: str = "moeport-write"):
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[tuple[Future, int]] = deque()
        self._bytes = 0

    def submit(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` after every earlier submission; the data it writes must not change."""
        done = self._pool.submit(fn, *args)
        self._pending.append((done, nbytes))
        self._bytes += nbytes
        self._settle(self.max_bytes)
        return done

    def drain(self) -> None:
        """Wait for every write submitted so far; raise the first error."""
        self._settle(0)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown()

    def abort(self) -> None:
        """Drop writes not started, wait for the running one; errors are ignored (already failing)."""
        self._pool.shutdown(cancel_futures=True)
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - the error that made us abort is the one reported
            self._pending.clear()
            self._bytes = 0

    def _settle(self, keep_bytes: int) -> None:
        while self._pending and (self._bytes > keep_bytes or self._pending[0][0].done()):
            done, nbytes = self._pending.popleft()
            self._bytes -= nbytes
            if not done.cancelled():
                done.result()
