"""Where a conversion writes: DST is published whole, by one rename of its staging folder.

Every target writes into `DST.moeport-partial/`, with the journal (convert.journal) of the pieces
already published there; DST appears only when everything is in. Before a byte is written this
module decides what to do with what is already there: refuse (DST holds something else, or is
the source), report "already complete" (DST holds this very recipe), start afresh, or continue
an interrupted run of the same recipe (its published pieces re-checked against their checksums).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeport.convert.journal import Journal, recipe_diff
from moeport.errors import MoeportError
from moeport.sinks.pieces import Piece
from moeport.sinks.safetensors_file import PARTIAL_SUFFIX
from moeport.sizes import format_size

STAGING_SUFFIX = ".moeport-partial"
JOURNAL_NAME = "moeport-journal.json"
PROCESS_OVERHEAD = 600 * 2**20  # interpreter + torch + numba, for --max-memory


def staging_of(dst: Path) -> Path:
    return dst.with_name(dst.name + STAGING_SUFFIX)


@contextlib.contextmanager
def locked(dst: Path) -> Iterator[None]:
    """Hold an exclusive lock on DST for the whole run (`.DST.moeport-lock` beside it, flock'ed):
    a second conversion into the same DST is refused, naming the first one's pid."""
    path = dst.with_name(f".{dst.name}.moeport-lock")
    while True:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MoeportError(f"{exc.filename or dst}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MoeportError(
                f"{dst}: another moeport run (pid {holder}) is converting into it; wait for it to end "
                "or choose another DST"
            ) from None
        try:  # the last holder may have removed the file between our open and our lock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def check_destination(dst: Path, src: Path, recipe: dict[str, Any], overwrite: bool) -> bool:
    """Refuse a DST that cannot take this output (nothing is written); True when DST already holds
    exactly this output (nothing to do)."""
    root, out = src.resolve(), dst.resolve()
    if root == out or out in root.parents:
        raise MoeportError(f"{dst}: is (or contains) the source checkpoint {src}; choose another DST")
    if root in out.parents:
        raise MoeportError(f"{dst}: is inside the source checkpoint {src}; choose a DST outside it")
    if _holds_this_output(dst, recipe, overwrite):
        return True
    check_writable(dst, overwrite)
    return False


def _holds_this_output(dst: Path, recipe: dict[str, Any], overwrite: bool) -> bool:
    if dst.exists() and not dst.is_dir():
        if overwrite:
            return False
        raise MoeportError(f"{dst}: exists and is not a folder (use --overwrite to replace it)")
    if not dst.exists() or not any(dst.iterdir()):
        _check_staging(dst, recipe, overwrite)
        return False
    old = Journal.load(dst / JOURNAL_NAME)
    if overwrite:
        return False
    if old is not None and old.recipe != recipe:
        raise MoeportError(
            f"{dst}: holds a conversion with a different recipe ({recipe_diff(old.recipe, recipe)}); "
            "use another DST, or --overwrite to start over"
        )
    if old is not None and old.complete:
        return True
    raise MoeportError(f"{dst}: already exists and is not empty (use --overwrite to replace it)")


def check_writable(dst: Path, overwrite: bool) -> None:
    """Fail now, in one line, where creating the staging folder would fail after the planning: a
    parent that is a file, a folder we may not write in, a pseudo file system such as /proc."""
    staging = staging_of(dst)
    if staging.exists() and not staging.is_dir() and not overwrite:
        raise MoeportError(f"{staging}: exists and is not a folder (remove it, or use --overwrite)")
    where = dst.absolute().parent
    try:
        while not where.exists():
            where = where.parent
        if not where.is_dir():
            raise MoeportError(f"{dst}: cannot be created: {where} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".moeport-probe-", dir=where))
    except OSError as exc:
        raise MoeportError(f"{dst}: cannot write in {where} ({exc.strerror})") from None


def _check_staging(dst: Path, recipe: dict[str, Any], overwrite: bool) -> None:
    staging = staging_of(dst)
    if staging.exists() and not staging.is_dir() and overwrite:
        staging.unlink()  # check_writable refused it without --overwrite
        return
    if overwrite or not staging.exists():
        return
    old = Journal.load(staging / JOURNAL_NAME)
    if old is not None and old.recipe != recipe:
        raise MoeportError(
            f"{staging}: holds an unfinished conversion with a different recipe "
            f"({recipe_diff(old.recipe, recipe)}); use another DST, or --overwrite to start over"
        )


def recorded_pieces(dst: Path, recipe: dict[str, Any]) -> set[str]:
    """Pieces an interrupted run of this recipe recorded as published (not yet re-checked)."""
    old = Journal.load(staging_of(dst) / JOURNAL_NAME) if staging_of(dst).exists() else None
    return set(old.steps) if old is not None and old.recipe == recipe else set()


def open_staging(
    dst: Path, recipe: dict[str, Any], pieces: list[Piece], still_valid, overwrite: bool
) -> Journal:
    """The journal to continue in DST's staging folder: the pieces it records that are still
    intact on disk (size and checksum re-checked), or a fresh one."""
    staging = staging_of(dst)
    old = None if overwrite else Journal.load(staging / JOURNAL_NAME)
    if old is None or old.recipe != recipe:
        if staging.is_dir():
            shutil.rmtree(staging)
        elif staging.exists():  # a stray file of that name, replaced under --overwrite
            staging.unlink()
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise MoeportError(f"{staging}: cannot create the output folder ({exc.strerror})") from None
        journal = Journal(staging / JOURNAL_NAME, recipe)
        journal.save()
        return journal
    for p in staging.glob(f"*{PARTIAL_SUFFIX}"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    by_name = {p.name: p for p in pieces}
    old.steps = {
        name: record
        for name, record in old.steps.items()
        if name in by_name and still_valid(staging, by_name[name], record)
    }
    old.complete = False
    old.save()
    return old


def preflight(dst: Path, pieces: list[Piece], kept: set[str], peak: int, max_memory: int | None) -> None:
    """Disk space for what remains to be written, and the memory estimate against --max-memory."""
    need = sum(p.nbytes + 4096 for p in pieces if p.name not in kept)
    where = dst
    while not where.exists():
        where = where.parent
    free = free_bytes(where)
    if need > free:
        raise MoeportError(
            f"{dst}: not enough disk space: the output needs {format_size(need)}, {where} has "
            f"{format_size(free)} free"
        )
    if max_memory is not None and peak + PROCESS_OVERHEAD > max_memory:
        raise MoeportError(
            f"--max-memory {format_size(max_memory)}: this conversion needs about "
            f"{format_size(peak + PROCESS_OVERHEAD)} (one unit of work at a time)"
        )


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def publish(staging: Path, dst: Path) -> None:
    """Replace DST by the finished staging folder in one rename."""
    if dst.exists():
        if dst.is_dir():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    os.replace(staging, dst)
