"""Lazy tensor values, so a chain of mapping ops never holds more than the tensor being written.

A mapping op does not compute its output when applied; it returns a `Lazy` that knows its shape and
dtype and how to produce itself, or how to fill a slice of a bigger tensor (a stack of experts fills
each expert's slice directly from its sources, with no temporary per expert). Applying the same ops
to `meta` sources gives the output plan (names, shapes, dtypes) without reading any data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeport.device import to_host


@dataclass
class Lazy:
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: bool = False  # planning only: never realised with data
    produce: Callable[[], torch.Tensor] | None = None  # returns the value (may be a view)
    fill: Callable[[torch.Tensor], None] | None = None  # writes the value into a given tensor
    # item i along dim 0 without realising the whole (a source stack read one expert at a time)
    select: Callable[[int], Value] | None = None
    # a float32/bf16 decode of stored parts: (codec, {part: value}, where). An encoder that has a
    # fused kernel for (that codec -> its own) reads the parts instead of the float (codecs.transcode)
    decoded_from: tuple | None = None

    def realize(self) -> torch.Tensor:
        if self.meta:
            return torch.empty(self.shape, dtype=self.dtype, device="meta")
        if self.produce is not None:
            return self.produce()
        out = torch.empty(self.shape, dtype=self.dtype)
        self.fill_into(out)
        return out

    def fill_into(self, out: torch.Tensor) -> None:
        if self.meta or out.is_meta:
            return
        if self.fill is not None:
            self.fill(out)
        else:
            out.copy_(self.produce())


@dataclass
class DeviceLazy(Lazy):
    """A value computed on an accelerator: `on_device` hands it over without a trip to the host
    (a decode feeding an encode), `realize` gives the host copy."""

    on_device: Callable[[], torch.Tensor] | None = None


Value = torch.Tensor | Lazy


def realize_on(v: Value, device: str) -> torch.Tensor:
    """The value where the math runs: a device-resident one as it is, others realised on the host."""
    if isinstance(v, DeviceLazy) and v.on_device is not None and not v.meta:
        return v.on_device()
    return realize(v)


def realize(v: Value) -> torch.Tensor:
    return v.realize() if isinstance(v, Lazy) else v


def fill_into(v: Value, out: torch.Tensor) -> None:
    if isinstance(v, Lazy):
        v.fill_into(out)
    elif not out.is_meta and not v.is_meta:
        out.copy_(v)


def shape_of(v: Value) -> tuple[int, ...]:
    return tuple(v.shape)


def is_meta(v: Value) -> bool:
    return v.meta if isinstance(v, Lazy) else v.is_meta


class Memo:
    """Realise a value once and share it (the outputs of an unstack are views of one tensor).

    A value computed on an accelerator can be shared there too (`on_device`), so a decode that
    feeds a split feeds the encoders of the pieces without a trip to the host."""

    def __init__(self, value: Value):
        self._lock = threading.Lock()  # outputs sharing it may be computed on several threads
        self._value = value
        self._tensor: torch.Tensor | None = None
        self._device_tensor: torch.Tensor | None = None
        self.device_resident = isinstance(value, DeviceLazy) and value.on_device is not None

    def __call__(self) -> torch.Tensor:
        if self._tensor is None:
            with self._lock:
                if self._tensor is None:
                    if self._device_tensor is not None:
                        self._tensor = to_host(self._device_tensor)
                    else:
                        self._tensor = realize(self._value)
                    self._value = None  # type: ignore[assignment]
        return self._tensor

    def on_device(self) -> torch.Tensor:
        if self._device_tensor is None:
            if self._tensor is not None or not self.device_resident:
                return self()
            with self._lock:
                if self._device_tensor is None:
                    self._device_tensor = self._value.on_device()  # type: ignore[union-attr]
        return self._device_tensor


def derived(memo: Memo, shape: tuple[int, ...], dtype: torch.dtype, meta: bool, fn) -> Lazy:
    """A value computed by `fn` (a view, usually) from the shared value of `memo`; it stays on the
    accelerator when the shared value is there."""
    if memo.device_resident and not meta:
        return DeviceLazy(shape, dtype, produce=lambda: fn(memo()), on_device=lambda: fn(memo.on_device()))
    return Lazy(shape, dtype, meta, produce=lambda: fn(memo()))


def cut_origin(v: Value, dim: int, start: int, length: int, memos: dict[str, Memo]) -> tuple | None:
    """The `decoded_from` of rows/columns [start, start + length) of a decode `v` (see Lazy), when
    its codec can cut its stored parts there (`codec.cut`); else None. `memos` shares each stored
    part among the pieces of one split, so it is read once."""
    origin = v.decoded_from if isinstance(v, Lazy) else None
    cut = getattr(origin[0], "cut", None) if origin is not None else None
    if origin is None or cut is None:
        return None
    codec, named, where = origin
    cuts = cut(shape_of(v), dim, start, length)
    if cuts is None or set(cuts) != set(named):
        return None
    parts: dict[str, Value] = {}
    for part, (d, s, n) in cuts.items():
        memo = memos.setdefault(part, Memo(named[part]))
        shape = list(shape_of(named[part]))
        shape[d] = n
        parts[part] = derived(memo, tuple(shape), named[part].dtype, is_meta(v), _narrow(d, s, n))
    what = "rows" if dim == 0 else "columns"
    return codec, parts, f"{where} ({what} {start}:{start + length})"


def _narrow(dim: int, start: int, length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.narrow(dim, start, length)
