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
from moeport.codecs.fp4 import pack_nibbles, unpack_nibbles
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
    scales_in_blocks: ClassVar[bool] = True  # no float part shows NaN/Inf: encode.refuse_nonfinite

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
        try:  # NaN/Inf are refused by the caller, naming the weight (not numpy's warnings)
            with np.errstate(all="ignore"):
                q = gguf.quants.quantize(weight.detach().float().cpu().numpy(), self.qtype)
        except gguf.quants.QuantError as exc:
            raise MoeportError(f"cannot quantize to {self.qtype.name} ({exc})") from None
        return {"weight": torch.from_numpy(np.ascontiguousarray(q)), MARKER: marker(self.qtype)}

    # Lossless moves (convert.encode.Recode): GGML rows go as they are stored, with their type
    # marker; joining into a typed codec checks that the rows are of its type.
    kind: ClassVar[str] = "ggml"

    def split(self, parts: Parts) -> tuple[torch.Tensor, torch.Tensor, None]:
        return parts["weight"], parts[MARKER] if MARKER in parts else marker(self.qtype), None

    def join(self, rows: torch.Tensor, type_marker: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        if self.qtype is None:
            return {"weight": rows, MARKER: type_marker}
        if not type_marker.is_meta and int(type_marker.reshape(-1)[0]) != int(self.qtype):
            got = quant_type(int(type_marker.reshape(-1)[0])).name
            raise MoeportError(f"GGML {got} rows cannot be copied as {self.qtype.name}")
        return {"weight": rows}


@dataclass(frozen=True)
class GgmlMxfp4Codec:
    """GGML's MXFP4 rows, as one more MXFP4 layout (`kind` mxfp4): lossless moves from and to the
    HF-side ones (compressed-tensors, GPT-OSS, DeepSeek-V4) re-pack the same E2M1 codes and E8M0
    scales. A GGML block of 32 values is 17 bytes: the E8M0 byte, then 16 bytes whose low nibble is
    element j and high nibble element j + 16 (gguf.quants.MXFP4; llama.cpp's GptOssModel repacks
    GPT-OSS's blocks so), where HF-side layouts put elements 2j / 2j + 1 in one byte."""

    name: str = "gguf-mxfp4"
    required: tuple[str, ...] = ("weight",)
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False
    kind: ClassVar[str] = "mxfp4"
    scales_in_blocks: ClassVar[bool] = True

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        return GgmlCodec(quant_type("MXFP4")).decode(parts, where)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": GgmlCodec(quant_type("MXFP4")).encode(weight)["weight"]}

    def split(self, parts: Parts) -> tuple[torch.Tensor, torch.Tensor, None]:
        w = parts["weight"]
        blocks = w.reshape(*w.shape[:-1], w.shape[-1] // 17, 17)
        qs = blocks[..., 1:]
        codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1).flatten(-2)  # [.., N, K] in element order
        return pack_nibbles(codes), blocks[..., 0].contiguous(), None

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        codes = unpack_nibbles(packed)
        g = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 32)
        qs = g[..., :16] | (g[..., 16:] << 4)
        blocks = torch.cat((scales.view(torch.uint8).unsqueeze(-1), qs), dim=-1)
        return {"weight": blocks.flatten(-2)}


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
