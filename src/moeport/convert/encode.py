"""Quantizing as one more op of the plan: `Encode` (a float weight -> the parts of a codec).

Every target that writes a quantized format (compressed-tensors, FP8, kt-kernel's AMX layout...)
uses this one op with its codec; under a `Batcher` (the GPU path) same-shape encodes of a layer
run as one stacked call when the codec takes stacks (`codec.stacked_encode`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeport.codecs.base import Codec
from moeport.codecs.transcode import has_fused, transcode
from moeport.convert.batching import active_batcher
from moeport.device import stack_to, to_device, to_host
from moeport.errors import MoeportError
from moeport.mappings.ops import OneToOne, Op
from moeport.mappings.values import Lazy, Value, is_meta, realize, realize_on, shape_of
from moeport.parallel import once

PartSpecs = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Encode(OneToOne):
    """A float weight -> the parts of `codec` (names: `{base}{part}`), one weight at a time."""

    source: str
    base: str  # target name prefix, e.g. 'model.layers.1.mlp.experts.0.up_proj.'
    codec: Codec
    part_specs: PartSpecs
    device: str = "cpu"
    allow_nonfinite: bool = False  # quantize NaN/Inf anyway (the user said so)
    label: str = ""  # the weight's name in errors when the output's means little to the user

    @property
    def target(self) -> str:  # type: ignore[override]
        return self.outputs[0]

    @functools.cached_property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.base + p for p, _, _ in self.part_specs)

    @property
    def where(self) -> str:
        return self.label or self.base.rstrip(".")

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        batcher = active_batcher()
        if batcher is not None and not is_meta(v):
            key = ("encode", self.codec, self.part_specs, self.allow_nonfinite)
            run = functools.partial(
                _encode_batch, self.codec, self.part_specs, batcher.device, self.allow_nonfinite
            )
            encoded = batcher.submit(key, (v, self.where), math.prod(shape_of(v)), run)
        elif self.device == "cpu" and _fused_from(v, self.codec):
            encoded = once(lambda: self._transcode(*v.decoded_from, via=v.dtype))  # type: ignore[misc]
        else:
            encoded = once(lambda: self._encode(realize(v)))  # one encode serves every part
        return {
            self.base + part: Lazy(shape, dtype, is_meta(v), produce=lambda p=part: encoded()[p])
            for part, dtype, shape in self.part_specs
        }

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = to_device(w, self.device)
        parts = encode_named(self.codec, w, self.where)
        if not self.allow_nonfinite:
            refuse_nonfinite(self.codec, w, parts, [self.where], stacked=False)
        parts = {p: t.cpu() for p, t in parts.items()}
        _check_parts(parts, self.part_specs, self.where, ())
        return parts

    def _transcode(
        self, src: Codec, named: dict[str, Value], where: str, via: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Encode a decode's parts through a fused CPU kernel (same bytes as decode-then-encode,
        without the float weight)."""
        tensors = {p: realize(t) for p, t in named.items()}
        parts = transcode(src, tensors, self.codec, where, via)
        if not self.allow_nonfinite:  # the float weight is decoded only to name a bad row
            refuse_nonfinite(
                self.codec, lambda: src.decode(tensors, where).to(via), parts, [self.where], stacked=False
            )
        parts = {p: t.cpu() for p, t in parts.items()}
        _check_parts(parts, self.part_specs, self.where, ())
        return parts

    def inverse(self) -> Op:
        raise MoeportError(f"{self.source}: quantizing is lossy and has no inverse")


