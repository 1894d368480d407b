"""A checkpoint on disk: a folder of safetensors shards (+ index.json) or a single file.

Only headers are read when opening; `read` copies one tensor's bytes with `pread` into a buffer we
own. Why not safetensors' `safe_open`: it memory-maps whole shards, and every mapped page it touches
stays resident (and counts in RSS) until the handle is dropped, so a layer's worth of source pages
piles up on top of what we compute. With pread, memory is exactly the tensors we still hold.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeport.dtypes import torch_dtype_of
from moeport.errors import MoeportError
from moeport.sources.safetensors_header import SafetensorsHeader, read_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    file: Path
    nbytes: int
    offset: int = 0  # absolute file offset of the tensor's bytes


@dataclass(frozen=True)
class FileIdentity:
    """What tells a file apart from a changed or replaced one without reading it."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise MoeportError(f"{path}: cannot read ({exc.strerror})") from None
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class Checkpoint:
    """Lazy view of all tensors of a checkpoint, addressed by name."""

    def __init__(
        self,
        root: Path,
        headers: list[SafetensorsHeader],
        config: dict[str, Any] | None,
        identities: dict[Path, FileIdentity] | None = None,
    ):
        self.root = root
        self.config = config
        self.files = [h.path for h in headers]
        # each shard as it was when its header was read: a conversion checks they stay so
        self.identities = identities or {f: FileIdentity.of(f) for f in self.files}
        self.metadata = {h.path: h.metadata for h in headers}  # each shard's __metadata__
        self._info: dict[str, TensorInfo] = {}
        for h in headers:
            for name, e in h.entries.items():
                if name in self._info:
                    raise MoeportError(f"{h.path}: tensor '{name}' also stored in {self._info[name].file}")
                self._info[name] = TensorInfo(
                    e.dtype, e.shape, h.path, e.end - e.begin, h.data_start + e.begin
                )
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()  # reads may come from a prefetch thread too

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def info(self, key: str) -> TensorInfo:
        try:
            return self._info[key]
        except KeyError:
            raise MoeportError(f"{self.root}: no tensor named '{key}'") from None

    def read(self, key: str) -> torch.Tensor:
        """Load one tensor (just its bytes, into a fresh buffer)."""
        info = self.info(key)
        return self._pread(key, info, info.offset, info.nbytes, info.shape)

    def read_item(self, key: str, index: int) -> torch.Tensor:
        """Item `index` along dim 0 of a stacked tensor (one expert of [E, ...]): only its bytes."""
        info = self.info(key)
        if not info.shape or not 0 <= index < info.shape[0]:
            raise MoeportError(f"{info.file}: tensor '{key}' {list(info.shape)} has no item {index}")
        size = info.nbytes // info.shape[0]
        return self._pread(key, info, info.offset + index * size, size, info.shape[1:])

    def _pread(self, key: str, info: TensorInfo, offset: int, nbytes: int, shape) -> torch.Tensor:
        try:
            dtype = torch_dtype_of(info.dtype)
        except ValueError:
            raise MoeportError(
                f"{info.file}: tensor '{key}' has dtype {info.dtype}, which torch cannot hold"
            ) from None
        with self._fd_lock:
            fd = self._fds.get(info.file)
            if fd is None:
                try:
                    fd = os.open(info.file, os.O_RDONLY)
                except OSError as exc:
                    raise MoeportError(f"{info.file}: cannot open ({exc.strerror})") from None
                self._fds[info.file] = fd
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise MoeportError(f"{info.file}: ends inside tensor '{key}' (file truncated?)")
            done += n
        return buf.view(dtype).reshape(shape)

    def check_unchanged(self) -> None:
        """Refuse to go on when a shard changed since it was opened: an output would mix old and
        new bytes (a download or copy still running into the source folder, say)."""
        for path, before in self.identities.items():
            now = FileIdentity.of(path)
            if now != before:
                what = [k for k in ("size", "mtime_ns", "inode") if getattr(now, k) != getattr(before, k)]
                raise MoeportError(
                    f"{path}: changed while being converted ({', '.join(what)} differ from when it was "
                    "opened); run again once the source is complete and stable"
                )

    def release(self) -> None:
        """Close open files."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._info.values())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint folder, a single .safetensors file or a GGUF (file, split set or folder)."""
    path = Path(path)
    if not path.exists():
        raise MoeportError(f"{path}: no such file or folder")
    if _holds_gguf(path):
        from moeport.sources.gguf import open_gguf  # deferred: sources.gguf builds on this module

        return open_gguf(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MoeportError(f"{path}: expected a .safetensors file or a checkpoint folder")
        root, files = path.parent, [path]
    else:
        root, files = path, _shard_files(path)
    identities = {f: FileIdentity.of(f) for f in files}  # before reading: a later change is seen
    headers = [read_header(f) for f in files]
    if path.is_dir():
        _check_index(root, headers)
    return Checkpoint(root, headers, _load_config(root), identities)


def _holds_gguf(path: Path) -> bool:
    """A .gguf file, or a folder of them with no safetensors (what `--to gguf` writes)."""
    if path.is_file():
        return path.suffix == ".gguf"
    return any(path.glob("*.gguf")) and not any(path.glob("*.safetensors"))


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MoeportError(f"{index}: no 'weight_map' object")
        bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
        if bad is not None:
            raise MoeportError(f"{index}: 'weight_map' values must be shard file names, found {bad!r}")
        files = []
        for name in sorted(set(weight_map.values())):
            if Path(name).is_absolute() or ".." in Path(name).parts or not name.endswith(".safetensors"):
                raise MoeportError(
                    f"{index}: names shard '{name}', which is not a .safetensors file inside the folder"
                )
            shard = folder / name
            if not shard.is_file():  # a symlink to a regular file (Hugging Face cache) is fine
                where = f" (a link to {shard.resolve()})" if shard.is_symlink() else ""
                raise MoeportError(f"{index}: names shard '{name}', which does not exist{where}")
            files.append(shard)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MoeportError(f"{folder}: no *.safetensors files (and no {INDEX_NAME})")
    return files


def _check_index(root: Path, headers: list[SafetensorsHeader]) -> None:
    index = root / INDEX_NAME
    if not index.exists():
        return
    weight_map: dict[str, str] = _load_json(index)["weight_map"]
    stored = {name: h.path.name for h in headers for name in h.entries}
    for name, shard in weight_map.items():
        if stored.get(name) != shard:
            where = f"in {stored[name]}" if name in stored else "in no shard"
            raise MoeportError(f"{index}: maps tensor '{name}' to {shard} but it is {where}")
    unlisted = [name for name in stored if name not in weight_map]
    if unlisted:  # loaders go by the index: such a tensor would silently be missing from the model
        raise MoeportError(
            f"{index}: does not list tensor '{unlisted[0]}' stored in {stored[unlisted[0]]} "
            f"({len(unlisted)} unlisted in all)"
        )


def _load_config(root: Path) -> dict[str, Any] | None:
    cfg = root / "config.json"
    return _load_json(cfg) if cfg.exists() else None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoeportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MoeportError(f"{path}: expected a JSON object")
    return data
