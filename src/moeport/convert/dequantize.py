"""Dequantizing as a step of a conversion: `Decode` (parts -> float tensor) and `Cast`.

Both produce lazy values (see mappings.values), so a decoded expert is written straight into its
slice of a stacked output. A 3-D (stacked experts) weight is decoded one expert at a time: the
float32 temporary is one expert, never the layer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from moeport.codecs.base import Codec
from moeport.codecs.format import PASSIVE_PARTS, ExpertFormat, Part
from moeport.codecs.registry import FLOAT_FORMATS, QUANTIZED_MARKERS, classify, codec_for
from moeport.codecs.registry import decoded_shape as decoded_shape  # re-exported for hf and kt
from moeport.convert.batching import Batcher, active_batcher, items_per_batch
from moeport.device import stack_to, to_device, to_host
from moeport.errors import MoeportError
from moeport.mappings.ops import OneToOne, Op
from moeport.mappings.values import DeviceLazy, Lazy, Value, is_meta, realize, realize_on, shape_of
from moeport.parallel import fan_out

# Activation-quantization parameters: meaningless once weights are dequantized.
ACTIVATION_PARTS = frozenset({"input_scale", "input_global_scale", "activation_scale"})


@dataclass(frozen=True)
class Decode(Op):
    """Parts of one weight (2-D, or 3-D stacked experts) -> a float tensor of `dtype`."""

    parts: tuple[tuple[str, str], ...]  # (part, source name)
    target: str
    fmt: ExpertFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    transpose: bool = False  # GPT-OSS: unquantized experts are stored [E, K, N]
    device: str = "cpu"

    @functools.cached_property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(name for _, name in self.parts)

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.target,)

    @functools.cached_property
    def codec(self) -> Codec:
        return codec_for(self.fmt)

    @property
    def where(self) -> str:
        """The source weight's name for errors: its parts' common prefix ('...up_proj')."""
        part, name = self.parts[0]
        return name.removesuffix(part).rstrip(".")

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        named = {part: values[name] for part, name in self.parts}
        meta = any(is_meta(v) for v in named.values())
        codec = self.codec
        shape = (*self.shape[:-2], self.shape[-1], self.shape[-2]) if self.transpose else self.shape

        batcher = active_batcher()
        if batcher is not None and not meta and len(self.shape) == 2:
            return {self.target: self._batched(batcher, named, codec, shape)}

        def fill(out: torch.Tensor) -> None:
            tensors = {p: to_device(realize(v), self.device) for p, v in named.items()}
            if len(self.shape) == 2:
                _decode_into(codec, tensors, out, self.transpose, self.where)
                return
            experts = self.shape[0]
            if self.device != "cpu" and codec.stacked_decode:
                # a GPU decodes a chunk of experts per call, with one copy back per chunk
                step = items_per_batch(math.prod(self.shape[1:]))
                for e in range(0, experts, step):
                    chunk = slice(e, min(e + step, experts))
                    one = {p: t[chunk] if t.ndim and t.shape[0] == experts else t for p, t in tensors.items()}
                    where = f"{self.where}[{chunk.start}:{chunk.stop}]"
                    _decode_into(codec, one, out[chunk], self.transpose, where)
                return

            def one(e: int) -> None:
                item = {p: t[e] if t.ndim and t.shape[0] == experts else t for p, t in tensors.items()}
                _decode_into(codec, item, out[e], self.transpose, f"{self.where}[{e}]")

            fan_out([functools.partial(one, e) for e in range(experts)])  # experts in parallel

        origin = None
        if (
            len(self.shape) == 2
            and not self.transpose
            and self.dtype in (torch.float32, torch.bfloat16)
            and self.device == "cpu"
        ):
            origin = (codec, named, self.where)
        return {self.target: Lazy(shape, self.dtype, meta, fill=fill, decoded_from=origin)}

    def _batched(self, batcher: Batcher, named: dict[str, Value], codec: Codec, shape) -> DeviceLazy:
        """Submit this decode to the batcher (see convert.batching); the value stays on the device
        for a consumer that computes there, and comes to the host in one copy per batch."""
        key = ("decode", self.fmt.describe(), tuple((p, shape_of(v)) for p, v in named.items()))
        key += (self.dtype, self.transpose)
        run = functools.partial(_decode_batch, codec, self.dtype, self.transpose, batcher.device)
        get = batcher.submit(key, (named, self.where), math.prod(shape), run)
        return DeviceLazy(shape, self.dtype, produce=lambda: get().host(), on_device=lambda: get().device())

    def inverse(self) -> Op:
        raise MoeportError(f"{self.target}: dequantizing is lossy and has no inverse")


class BatchItem:
    """Item `index` of a batch computed on the device; the host copy is made once per batch."""

    def __init__(self, batch: BatchResult, index: int):
        self._batch, self._index = batch, index

    def device(self) -> torch.Tensor:
        return self._batch.on_device[self._index]

    def host(self) -> torch.Tensor:
        return self._batch.host()[self._index]


class BatchResult:
    def __init__(self, on_device: torch.Tensor):
        self.on_device = on_device
        self._host: torch.Tensor | None = None

    def host(self) -> torch.Tensor:
        if self._host is None:
            self._host = to_host(self.on_device)
        return self._host

    def items(self) -> list[BatchItem]:
        return [BatchItem(self, i) for i in range(self.on_device.shape[0])]


def _decode_batch(
    codec: Codec, dtype: torch.dtype, transpose: bool, device: str, batch: list[tuple[dict, str]]
) -> list[BatchItem]:
    names = [where for _, where in batch]
    stacked = {p: stack_to(device, [realize_on(named[p], device) for named, _ in batch]) for p in batch[0][0]}
    w = decode_stacked(codec, stacked, names)
    w = w.transpose(-1, -2) if transpose else w
    return BatchResult(w.to(dtype).contiguous()).items()


def decode_stacked(codec: Codec, stacked: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Decode a stack of same-shape weights (parts stacked along a new first dim) in one call when
    the codec takes a stack; otherwise, or when that call fails, one by one, so that an error
    names the weight at fault (`names`, one per weight)."""
    if codec.stacked_decode:
        try:
            return codec.decode(stacked, names[0])
        except MoeportError:
            pass
    return torch.stack(
        [codec.decode({p: t[i] for p, t in stacked.items()}, where) for i, where in enumerate(names)]
    )


