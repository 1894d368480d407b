"""Output pieces (files or folders a sink publishes whole) and the writer that streams into them.

A sink cuts the planned output into pieces: HF shards, kt's per-layer files or folders. A piece is
the unit of atomic publication and of resume: it is written under a temporary name, published by
rename when its last tensor is in, and reported (`on_done(name, record)`, record = size and
checksum) so the executor's journal can skip it next time. Tensors arrive in plan order; each
piece's specs are a subsequence of that order, so every piece is written front to back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from moeport.sinks.safetensors_file import TensorSpec
from moeport.sinks.write_behind import WRITE_BEHIND_BYTES, WriteBehind


@dataclass(frozen=True)
class Piece:
    name: str  # file or folder name inside the output folder
    specs: tuple[TensorSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


class PieceFile(Protocol):
    """What a sink opens for one piece: `accept` checks a tensor in the caller's thread, `write`
    stores it (on the write thread), `close` publishes and returns the journal record."""

    def accept(self, name: str, tensor: torch.Tensor) -> None: ...

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> dict[str, object]: ...

    def abort(self) -> None: ...


OpenPiece = Callable[[Path, Piece], PieceFile]
OnDone = Callable[[str, dict[str, object]], None]


class PieceWriter:
    """Streams planned tensors into their pieces; pieces in `skip` (already published) take no
    writes. Use as a context manager so a failure leaves no half-written piece under its name."""

    def __init__(
        self,
        out_dir: Path,
        pieces: Iterable[Piece],
        open_piece: OpenPiece,
        skip: Iterable[str] = (),
        on_done: OnDone | None = None,
        queue_bytes: int = WRITE_BEHIND_BYTES,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pieces = list(pieces)
        self._open_piece = open_piece
        self._skip = set(skip)
        self._on_done = on_done or (lambda _name, _record: None)
        self._piece_of = {s.name: i for i, p in enumerate(self.pieces) for s in p.specs}
        self._open: dict[int, PieceFile] = {}
        self._left = [len(p.specs) for p in self.pieces]
        self._closed: set[int] = {i for i, p in enumerate(self.pieces) if p.name in self._skip}
        # Writes run on a background thread (sinks.write_behind); a finished piece is fsynced and
        # renamed on a second thread, overlapping the next piece's writes.
        self._io = WriteBehind(queue_bytes)
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeport-piece-close")
        self._finishing: list[Future] = []

    def skips(self, name: str) -> bool:
        """Whether `name` belongs to a piece that is already published (its tensor is not needed)."""
        index = self._piece_of.get(name)
        return index is not None and self.pieces[index].name in self._skip

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Hand one planned tensor over; the caller must not modify it afterwards. A wrong name,
        dtype or shape raises here."""
        try:
            index = self._piece_of[name]
        except KeyError:
            raise ValueError(f"tensor '{name}' is not in the output plan") from None
        if self.pieces[index].name in self._skip:
            return
        piece = self._open.get(index)
        if piece is None:
            if index in self._closed:
                raise ValueError(f"tensor '{name}' written twice")
            piece = self._open_piece(self.out_dir, self.pieces[index])
            self._open[index] = piece
        piece.accept(name, tensor)  # a wrong tensor fails here, in the caller, not later
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        written = self._io.submit(tensor.numel() * tensor.element_size(), piece.write, name, tensor)
        self._left[index] -= 1
        if not self._left[index]:
            del self._open[index]
            self._closed.add(index)
            name_of = self.pieces[index].name
            self._finishing.append(self._finisher.submit(self._close_after, written, piece, name_of))
        for f in [f for f in self._finishing if f.done()]:
            f.result()  # a failed flush surfaces at the next write
            self._finishing.remove(f)

    def _close_after(self, last_write: Future, piece: PieceFile, name: str) -> None:
        try:
            last_write.result()  # the piece's writes all ran (the write thread keeps order)
        except BaseException:  # failed or cancelled (abort): no half-written piece is left behind
            piece.abort()
            raise
        self._on_done(name, piece.close())

    def drain(self) -> None:
        """Wait until every tensor handed over so far is on disk and every full piece published."""
        self._io.drain()
        self._wait_finishing()

    def close(self) -> None:
        """Finish: every piece must be complete, flushed and published."""
        try:
            self.drain()
        finally:
            self._io.close()
            self._finisher.shutdown()
        for index, piece in enumerate(self.pieces):
            if index in self._closed:
                continue
            if not piece.specs:  # an empty plan still produces a valid (empty) piece
                self._on_done(piece.name, self._open_piece(self.out_dir, piece).close())
                self._closed.add(index)
                continue
            pending = "all" if index not in self._open else "some"
            raise ValueError(f"{piece.name}: {pending} of its tensors were never written")

    def abort(self) -> None:
        self._io.abort()
        try:
            self._wait_finishing()
        except Exception:  # noqa: BLE001 - already failing; the first error is the one reported
            pass
        self._finisher.shutdown()
        for piece in self._open.values():
            piece.abort()
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

    def __enter__(self) -> PieceWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
