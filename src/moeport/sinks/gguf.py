"""GGUF output: one file, or llama.cpp split files cut by size, streamed tensor by tensor.

gguf-py's `GGUFWriter` writes the header, the metadata and every tensor info from the planned
specs alone (`add_tensor_info`: sizes follow from shape and type), then takes each tensor's bytes
as they come (`write_tensor_data`, aligned), holding none of them: the whole-model buffer its
`add_tensor` path keeps is never used. Each file is a piece of the executor's journal (written
under `.partial`, renamed when whole, recorded with its checksum), so a resumed run keeps the
finished split files; a single-file GGUF is redone whole. Split files carry `split.no`,
`split.count` and `split.tensors.count`, the model's keys only in the first, named
`<stem>-00001-of-0000N.gguf` (gguf-py's SHARD_NAME_FORMAT), as llama.cpp's gguf-split writes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeport.errors import OutputWriteError
from moeport.sinks.pieces import Piece
from moeport.sinks.safetensors_file import CHECKSUM, PARTIAL_SUFFIX, TensorSpec, new_checksum
from moeport.sinks.sharded import file_matches, plan_shards

STEM = "model"
# (key, value, GGUFValueType) of the model's metadata, in writing order
KeyValue = tuple[str, Any, Any]


def gguf_names(count: int, stem: str = STEM) -> list[str]:
    if count == 1:
        return [f"{stem}.gguf"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.gguf" for i in range(count)]


@dataclass
class GgufSink:
    """`types`: each output tensor's GGML type; `keys`: the model's metadata (first file only)."""

    arch: str
    types: Mapping[str, Any]
    keys: list[KeyValue] = field(default_factory=list)
    max_shard_bytes: int = 0  # 0: one file

    def pieces(self, specs: Iterable[TensorSpec]) -> list[Piece]:
        specs = list(specs)
        shards = plan_shards(specs, self.max_shard_bytes) if self.max_shard_bytes else [specs]
        return [Piece(n, tuple(s)) for n, s in zip(gguf_names(len(shards)), shards, strict=True)]

    def open_piece(self, out_dir: Path, piece: Piece) -> GgufFileWriter:
        index = gguf_names(self._count(piece)).index(piece.name)
        return GgufFileWriter(out_dir / piece.name, self, piece, index)

    def _count(self, piece: Piece) -> int:
        """How many files the set has (its name says so)."""
        if piece.name == f"{STEM}.gguf":
            return 1
        return int(piece.name.rsplit("-of-", 1)[1].removesuffix(".gguf"))

    def still_valid(self, out_dir: Path, piece: Piece, record: Mapping[str, object]) -> bool:
        return file_matches(out_dir / piece.name, record)

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None:
        """Nothing to add: a split set needs no index (each file says its place)."""


class GgufFileWriter:
    """One GGUF file: header and tensor infos at open, then each tensor's bytes in planned order."""

    def __init__(self, path: Path, sink: GgufSink, piece: Piece, index: int):
        from gguf import GGUFValueType, GGUFWriter, Keys

        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self._order = [s.name for s in piece.specs]
        self._specs = {s.name: s for s in piece.specs}
        self._accepted = 0
        self._written = 0
        count = sink._count(piece)
        w = GGUFWriter(None, sink.arch)
        if index:
            w.kv_data = [{}]  # later split files carry only the split keys (as gguf-split writes)
        else:
            for key, value, vtype in sink.keys:
                w.add_key_value(key, value, vtype)
        if count > 1:
            w.add_key_value(Keys.Split.LLM_KV_SPLIT_NO, index, GGUFValueType.UINT16)
            w.add_key_value(Keys.Split.LLM_KV_SPLIT_COUNT, count, GGUFValueType.UINT16)
            total = len(sink.types)  # every tensor of the set
            w.add_key_value(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, total, GGUFValueType.INT32)
        for spec in piece.specs:
            qtype = sink.types[spec.name]
            byte_rows = np.uint8 if spec.dtype == "U8" else np.float32  # U8: rows of blocks
            w.add_tensor_info(spec.name, spec.shape, np.dtype(byte_rows), spec.nbytes, raw_dtype=qtype)
        self._w = w
        try:
            w.write_header_to_file(self.partial)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            fout.flush()
            self._pos = fout.tell()
            with open(self.partial, "rb") as fh:
                header = fh.read(self._pos)
        except OSError as exc:
            self.abort()
            raise OutputWriteError(f"{self.partial}: cannot write ({exc.strerror})") from None
        self._hash = new_checksum()
        self._hash.update(header)

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        """Tensors must come in planned order (a GGUF's data follows its tensor infos)."""
        if self._accepted >= len(self._order) or self._order[self._accepted] != name:
            expected = self._order[self._accepted] if self._accepted < len(self._order) else "none"
            raise ValueError(f"{self.path.name}: tensor '{name}' out of order (expected {expected})")
        got = TensorSpec.of(name, tensor)
        if got != self._specs[name]:
            spec = self._specs[name]
            raise ValueError(
                f"{self.path.name}: tensor '{name}' is {got.dtype}{list(got.shape)}, "
                f"planned {spec.dtype}{list(spec.shape)}"
            )
        self._accepted += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        align = self._w.data_alignment
        before = -self._pos % align
        after = -data.nbytes % align
        try:
            self._w.write_tensor_data(data)
        except OSError as exc:
            raise OutputWriteError(f"{self.partial}: write failed ({exc.strerror})") from None
        self._hash.update(bytes(before))
        self._hash.update(memoryview(data))
        self._hash.update(bytes(after))
        self._pos += before + data.nbytes + after
        self._written += 1

    def close(self) -> dict[str, object]:
        if self._written != len(self._order):
            raise ValueError(
                f"{self.path.name}: {len(self._order) - self._written} planned tensors not written"
            )
        fout = self._w.fout[0]
        try:
            fout.flush()
            os.fsync(fout.fileno())
        except OSError as exc:
            self.abort()
            raise OutputWriteError(f"{self.partial}: cannot flush ({exc.strerror})") from None
        self._w.close()
        os.replace(self.partial, self.path)
        return {"size": self._pos, CHECKSUM: self._hash.hexdigest()}

    def abort(self) -> None:
        self._w.close()
        self.partial.unlink(missing_ok=True)
