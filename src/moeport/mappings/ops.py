"""Mapping primitives over named tensors; each one knows its inverse.

An op reads named inputs and returns named outputs (lazily, see values.py). Re-laying out experts
is a chain of them: per expert, gate and up rows are concatenated (`Concat`), then the experts are
stacked (`Stack`); the inverse chain unstacks and splits. Companion tensors (scales, zero points)
get the same ops with their own `RowRule`, so block scales split on block boundaries and 0-d scales
are duplicated on split and must agree on merge.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moeport.codecs.format import RowRule
from moeport.errors import MoeportError
from moeport.mappings.values import (
    Lazy,
    Memo,
    Value,
    cut_origin,
    derived,
    fill_into,
    is_meta,
    realize,
    shape_of,
)
from moeport.parallel import fan_out


class Op(ABC):
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @abstractmethod
    def apply(self, values: dict[str, Value]) -> dict[str, Value]: ...

    @abstractmethod
    def inverse(self) -> Op: ...

    @property
    def sliced_inputs(self) -> tuple[str, ...]:
        """Inputs read one item (expert) at a time, never whole: not worth reading ahead."""
        return ()


class OneToOne(Op):
    """An op from one named tensor (`source`) to one (`target`); subclasses declare both fields."""

    source: str
    target: str

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.source,)

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.target,)


class ManyToOne(Op):
    """An op from several named tensors (`sources`) to one (`target`): Stack, Concat."""

    sources: tuple[str, ...]
    target: str

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.sources

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.target,)


class OneToMany(Op):
    """An op from one named tensor (`source`) to several (`targets`): Unstack, Split."""

    source: str
    targets: tuple[str, ...]

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.source,)

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.targets


@dataclass(frozen=True)
class Copy(OneToOne):
    """A rename of one tensor (the data is passed through untouched)."""

    source: str
    target: str

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        return {self.target: values[self.source]}

    def inverse(self) -> Op:
        return Copy(self.target, self.source)


@dataclass(frozen=True)
class Transpose(OneToOne):
    source: str
    target: str
    dims: tuple[int, int] = (-2, -1)

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = list(shape_of(v))
        a, b = self.dims
        shape[a], shape[b] = shape[b], shape[a]
        memo = Memo(v)
        select = None
        if isinstance(v, Lazy) and v.select is not None and len(shape) > 2 and a < 0 and b < 0:
            # the last two dims of one item of a stack: read and transpose item by item
            item = v.select

            def select(i: int) -> Value:
                one = Memo(item(i))
                return Lazy(tuple(shape[1:]), v.dtype, produce=lambda: one().transpose(a, b).contiguous())

        produce = lambda: memo().transpose(a, b).contiguous()  # noqa: E731
        return {self.target: Lazy(tuple(shape), v.dtype, is_meta(v), produce=produce, select=select)}

    def inverse(self) -> Op:
        return Transpose(self.target, self.source, self.dims)


@dataclass(frozen=True)
class Stack(ManyToOne):
    """Experts [N, K] -> [E, N, K] (0-d scales become [E])."""

    sources: tuple[str, ...]
    target: str

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        pieces = [values[s] for s in self.sources]
        first = pieces[0]
        for name, p in zip(self.sources, pieces, strict=True):
            if shape_of(p) != shape_of(first) or p.dtype != first.dtype:
                raise MoeportError(
                    f"{name}: {p.dtype}{list(shape_of(p))} cannot be stacked with "
                    f"{self.sources[0]}: {first.dtype}{list(shape_of(first))}"
                )

        def fill(out: torch.Tensor) -> None:  # the experts of a stack are filled in parallel
            fan_out([functools.partial(fill_into, p, out[i]) for i, p in enumerate(pieces)])

        meta = any(is_meta(p) for p in pieces)
        return {self.target: Lazy((len(pieces), *shape_of(first)), first.dtype, meta, fill=fill)}

    def inverse(self) -> Op:
        return Unstack(self.target, self.sources)


@dataclass(frozen=True)
class Unstack(OneToMany):
    source: str
    targets: tuple[str, ...]

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)
        if not shape or shape[0] != len(self.targets):
            raise MoeportError(
                f"{self.source}: shape {list(shape)}, expected {len(self.targets)} experts along dim 0"
            )
        if isinstance(v, Lazy) and v.select is not None and not v.meta:
            return {t: v.select(i) for i, t in enumerate(self.targets)}  # read one item at a time
        memo = Memo(v)
        return {
            t: derived(memo, shape[1:], v.dtype, is_meta(v), lambda x, i=i: x[i])
            for i, t in enumerate(self.targets)
        }

    @property
    def sliced_inputs(self) -> tuple[str, ...]:
        return (self.source,)

    def inverse(self) -> Op:
        return Stack(self.targets, self.source)


def _units(rule: RowRule, rows: tuple[int, ...], where: str) -> list[int]:
    """Stored length of each piece along the rule's axis; every piece but the last must be aligned."""
    for r in rows[:-1]:
        if r % rule.per:
            raise MoeportError(
                f"{where}: pieces of {list(rows)} rows are not aligned to its {rule.per}-row blocks; "
                "gate/up cannot be fused or split without re-quantizing"
            )
    return [r // rule.per for r in rows[:-1]] + [-(-rows[-1] // rule.per)]


@dataclass(frozen=True)
class Concat(ManyToOne):
    """Rows of gate and up (in weight rows `rows`) into one tensor, along the part's own N axis."""

    sources: tuple[str, ...]
    target: str
    rule: RowRule
    rows: tuple[int, ...]
    interleave: bool = False  # GPT-OSS: output rows alternate gate, up

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        pieces = [values[s] for s in self.sources]
        if self.rule.shape:
            return {self.target: _with_rows(self.sources, pieces, self.rows, sum(self.rows))}
        if self.rule.axis is None:
            return {self.target: _agree(self.sources, pieces)}
        axis = self.rule.axis
        units = _units(self.rule, self.rows, self.target)
        if self.interleave and (self.rule.per != 1 or len(set(self.rows)) != 1):
            raise MoeportError(f"{self.target}: interleaved fusing needs equal, unpacked row counts")
        for name, p, n in zip(self.sources, pieces, units, strict=True):
            shape = shape_of(p)
            if len(shape) < -axis or shape[axis] != n:
                raise MoeportError(f"{name}: shape {list(shape)}, expected {n} along axis {axis}")
        shape = list(shape_of(pieces[0]))
        shape[axis] = sum(units)

        def fill(out: torch.Tensor) -> None:
            if self.interleave:
                ax = axis % out.ndim
                grouped = out.unflatten(ax, (units[0], len(pieces)))
                for i, p in enumerate(pieces):
                    fill_into(p, grouped.select(ax + 1, i))
                return
            start = 0
            for p, n in zip(pieces, units, strict=True):
                fill_into(p, out.narrow(axis, start, n))
                start += n

        meta = any(is_meta(p) for p in pieces)
        return {self.target: Lazy(tuple(shape), pieces[0].dtype, meta, fill=fill)}

    def inverse(self) -> Op:
        return Split(self.target, self.sources, self.rule, self.rows, self.interleave)


@dataclass(frozen=True)
class Split(OneToMany):
    """Inverse of Concat: views of the rows of each piece (0-d parts are duplicated)."""

    source: str
    targets: tuple[str, ...]
    rule: RowRule
    rows: tuple[int, ...]
    interleave: bool = False

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        if self.rule.shape:
            return {
                t: _with_rows((self.source,), [v], (sum(self.rows),), n)
                for t, n in zip(self.targets, self.rows, strict=True)
            }
        if self.rule.axis is None:
            return dict.fromkeys(self.targets, v)
        axis = self.rule.axis
        units = _units(self.rule, self.rows, self.source)
        shape = list(shape_of(v))
        if len(shape) < -axis or shape[axis] != sum(units):
            raise MoeportError(
                f"{self.source}: shape {shape}, expected {sum(units)} along axis {axis} "
                f"(pieces of {list(self.rows)} rows)"
            )
        memo = Memo(v)
        meta = is_meta(v)
        out: dict[str, Value] = {}
        start = 0
        stored: dict[str, Memo] = {}  # a decode's stored parts, shared by the pieces cut from them
        for i, (t, n) in enumerate(zip(self.targets, units, strict=True)):
            piece_shape = list(shape)
            piece_shape[axis] = n
            if self.interleave:
                piece = self._interleaved(axis, len(units), i)
            else:
                piece = self._narrowed(axis, start, n)
            out[t] = derived(memo, tuple(piece_shape), v.dtype, meta, piece)
            if not self.interleave:  # a fused encoder can read this piece's own stored parts
                out[t].decoded_from = cut_origin(v, axis % len(shape), start, n, stored)
            start += n
        return out

    @staticmethod
    def _narrowed(axis: int, start: int, n: int):
        return lambda x: x.narrow(axis, start, n)

    @staticmethod
    def _interleaved(axis: int, count: int, i: int):
        def piece(x: torch.Tensor) -> torch.Tensor:
            ax = axis % x.ndim
            return x.unflatten(ax, (x.shape[ax] // count, count)).select(ax + 1, i)

        return piece

    def inverse(self) -> Op:
        return Concat(self.targets, self.source, self.rule, self.rows, self.interleave)


def _with_rows(names: tuple[str, ...], pieces: list[Value], rows: tuple[int, ...], out_rows: int) -> Value:
    """A weight-shape part [.., N, K] saying `out_rows` rows, from pieces saying `rows` with one K."""
    if any(is_meta(p) for p in pieces):
        return pieces[0]
    shapes = [realize(p) for p in pieces]
    for name, shape, n in zip(names, shapes, rows, strict=True):
        if int(shape[..., -2].flatten()[0]) != n or not torch.equal(shape[..., -1], shapes[0][..., -1]):
            raise MoeportError(
                f"{name}: records the shape {shape.tolist()}, expected {n} rows and the K of {names[0]}"
            )
    out = shapes[0].clone()
    out[..., -2] = out_rows
    return out


def _agree(names: tuple[str, ...], pieces: list[Value]) -> Value:
    """Parts without an N axis (0-d scales) must be equal to be merged."""
    first = pieces[0]
    if is_meta(first):
        return first
    ref = realize(first)
    for name, p in zip(names[1:], pieces[1:], strict=True):
        if not is_meta(p) and not torch.equal(realize(p), ref):
            raise MoeportError(
                f"{name}: differs from {names[0]} ({realize(p).flatten()[:4].tolist()} vs "
                f"{ref.flatten()[:4].tolist()}); tensors with one shared scale cannot be merged "
                "without re-quantizing"
            )
    return first


@dataclass(frozen=True)
class Chain(Op):
    """Ops applied in order; its names are computed once (a plan asks for them many times)."""

    ops: tuple[Op, ...]

    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Names read before any op of the chain produced them (a name may be both: in and out)."""
        produced: set[str] = set()
        needed: list[str] = []
        for op in self.ops:
            needed += [i for i in op.inputs if i not in produced]
            produced.update(op.outputs)
        return tuple(needed)

    @functools.cached_property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Names produced and not consumed by a later op of the chain."""
        out: list[str] = []
        later: set[str] = set()
        for op in reversed(self.ops):
            out += [o for o in reversed(op.outputs) if o not in later]
            later.update(op.inputs)
        return tuple(reversed(out))

    @functools.cached_property
    def sliced_inputs(self) -> tuple[str, ...]:
        inputs = set(self.inputs)
        return tuple(dict.fromkeys(n for op in self.ops for n in op.sliced_inputs if n in inputs))

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        env = dict(values)
        last_use = {n: i for i, op in enumerate(self.ops) for n in op.inputs}
        for i, op in enumerate(self.ops):
            taken = {n: env[n] for n in op.inputs}
            for n in op.inputs:  # a name read by several ops is kept until its last reader
                if last_use[n] == i:
                    del env[n]
            env.update(op.apply(taken))
        return {o: env[o] for o in self.outputs}

    def inverse(self) -> Op:
        return Chain(tuple(op.inverse() for op in reversed(self.ops)))
