"""Read and validate a safetensors header without touching tensor data.

Why by hand: detection and `inspect` need every tensor's dtype/shape/offset from headers alone
(cheap even for 160 shards), and user-facing errors must say *what* is wrong with *which* file
(truncated, corrupt JSON, holes), which the Rust reader reports only as a generic exception.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from moeport.dtypes import known_dtype, nbytes_of
from moeport.errors import MoeportError

MAX_HEADER_SIZE = 100_000_000  # same cap as the reference reader


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to the start of the data buffer
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    data_start: int  # absolute file offset of the data buffer
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of one .safetensors file; raise MoeportError on any defect."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise MoeportError(
                    f"{path}: not a safetensors file (only {size} bytes, header length missing)"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE or n + 8 > size:
                raise MoeportError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(declares {n} header bytes, file has {size})"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise MoeportError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoeportError(f"{path}: corrupt safetensors header (invalid JSON: {exc})") from None
    except _Duplicate as dup:
        raise MoeportError(f"{path}: corrupt safetensors header (key '{dup.key}' appears twice)") from None
    if not isinstance(header, dict):
        raise MoeportError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MoeportError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    entries = {name: _parse_entry(path, name, spec) for name, spec in header.items()}
    _check_tiling(path, entries, size - 8 - n)
    return SafetensorsHeader(path=path, data_start=8 + n, entries=entries, metadata=metadata)


class _Duplicate(Exception):
    def __init__(self, key: str):
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON objects whose keys repeat are refused (json keeps the last one silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key that repeats (a real model has 1e5 objects)
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return out


def _naturals(values: object) -> tuple[int, ...] | None:
    """A JSON list of non-negative integers (not floats, not booleans), else None."""
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        return None
    return tuple(values)


def _parse_entry(path: Path, name: str, spec: object) -> HeaderEntry:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= set(spec):
        raise MoeportError(
            f"{path}: corrupt safetensors header entry for tensor '{name}' (need dtype, shape, data_offsets)"
        )
    dtype, shape, offsets = spec["dtype"], _naturals(spec["shape"]), _naturals(spec["data_offsets"])
    if shape is None:
        raise MoeportError(
            f"{path}: tensor '{name}' has shape {spec['shape']!r}, expected a list of non-negative integers"
        )
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise MoeportError(
            f"{path}: tensor '{name}' has data_offsets {spec['data_offsets']!r}, expected [begin, end] "
            "with 0 <= begin <= end"
        )
    begin, end = offsets
    if not isinstance(dtype, str):
        raise MoeportError(f"{path}: tensor '{name}' has dtype {dtype!r}, expected a string")
    if not known_dtype(dtype):
        raise MoeportError(f"{path}: tensor '{name}' has unknown dtype '{dtype}'")
    if end - begin != nbytes_of(dtype, shape):
        raise MoeportError(
            f"{path}: tensor '{name}' spans {end - begin} bytes but {dtype}{list(shape)} needs "
            f"{nbytes_of(dtype, shape)}"
        )
    return HeaderEntry(dtype, shape, begin, end)


def _check_tiling(path: Path, entries: dict[str, HeaderEntry], buffer_len: int) -> None:
    """Tensors must tile the data buffer exactly; a short buffer means a truncated file."""
    cursor = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != cursor:
            raise MoeportError(f"{path}: corrupt safetensors layout at tensor '{name}' (gap or overlap)")
        cursor = e.end
    if cursor > buffer_len:
        raise MoeportError(
            f"{path}: truncated safetensors file (tensor data needs {cursor} bytes, file holds {buffer_len})"
        )
    if cursor < buffer_len:
        raise MoeportError(f"{path}: corrupt safetensors file ({buffer_len - cursor} trailing bytes)")
