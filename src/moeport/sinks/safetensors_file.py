"""Stream one safetensors file whose tensor list is known before the data.

Why by hand: the `safetensors` package only serialises whole dicts held in memory. Because every
tensor's byte size follows from (dtype, shape), we can write the header first and then put each
tensor's bytes at its offset as it arrives, in any order: peak memory is one tensor, not one file.
The file lives under a temporary name until every tensor is written, then is renamed.
"""

from __future__ import annotations

import ctypes
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from moeport.dtypes import nbytes_of, safetensors_name_of
from moeport.errors import OutputWriteError

PARTIAL_SUFFIX = ".partial"
CHECKSUM = "xxh3_128"  # the journal field holding a piece's checksum


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, safetensors_name_of(tensor.dtype), tuple(tensor.shape))


def build_header(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix + JSON padded to 8) and each tensor's offset in the data buffer."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, int] = {}
    cursor = 0
    for spec in specs:
        if spec.name in offsets:
            raise ValueError(f"duplicate tensor name '{spec.name}'")
        offsets[spec.name] = cursor
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [cursor, cursor + spec.nbytes],
        }
        cursor += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data buffer starts 8-aligned, like the reference writer
    return len(raw).to_bytes(8, "little") + raw, offsets


def _sync_file_range() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # not Linux: the final fsync does all the flushing
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, do not wait for it
WRITEBACK_EVERY = 32 * 2**20  # bytes written between two writeback starts


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to start writing a file's dirty pages in [offset, offset + nbytes) (0: to
    the end) now, without waiting for them.

    Why: Linux starts writeback only past a share of RAM (often gigabytes) or after 30 s, so
    without this a conversion fills the page cache at memory speed and the disk idles until the
    final fsync; the run then takes compute + flush time instead of the larger of the two. os has
    no sync_file_range, hence ctypes; errors are left to the fsync that publishes the file."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class PartialFile:
    """A file written under `name.partial`: `publish()` fsyncs and renames it into place,
    `abort()` removes it, so nothing half-written ever carries the final name. Writeback to the
    disk starts every WRITEBACK_EVERY bytes, so the disk works while later tensors are computed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self._unflushed = 0  # bytes written since the last writeback started,
        self._dirty = (0, 0)  # within this range of offsets
        try:
            self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise OutputWriteError(f"{self.partial}: cannot create ({exc.strerror})") from None

    def pwrite_all(self, buf: memoryview, offset: int) -> None:
        """Write `buf` at `offset` in chunks of WRITEBACK_EVERY, starting each chunk's writeback
        once it is in the page cache: the disk writes one chunk while the next is copied."""
        buf = buf.cast("B")
        while len(buf):
            chunk = buf[:WRITEBACK_EVERY]
            start = offset
            while len(chunk):
                try:
                    n = os.pwrite(self._fd, chunk, offset)
                except OSError as exc:
                    raise OutputWriteError(f"{self.partial}: write failed ({exc.strerror})") from None
                chunk, offset = chunk[n:], offset + n
            buf = buf[offset - start :]
            lo, hi = self._dirty if self._unflushed else (start, offset)
            self._dirty = (min(lo, start), max(hi, offset))
            self._unflushed += offset - start
            if self._unflushed >= WRITEBACK_EVERY:
                start_writeback(self._fd, self._dirty[0], self._dirty[1] - self._dirty[0])
                self._unflushed = 0

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def publish(self, fsync: bool = True) -> None:
        try:
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise OutputWriteError(f"{self.partial}: cannot flush ({exc.strerror})") from None
        os.close(self._fd)
        self._fd = -1
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.partial.unlink(missing_ok=True)


class SafetensorsFileWriter:
    """Writes the tensors of `specs` into `path` in any order; `close()` publishes the file and
    returns its size and checksum (the journal's record of it). Tensors written in planned order,
    as conversions write them, are hashed as they go; otherwise the file is re-read at close."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = {s.name: s for s in specs}
        header, offsets = build_header(specs, metadata or {})
        self._data_start = len(header)
        self._offsets = offsets
        self._pending = set(self._specs)  # not yet on disk
        self._unaccepted = set(self._specs)  # not yet handed to write (a write may run on a thread)
        total = self._data_start + sum(s.nbytes for s in specs)
        self.size = total
        self._hash = new_checksum()
        self._hash.update(header)
        self._hashed_to = len(header)  # bytes hashed in order so far; -1 once out of order
        # the hash runs beside the next pwrite (both release the GIL), in order, on its own thread
        self._hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeport-hash")
        self._hashed: Future | None = None
        self._file = PartialFile(self.path)
        try:
            self._file.pwrite_all(memoryview(header), 0)
            self._file.truncate(total)
        except BaseException:
            self.abort()
            raise

    @property
    def done(self) -> bool:
        return not self._pending

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        """Claim `name` for this tensor, refusing one this file does not plan (name, dtype, shape)
        or already has; `write` then puts the bytes on disk (possibly from another thread)."""
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"{self.path.name}: tensor '{name}' is not planned for this file")
        if name not in self._unaccepted:
            raise ValueError(f"{self.path.name}: tensor '{name}' written twice")
        got = TensorSpec.of(name, tensor)
        if got != spec:
            raise ValueError(
                f"{self.path.name}: tensor '{name}' is {got.dtype}{list(got.shape)}, "
                f"planned {spec.dtype}{list(spec.shape)}"
            )
        self._unaccepted.discard(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._unaccepted or name not in self._pending:
            self.accept(name, tensor)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            raw = memoryview(data.view(torch.uint8).numpy())
            offset = self._data_start + self._offsets[name]
            if offset == self._hashed_to:
                self._hashed = self._hashing.submit(self._hash.update, raw)
                self._hashed_to += len(raw)
            else:
                self._hashed_to = -1
            self._file.pwrite_all(raw, offset)
            if self._hashed is not None:  # bounded: one tensor's hash in flight, the disk is slower
                self._hashed.result()
        self._pending.discard(name)

    def close(self) -> dict[str, object]:
        """Flush, fsync and rename into place; refuses while tensors are missing."""
        if self._pending:
            missing = sorted(self._pending)[:3]
            raise ValueError(
                f"{self.path.name}: {len(self._pending)} planned tensors not written, e.g. {missing}"
            )
        self._hashing.shutdown()
        in_order = self._hashed_to == self.size
        digest = self._hash.hexdigest() if in_order else file_checksum(self._file.partial)
        self._file.publish()
        return {"size": self.size, CHECKSUM: digest}

    def abort(self) -> None:
        """Remove the partial file; nothing half-written is left under the final name."""
        self._hashing.shutdown(cancel_futures=True)
        self._file.abort()


def new_checksum():
    """The checksum of output pieces: xxh3-128, which detects any change a resumed run must not
    keep (a flipped bit, a truncated or rewritten file) at ~15x the speed of sha256, so hashing
    every byte written costs almost nothing next to writing it."""
    return xxhash.xxh3_128()


def file_checksum(path: Path) -> str:
    """Checksum of a file, read in 16 MiB blocks (checking what a resumed run keeps)."""
    h = new_checksum()
    with open(path, "rb") as fh:
        while block := fh.read(16 * 2**20):
            h.update(block)
    return h.hexdigest()
