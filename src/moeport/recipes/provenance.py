"""How an output names its source: the folder's name and a fingerprint of its content, never a
local path (checkpoints get published; `/home/alice/...` is nobody's business).

The fingerprint hashes, per shard, its safetensors header (names, dtypes, shapes, offsets,
metadata) and the first and last 64 KiB of its data with xxh3-128: it tells apart two models of the
same architecture (a fine-tune and its base) in practice, reads well under a megabyte however large
the model, and stays the same when the source is moved to another folder. It samples the data, so
it is an identity, not an integrity check (verify compares values).
"""

from __future__ import annotations

import struct

import xxhash

from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint

SAMPLE = 64 * 1024  # bytes of data hashed at each end of a shard
GGUF_HEAD = 2**20  # bytes hashed as the "header" of a GGUF file (sources/gguf.py)


def source_name(ck: Checkpoint, label: str = "") -> str:
    """`label` when the caller gives one, else the source folder's (or file's) name."""
    return label or ck.root.resolve().name


def source_fingerprint(ck: Checkpoint) -> str:
    digest = xxhash.xxh3_128()
    for path in sorted(ck.files):
        try:
            with open(path, "rb") as f:
                # a GGUF's header length is not stored up front: its first MiB stands for it
                gguf = f.read(4) == b"GGUF"
                f.seek(0)
                (size,) = (GGUF_HEAD,) if gguf else struct.unpack("<Q", f.read(8))
                header = f.read(size)
                head = f.read(SAMPLE)
                end = f.seek(0, 2)
                f.seek(max(8 + size, end - SAMPLE))
                tail = f.read(SAMPLE)
        except (OSError, struct.error) as exc:
            raise MoeportError(f"{path}: cannot read it to fingerprint the source ({exc})") from None
        for part in (path.name.encode(), header, head, tail):
            digest.update(struct.pack("<Q", len(part)) + part)
    return "xxh3-128:" + digest.hexdigest()
