"""Sharded safetensors output in the Hugging Face layout, streamed tensor by tensor.

The shard plan is fixed up front from the tensor specs (so each shard's header can be written
first); shards are published by rename as soon as all their tensors are in, and
`model.safetensors.index.json` is written last, so its presence means the output is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeport.sinks.pieces import Piece, PieceWriter
from moeport.sinks.safetensors_file import (
    CHECKSUM,
    PARTIAL_SUFFIX,
    SafetensorsFileWriter,
    TensorSpec,
    file_checksum,
)

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


@dataclass
class HfSink:
    """Hugging Face sharded safetensors: shards cut by size in plan order, the index written last
    (only when there is more than one shard, as transformers writes it)."""

    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    metadata: Mapping[str, str] = field(default_factory=dict)
    always_index: bool = False

    def pieces(self, specs: Iterable[TensorSpec]) -> list[Piece]:
        shards = plan_shards(specs, self.max_shard_bytes)
        meta = {"format": "pt", **self.metadata}
        return [Piece(n, tuple(s), meta) for n, s in zip(shard_names(len(shards)), shards, strict=True)]

    def open_piece(self, out_dir: Path, piece: Piece) -> SafetensorsFileWriter:
        return SafetensorsFileWriter(out_dir / piece.name, list(piece.specs), piece.metadata)

    def still_valid(self, out_dir: Path, piece: Piece, record: Mapping[str, object]) -> bool:
        return file_matches(out_dir / piece.name, record)

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None:
        if self.always_index or len(pieces) > 1:
            write_index(out_dir, pieces, {})


def write_index(out_dir: Path, pieces: list[Piece], metadata: Mapping[str, object]) -> None:
    """`model.safetensors.index.json` (true total_size), atomically: its presence means complete."""
    weight_map = {s.name: p.name for p in pieces for s in p.specs}
    total = sum(p.nbytes for p in pieces)
    write_json_atomic(
        out_dir / INDEX_NAME, {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
    )


def file_matches(path: Path, record: Mapping[str, object]) -> bool:
    """Whether a published file is still the one the journal recorded (size, then checksum)."""
    return (
        path.is_file()
        and path.stat().st_size == record.get("size")
        and file_checksum(path) == record.get(CHECKSUM)
    )


class ShardedWriter(PieceWriter):
    """Streams planned tensors into HF shards; the index is written last, at close."""

    def __init__(
        self,
        out_dir: str | Path,
        specs: Iterable[TensorSpec],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        always_index: bool = False,
    ):
        self.sink = HfSink(max_shard_bytes, dict(metadata or {}), always_index)
        super().__init__(Path(out_dir), self.sink.pieces(specs), self.sink.open_piece)

    @property
    def files(self) -> list[Path]:
        return [self.out_dir / p.name for p in self.pieces]

    def close(self) -> None:
        super().close()
        self.sink.finish(self.out_dir, self.pieces)


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