def _decode_into(
    codec: Codec, parts: dict[str, torch.Tensor], out: torch.Tensor, transpose: bool, where: str
) -> None:
    into = getattr(codec, "decode_into", None)  # straight into `out`: no float32 temporary
    if into is not None and not transpose and into(parts, out, where):
        return
    w = codec.decode(parts, where)
    w = w.transpose(-1, -2) if transpose else w
    # cast where the math ran (fewer bytes over PCIe), then one copy into the output
    out.copy_(to_host(w.to(out.dtype)) if w.device != out.device else w)


@dataclass(frozen=True)
class Cast(OneToOne):
    source: str
    target: str
    dtype: torch.dtype

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        return {
            self.target: Lazy(shape_of(v), self.dtype, is_meta(v), fill=lambda out: out.copy_(realize(v)))
        }

    def inverse(self) -> Op:
        raise MoeportError(f"{self.target}: a dtype cast is not inverted (it may be lossy)")


def weight_format(parts: dict[str, Part], quant: dict, where: str) -> ExpertFormat | None:
    """The format of a group of tensors sharing a prefix, or None when it is not a quantized weight."""
    weight = parts.get("weight")
    quantized = any(m in parts for m in QUANTIZED_MARKERS) or (
        weight is not None and weight.dtype not in ("BF16", "F16", "F32", "F64")
    )
    if not quantized:
        return None
    fmt = classify(parts, quant, where)
    return None if fmt.name in FLOAT_FORMATS else fmt


def active_parts(parts: dict[str, str]) -> dict[str, str]:
    return {p: n for p, n in parts.items() if p not in PASSIVE_PARTS}
