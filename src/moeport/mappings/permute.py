"""Row permutations as an op of the plan (llama.cpp's q/k order for its RoPE, zoo/gguf_arch.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeport.mappings.ops import OneToOne, Op
from moeport.mappings.values import Lazy, Memo, Value, is_meta, shape_of


@dataclass(frozen=True)
class PermuteRows(OneToOne):
    """Row r of `target` is row `order[r]` of `source` (any dtype: rows of GGML blocks too)."""

    source: str
    target: str
    order: tuple[int, ...]

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)
        if not shape or shape[0] != len(self.order):
            raise ValueError(f"{self.source}: {list(shape)} rows do not match a {len(self.order)}-row order")
        memo = Memo(v)
        rows = torch.tensor(self.order)
        return {self.target: Lazy(shape, v.dtype, is_meta(v), produce=lambda: memo().index_select(0, rows))}

    def inverse(self) -> Op:
        inverse = torch.argsort(torch.tensor(self.order))
        return PermuteRows(self.target, self.source, tuple(inverse.tolist()))
