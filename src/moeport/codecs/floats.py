"""bf16 / fp16 / fp32 weights: decode is exact; encode is torch's cast (round-to-nearest-even)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from moeport.codecs.base import Parts, check_dtype, need

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
