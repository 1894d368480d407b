"""GGUF block types (Q8_0, Q4_K, IQ4_XS, MXFP4...): gguf-py's own numpy codecs, one weight at a time.

A quantized GGUF tensor is a byte array [.., N, row_bytes]; each row holds K / block_size blocks
of type_size bytes (gguf `GGML_QUANT_SIZES`). The GGUF source presents such a tensor as a `weight`
of U8 plus a companion `ggml_type` whose shape is the type's (block_size, type_size) and whose
bytes all hold the type's id (a zero-copy broadcast of one byte): the logical K follows from the
shapes alone (planning on meta), and the codec reads the id, so a file mixing types (Q4_K_M keeps
some down projections in Q6_K) decodes expert by expert with one format. Decoding and quantizing
are gguf-py's (`gguf.quants.dequantize` / `quantize`), which its authors keep bit-exact with ggml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from moeport.codecs.base import Parts, need
from moeport.codecs.format import REPLICATED, ExpertFormat, Params, Part, RowRule, Shape, StorageFormat
from moeport.errors import MoeportError

MARKER = "ggml_type"


def _gguf():
    import gguf  # imported on use: only GGUF sources and targets need it

    return gguf


def quant_type(name_or_id: str | int) -> Any:
    """gguf's GGMLQuantizationType for a name ('Q8_0', 'q4_k') or an id."""
    types = _gguf().GGMLQuantizationType
    try:
        return types(name_or_id) if isinstance(name_or_id, int) else types[name_or_id.upper()]
    except (KeyError, ValueError):
        raise MoeportError(f"unknown GGML type {name_or_id!r}") from None


def block_geometry(qtype: Any) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    return _gguf().GGML_QUANT_SIZES[qtype]


def marker(qtype: Any) -> torch.Tensor:
    """The `ggml_type` part of a weight of `qtype`: its (block, bytes) shape, every byte the id,
    one byte of memory (a broadcast view)."""
    return torch.tensor(int(qtype), dtype=torch.uint8).expand(block_geometry(qtype))


@dataclass(frozen=True)
class GgmlCodec:
    """A GGML block type. `qtype` None: each weight says its own type in its `ggml_type` part
    (decoding a GGUF source); else that type (encoding the `--to gguf` output)."""

    qtype: Any = None
    name: str = "gguf"
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    @property
    def required(self) -> tuple[str, ...]:
        return ("weight",) if self.qtype is not None else ("weight", MARKER)

    def type_of(self, parts: Parts) -> Any:
        if self.qtype is not None:
            return self.qtype
        return quant_type(int(parts[MARKER].reshape(-1)[0]))

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        qtype = self.type_of(parts)
        data = parts["weight"]
        if data.dtype != torch.uint8:
            raise MoeportError(f"{where}.weight: {qtype.name} data must be bytes (uint8), got {data.dtype}")
        try:
            out = _gguf().quants.dequantize(data.cpu().contiguous().numpy(), qtype)
        except (NotImplementedError, ValueError, AssertionError) as exc:
            raise MoeportError(f"{where}: cannot dequantize GGML {qtype.name} ({exc})") from None
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.qtype is None:
            raise MoeportError("a GGML codec needs its type to encode")
        gguf = _gguf()
        block, _ = block_geometry(self.qtype)
        if weight.shape[-1] % block:
            raise MoeportError(
                f"{self.qtype.name} needs rows of a multiple of {block} values, got {weight.shape[-1]}"
            )
        try:
            q = gguf.quants.quantize(weight.detach().float().cpu().numpy(), self.qtype)
        except gguf.quants.QuantError as exc:
            raise MoeportError(f"cannot quantize to {self.qtype.name} ({exc})") from None
        return {"weight": torch.from_numpy(np.ascontiguousarray(q)), MARKER: marker(self.qtype)}


def _recognize(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    marker, weight = active.get(MARKER), active.get("weight")
    if marker is None:
        return None
    if weight is None or weight.dtype != "U8" or len(marker.shape) < 2:
        raise MoeportError(f"{where}: a '{MARKER}' part needs a U8 'weight' and a (block, bytes) shape")
    return ExpertFormat("gguf")


def _decoded_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    block, size = shapes[MARKER][-2:]
    *lead, rows, row_bytes = shapes["weight"]
    return (*lead, rows, row_bytes // size * block)


def _rules(part: str, params: Params) -> RowRule | None:
    return REPLICATED if part == MARKER else None


GGUF = StorageFormat("gguf", _recognize, _decoded_shape, lambda params: GgmlCodec(), _rules, marker=MARKER)
