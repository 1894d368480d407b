"""Sharded safetensors output in the Hugging Face layout, streamed tensor by tensor.

The shard plan is fixed up front from the tensor specs (so each shard's header can be written
first); shards are published by rename as soon as all their tensors are in, and
`model.safetensors.index.json` is written last, so its presence means the output is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from moeport.sinks.safetensors_file import PARTIAL_SUFFIX, SafetensorsFileWriter, TensorSpec
from moeport.sinks.write_behind import WriteBehind

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group specs in order into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Streams planned tensors into shards; use as a context manager so failures leave no output."""

    def __init__(
        self,
        out_dir: str | Path,
        specs: Iterable[TensorSpec],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        always_index: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._metadata = {"format": "pt", **(metadata or {})}
        self._plan = plan_shards(specs, max_shard_bytes)
        self._names = shard_names(len(self._plan))
        self._write_index = always_index or len(self._plan) > 1
        self._shard_of = {s.name: i for i, shard in enumerate(self._plan) for s in shard}
        self._open: dict[int, SafetensorsFileWriter] = {}
        self._left = [len(shard) for shard in self._plan]  # tensors each shard still waits for
        self._closed: set[int] = set()
        self.total_size = sum(s.nbytes for shard in self._plan for s in shard)
        # Writes run on a background thread (sinks.write_behind). A finished shard is fsynced and
        # renamed on a second thread, overlapping the next shard's writes.
        # The index waits for all of them.
        self._io = WriteBehind()
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeport-shard-close")
        self._finishing: list[Future] = []

    @property
    def files(self) -> list[Path]:
        return [self.out_dir / n for n in self._names]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Hand one planned tensor over; it is written on a background thread, so the caller must
        not modify it afterwards. A wrong name, dtype or shape raises here."""
        try:
            index = self._shard_of[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' is not in the output plan") from None
        writer = self._open.get(index)
        if writer is None:
            if index in self._closed:
                raise ValueError(f"tensor '{name}' written twice")
            writer = SafetensorsFileWriter(
                self.out_dir / self._names[index], self._plan[index], self._metadata
            )
            self._open[index] = writer
        writer.accept(name, tensor)  # a wrong tensor fails here, in the caller, not later
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        written = self._io.submit(tensor.numel() * tensor.element_size(), writer.write, name, tensor)
        self._left[index] -= 1
        if not self._left[index]:
            del self._open[index]
            self._closed.add(index)
            self._finishing.append(self._finisher.submit(_close_after, written, writer))
        for f in [f for f in self._finishing if f.done()]:
            f.result()  # a failed flush surfaces at the next write
            self._finishing.remove(f)

    def drain(self) -> None:
        """Wait until every tensor handed over so far is on disk and every full shard published."""
        self._io.drain()
        self._wait_finishing()

    def close(self) -> None:
        """Finish: every shard must be complete and flushed; the index is written last, atomically."""
        try:
            self.drain()
        finally:
            self._io.close()
            self._finisher.shutdown()
        for index, shard in enumerate(self._plan):
            if index not in self._closed:
                if not shard:  # an empty plan still produces a valid (empty) file
                    SafetensorsFileWriter(self.out_dir / self._names[index], [], self._metadata).close()
                    self._closed.add(index)
                    continue
                writer = self._open.get(index)
                pending = "all" if writer is None else "some"
                raise ValueError(f"{self._names[index]}: {pending} of its tensors were never written")
        if self._write_index:
            weight_map = {s.name: self._names[i] for i, shard in enumerate(self._plan) for s in shard}
            index_doc = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            write_json_atomic(self.out_dir / INDEX_NAME, index_doc)

    def abort(self) -> None:
        self._io.abort()
        try:
            self._wait_finishing()
        except Exception:  # noqa: BLE001 - already failing; the first error is the one reported
            pass
        self._finisher.shutdown()
        for writer in self._open.values():
            writer.abort()
        self._open.clear()

    def _wait_finishing(self) -> None:
        pending, self._finishing = self._finishing, []
        errors = []
        for f in pending:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after every flush ended
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _close_after(last_write: Future, writer: SafetensorsFileWriter) -> None:
    try:
        last_write.result()  # the shard's writes all ran (the write thread keeps order) and succeeded
    except BaseException:  # failed or cancelled (abort): no half-written shard is left behind
        writer.abort()
        raise
    writer.close()


def write_json_atomic(path: Path, doc: object) -> None:
    """Write JSON under a temporary name, fsync, then rename."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_sharded(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write an in-memory dict of tensors as a (possibly sharded) checkpoint; returns the shard files."""
    specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
    with ShardedWriter(out_dir, specs, max_shard_bytes, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
    return writer.files
