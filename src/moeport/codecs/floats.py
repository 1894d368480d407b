"""bf16 / fp16 / fp32 weights: decode is exact; encode is torch's cast (round-to-nearest-even).

A float weight is a lone `weight` of a float dtype; fp64 is recognised but has no codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs.base import Parts, check_dtype, need
from moeport.codecs.format import ExpertFormat, Params, Part, Shape, StorageFormat

FLOAT_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class FloatCodec:
    name: str = "bf16"
    required: tuple[str, ...] = ("weight",)
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    @property
    def dtype(self) -> torch.dtype:
        return FLOAT_TYPES[self.name]

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w = parts["weight"]
        check_dtype(w, (torch.bfloat16, torch.float16, torch.float32), where, "weight")
        return w.float()

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": weight.to(self.dtype)}


def _float_format(name: str, dtype: str) -> StorageFormat:
    """A lone `weight` of safetensors dtype `dtype` (any companion makes it something else)."""

    def recognize(
        active: dict[str, Part], quant: dict[str, Any], method: str, where: str
    ) -> ExpertFormat | None:
        weight = active.get("weight")
        if weight is None or weight.dtype != dtype or len(active) != 1:
            return None
        return ExpertFormat(name)

    def shape(shapes: dict[str, Shape], params: Params) -> Shape:
        return shapes["weight"]

    codec = (lambda params: FloatCodec(name)) if name in FLOAT_TYPES else None
    return StorageFormat(name, recognize, shape, codec, is_float=True)


BF16 = _float_format("bf16", "BF16")
FP16 = _float_format("fp16", "F16")
FP32 = _float_format("fp32", "F32")
FP64 = _float_format("fp64", "F64")
FORMATS = (BF16, FP16, FP32, FP64)