@dataclass(frozen=True)
class EncodeShared(Op):
    """Weights that servers fuse into one matrix (gate and up of an expert, q/k/v) -> the parts of
    `codec` for each, with ONE global scale from the largest |w| among them: vLLM and SGLang apply
    a single global scale to the fused matrix (ModelOpt's export and llmcompressor unify it the
    same way). For codecs with a per-tensor global scale (`codec.shares_global_scale`)."""

    sources: tuple[str, ...]
    bases: tuple[str, ...]
    codec: Codec
    specs: tuple[PartSpecs, ...]  # one per source
    device: str = "cpu"
    allow_nonfinite: bool = False

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.sources

    @functools.cached_property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(b + p for b, specs in zip(self.bases, self.specs, strict=False) for p, _, _ in specs)

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        vs = [values[s] for s in self.sources]
        meta = any(is_meta(v) for v in vs)
        encoded = once(lambda: self._encode([realize(v) for v in vs]))
        return {
            base + part: Lazy(shape, dtype, meta, produce=lambda i=i, p=part: encoded()[i][p])
            for i, (base, specs) in enumerate(zip(self.bases, self.specs, strict=False))
            for part, dtype, shape in specs
        }

    def _encode(self, ws: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        ws = [to_device(w, self.device) for w in ws]
        names = [b.rstrip(".") for b in self.bases]
        amax = torch.stack([_abs_max(w) for w in ws]).amax()
        if not self.allow_nonfinite and not bool(torch.isfinite(amax)):
            for w, name in zip(ws, names, strict=False):  # names the weight at fault, not its partner
                check_finite_weight(self.codec, w, [name], stacked=False)
        out = []
        for w, name, specs in zip(ws, names, self.specs, strict=False):
            try:
                parts = self.codec.encode(w, global_amax=amax)  # type: ignore[call-arg]
            except MoeportError as exc:
                raise MoeportError(f"{name}: {exc}") from None
            parts = {p: t.cpu() for p, t in parts.items()}
            _check_parts(parts, specs, name, ())
            out.append(parts)
        return out

    def inverse(self) -> Op:
        raise MoeportError(f"{self.sources[0]}: quantizing is lossy and has no inverse")


@dataclass(frozen=True)
class Recode(Op):
    """A weight stored by codec `src` -> the same codes and scales as codec `dst` stores them, no
    requantization (codecs of one `kind`: NVFP4 ModelOpt <-> compressed-tensors, MXFP4 layouts).
    A per-tensor global scale that one stores as a multiplier and the other as a divisor is
    converted by its correctly rounded float32 reciprocal (`codecs.fp4.reciprocal`)."""

    sources: tuple[tuple[str, str], ...]  # (part, tensor name), the parts `src` needs
    base: str
    src: Codec
    dst: Codec
    part_specs: PartSpecs

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(n for _, n in self.sources)

    @functools.cached_property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.base + p for p, _, _ in self.part_specs)

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        meta = any(is_meta(values[n]) for _, n in self.sources)
        moved = once(lambda: self.move({p: realize(values[n]) for p, n in self.sources}))
        return {
            self.base + part: Lazy(shape, dtype, meta, produce=lambda p=part: moved()[p])
            for part, dtype, shape in self.part_specs
        }

    def move(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.dst.join(*self.src.split(parts))  # type: ignore[attr-defined]

    def inverse(self) -> Op:
        return Recode(
            tuple((p, self.base + p) for p, _, _ in self.part_specs),
            self.sources[0][1].removesuffix(self.sources[0][0]),
            self.dst,
            self.src,
            (),
        )


def recode_specs(src: Codec, dst: Codec, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> PartSpecs:
    """Names, dtypes and shapes of the parts Recode writes, from the source parts' (shape, dtype)."""
    meta = {p: torch.empty(shape, dtype=dtype, device="meta") for p, (shape, dtype) in shapes.items()}
    parts = dst.join(*src.split(meta))  # type: ignore[attr-defined]
    return tuple((p, t.dtype, tuple(t.shape)) for p, t in parts.items())


def _fused_from(v: Value, codec: Codec) -> bool:
    """`v` is a decode that a fused kernel can encode into `codec` from the stored parts."""
    return isinstance(v, Lazy) and v.decoded_from is not None and has_fused(v.decoded_from[0], codec, v.dtype)


def _abs_max(w: torch.Tensor) -> torch.Tensor:
    """max |w| in one pass (min/max are exact in any float dtype; NaN propagates)."""
    lo, hi = torch.aminmax(w if w.is_floating_point() else w.float())
    return torch.maximum(-lo.float(), hi.float())


def encode_named(codec: Codec, w: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """codec.encode, with an error naming the weight it was encoding."""
    try:
        return codec.encode(w)
    except MoeportError as exc:
        raise MoeportError(f"{where}: {exc}") from None


def _check_parts(parts, part_specs: PartSpecs, where: str, lead: tuple[int, ...]) -> None:
    for part, dtype, shape in part_specs:
        got = parts[part]
        if got.dtype != dtype or tuple(got.shape) != (*lead, *shape):
            raise MoeportError(f"{where}.{part}: encoded {got.dtype}{list(got.shape)}, planned {list(shape)}")


def refuse_nonfinite(
    codec: Codec, w: torch.Tensor | Callable[[], torch.Tensor], parts: dict, names: list[str], stacked: bool
) -> None:
    """NaN/Inf in a weight reaches the scales of its group or row (they are computed from its
    largest magnitude), so checking the small scale parts finds them without a pass over the
    weight; only then is the weight searched (`w` may be a function giving it), to name the row
    and the count. A codec whose scales sit inside byte blocks (`scales_in_blocks`) has its
    weight searched every time."""
    scales = [t for t in parts.values() if t.dtype in (torch.float32, torch.bfloat16, torch.float16)]
    if getattr(codec, "scales_in_blocks", False):  # GGML's Q8_0...: only the weight can tell
        check_finite_weight(codec, w() if callable(w) else w, names, stacked)
        return
    if all(bool(torch.isfinite(t).all()) for t in scales):
        return
    check_finite_weight(codec, w() if callable(w) else w, names, stacked)
    raise MoeportError(f"{names[0]}: the encoded scales hold NaN/Inf although the weight is finite")


def check_finite_weight(codec: Codec, w: torch.Tensor, names: list[str], stacked: bool) -> None:
    """Refuse NaN/Inf in weights about to be quantized: they would poison the scales of their
    group or row and ship as valid-looking numbers. `w` is one weight, or (`stacked`) one per name."""
    if getattr(codec, "checks_finite", False):
        return  # the codec refuses them itself, naming the row
    bad = ~torch.isfinite(w)
    if not bool(bad.any()):
        return
    index = int(bad.flatten(1).any(1).nonzero()[0]) if stacked else 0
    one = bad[index] if stacked else bad
    rows = one.reshape(-1, one.shape[-1]).any(1)
    raise MoeportError(
        f"{names[index]}: {int(one.sum())} NaN/Inf value(s) in {int(rows.sum())} row(s), first in row "
        f"{int(rows.nonzero()[0])}; quantizing them would corrupt their scales "
        "(--allow-nonfinite to write them anyway)"
    )


def _encode_batch(
    codec: Codec, part_specs: PartSpecs, device: str, allow_nonfinite: bool, batch: list
) -> list[dict]:
    """Encode same-shape weights together: stacked on the device, one encode, one copy back per
    part. When that fails, one by one, so the error names the weight at fault."""
    w = stack_to(device, [realize_on(v, device) for v, _ in batch])
    names = [where for _, where in batch]
    if getattr(codec, "stacked_encode", False):
        try:
            parts = codec.encode(w)
        except MoeportError:
            parts = _one_by_one(codec, w, names)
    else:
        parts = _one_by_one(codec, w, names)
    if not allow_nonfinite:
        refuse_nonfinite(codec, w, parts, names, stacked=True)
    host = {p: to_host(t) for p, t in parts.items()}
    _check_parts(host, part_specs, batch[0][1], (len(batch),))
    return [{p: t[i] for p, t in host.items()} for i in range(len(batch))]


def _one_by_one(codec: Codec, w: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    each = [encode_named(codec, w[i], where) for i, where in enumerate(names)]
    return {p: torch.stack([e[p] for e in each]) for p in each[0]}


def part_specs(codec: Codec, shape: tuple[int, ...], where: str) -> PartSpecs:
    """Names, dtypes and shapes of the encoded parts (encode a small stand-in of the same shape)."""
    stand_in = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    parts = encode_named(codec, stand_in, where)
    return tuple((p, t.dtype, tuple(t.shape)) for p, t in parts.items())
