"""The calibration hidden states at a layer boundary, [samples, seq_len, hidden] float32: held in
memory, or spilled to a file in the staging folder and read back a chunk of samples at a time.

Both are read and written in the same chunks of samples, so a layer sees the same inputs and the
output bytes do not depend on where the states live. The spill file is raw float32 in C order
(no header: its shape is the run's samples x seq_len x hidden, checked by its size), the same
format as the boundary files a resumed run starts from; a spilled layer's output file *is* its
boundary file. Read with pread and written with pwrite rather than memory-mapped: mapped pages
would stay resident (and count in the RSS) until the kernel wants them back, while pread keeps
the memory at one chunk in and one chunk out, which is the point of spilling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from moeport.errors import MoeportError

SUFFIX = ".f32"
ELEMENT = 4  # float32


class States:
    """The states at one layer boundary; `chunks` yields consecutive slices of samples."""

    shape: tuple[int, int, int]

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class InMemory(States):
    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for i in range(0, self.shape[0], size):
            yield self.tensor[i : i + size]


class OnDisk(States):
    def __init__(self, path: Path, shape: tuple[int, int, int], device: str):
        self.path, self.shape, self.device = path, shape, device

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        samples, row = self.shape[0], self.shape[1] * self.shape[2]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(0, samples, size):
                n = min(size, samples - i)
                buf = torch.empty(n, *self.shape[1:], dtype=torch.float32)
                _pread_into(fd, buf, i * row * ELEMENT, self.path)
                yield buf.to(self.device)
        finally:
            os.close(fd)


class StatesWriter:
    """Builds the next boundary's states chunk by chunk: into one preallocated tensor, or (spill)
    into `path` under a temporary name, renamed once whole and flushed."""

    def __init__(self, shape: tuple[int, int, int], device: str, path: Path | None = None):
        self.shape, self.device, self.path = shape, device, path
        self._row = shape[1] * shape[2] * ELEMENT
        if path is None:
            self._tensor = torch.empty(shape, dtype=torch.float32, device=device)
        else:
            path.parent.mkdir(exist_ok=True)
            self._tmp = path.with_suffix(".tmp")
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, start: int, chunk: torch.Tensor) -> None:
        if self.path is None:
            self._tensor[start : start + chunk.shape[0]] = chunk
        else:
            _pwrite_all(self._fd, chunk.detach().float().cpu().contiguous(), start * self._row)

    def finish(self) -> States:
        if self.path is None:
            return InMemory(self._tensor)
        os.fsync(self._fd)
        os.close(self._fd)
        self._tmp.replace(self.path)
        return OnDisk(self.path, self.shape, self.device)

    def abandon(self) -> None:
        """Close and remove an unfinished spill file (an error in the layer)."""
        if self.path is not None:
            os.close(self._fd)
            self._tmp.unlink(missing_ok=True)


def save(states: torch.Tensor, path: Path) -> None:
    """An in-memory boundary to `path`, atomically (temporary name, flush, rename)."""
    writer = StatesWriter(tuple(states.shape), "cpu", path)
    writer.write(0, states)
    writer.finish()


def load(path: Path, shape: tuple[int, int, int], device: str, spill: bool) -> States | None:
    """The boundary file `path` as states (left on disk when spilling); None when its size is not
    the run's (a boundary of another run: not used)."""
    expected = shape[0] * shape[1] * shape[2] * ELEMENT
    if not path.is_file() or path.stat().st_size != expected:
        return None
    if spill:
        return OnDisk(path, shape, device)
    buf = torch.empty(shape, dtype=torch.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        _pread_into(fd, buf, 0, path)
    finally:
        os.close(fd)
    return InMemory(buf.to(device))


def _pread_into(fd: int, buf: torch.Tensor, offset: int, path: Path) -> None:
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise MoeportError(f"{path}: calibration states file ended early (expected {len(view)} bytes)")
        done += n


def _pwrite_all(fd: int, t: torch.Tensor, offset: int) -> None:
    view = memoryview(t.numpy()).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
