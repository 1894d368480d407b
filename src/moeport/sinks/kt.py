"""kt-kernel's two output forms as sinks (see sinks.kt_layout for the names).

* merged: one safetensors file per MoE layer (`model-kt-layer-{L:05d}.safetensors`), the other
  tensors unchanged in `model-base-*.safetensors`, the index (true total_size, the layout in its
  metadata) written last.
* folders: kt's `--no-merge-safetensor` form, one `_layer_{L}` folder per layer (published by one
  rename), `moeport-kt.json` written last; no .safetensors at all (kt would switch loaders).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeport.errors import MoeportError, OutputWriteError
from moeport.sinks.kt_layout import KtLayout
from moeport.sinks.pieces import Piece
from moeport.sinks.safetensors_file import (
    PARTIAL_SUFFIX,
    PartialFile,
    SafetensorsFileWriter,
    TensorSpec,
    new_checksum,
)
from moeport.sinks.sharded import file_matches, plan_shards, write_index, write_json_atomic

MANIFEST_NAME = "moeport-kt.json"
BASE_SHARD_BYTES = 5 * 10**9


def _by_layer(layout: KtLayout, specs: Iterable[TensorSpec]) -> tuple[dict[int, list[TensorSpec]], list]:
    layer_of = layout.layer_of_keys()
    layers: dict[int, list[TensorSpec]] = {L: [] for L in layout.layers}
    others = []
    for spec in specs:
        if spec.name in layer_of:
            layers[layer_of[spec.name]].append(spec)
        else:
            others.append(spec)
    return layers, others


@dataclass
class KtMergedSink:
    layout: KtLayout
    metadata: Mapping[str, str] = field(default_factory=dict)

    def pieces(self, specs: Iterable[TensorSpec]) -> list[Piece]:
        layers, others = _by_layer(self.layout, specs)
        meta = {"format": "pt", **self.layout.metadata(), **self.metadata}
        base = plan_shards(others, BASE_SHARD_BYTES) if others else []
        pieces = [
            Piece(
                f"model-base-{i + 1:05d}-of-{len(base):05d}.safetensors", tuple(s), meta | {"kt_part": "base"}
            )
            for i, s in enumerate(base)
        ]
        for L, layer_specs in layers.items():
            name = f"model-kt-layer-{L:05d}.safetensors"
            pieces.append(Piece(name, tuple(layer_specs), meta | {"kt_layer": str(L)}))
        return pieces

    def open_piece(self, out_dir: Path, piece: Piece) -> SafetensorsFileWriter:
        return SafetensorsFileWriter(out_dir / piece.name, list(piece.specs), piece.metadata)

    def still_valid(self, out_dir: Path, piece: Piece, record: Mapping[str, object]) -> bool:
        return file_matches(out_dir / piece.name, record)

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None:
        write_index(out_dir, pieces, {**self.layout.metadata(), **self.metadata})


@dataclass
class KtFoldersSink:
    layout: KtLayout
    metadata: Mapping[str, str] = field(default_factory=dict)

    def pieces(self, specs: Iterable[TensorSpec]) -> list[Piece]:
        layers, others = _by_layer(self.layout, specs)
        if others:
            raise MoeportError(f"kt folders hold experts only; the plan also writes '{others[0].name}'")
        return [Piece(f"_layer_{L}", tuple(s)) for L, s in layers.items()]

    def open_piece(self, out_dir: Path, piece: Piece) -> KtFolderPiece:
        files = {}
        for L in self.layout.layers:
            if piece.name == f"_layer_{L}":
                for slot in self.layout.slots(L):
                    files.update(self.layout.files(slot))
        return KtFolderPiece(out_dir / piece.name, piece.specs, files)

    def still_valid(self, out_dir: Path, piece: Piece, record: Mapping[str, object]) -> bool:
        folder = out_dir / piece.name
        if not folder.is_dir():
            return False
        digests = {p.relative_to(out_dir).as_posix(): _sha(p.read_bytes()) for p in folder.rglob("*.kt")}
        return _listing(digests) == record.get("checksum_of_listing")

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None:
        doc = {
            "metadata": {**self.layout.metadata(), **self.metadata},
            "layers": list(self.layout.layers),
            "experts_per_layer": self.layout.experts,
        }
        write_json_atomic(out_dir / MANIFEST_NAME, doc)


def _sha(data: bytes | memoryview) -> str:
    h = new_checksum()
    h.update(data)
    return h.hexdigest()


def _listing(digests: Mapping[str, str]) -> str:
    """One checksum for a folder: over its sorted 'path checksum' lines."""
    return _sha("".join(f"{p} {d}\n" for p, d in sorted(digests.items())).encode())


class KtFolderPiece:
    """`_layer_{L}.partial/_numa_{t}/*.kt`, one file per tensor, then one rename to `_layer_{L}`."""

    def __init__(self, final: Path, specs: Iterable[TensorSpec], files: Mapping[str, str]):
        self.final = final
        self.tmp = final.with_name(final.name + PARTIAL_SUFFIX)
        self._specs = {s.name: s for s in specs}
        self._files = files
        self._digests: dict[str, str] = {}
        shutil.rmtree(self.tmp, ignore_errors=True)

    def accept(self, name: str, tensor: torch.Tensor) -> None:
        got, want = TensorSpec.of(name, tensor), self._specs.get(name)
        if got != want or name not in self._files:
            raise ValueError(f"{self.final.name}: got {got}, planned {want}")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        rel = self._files[name]  # relative to the output folder: '_layer_L/_numa_t/...'
        path = self.tmp / rel.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        f = PartialFile(path)
        try:
            f.pwrite_all(data, 0)
            f.publish(fsync=False)
        except BaseException:
            f.abort()
            raise
        self._digests[rel] = _sha(data)

    def close(self) -> dict[str, object]:
        try:
            os.sync()  # one flush for the whole layer (an fsync per small file is much slower)
            if self.final.exists():
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.abort()
            raise OutputWriteError(f"{self.tmp}: {exc.strerror}") from None
        return {"files": len(self._digests), "checksum_of_listing": _listing(self._digests)}

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
