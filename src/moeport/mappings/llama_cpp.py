"""llama.cpp's re-arrangements of hub tensors as ops of the plan (zoo/gguf_arch.py says why):
the llama arch's q/k row order for its RoPE, and MLA's kv_b_proj split into k_b and v_b."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeport.errors import MoeportError
from moeport.mappings.ops import ManyToOne, OneToMany, OneToOne, Op
from moeport.mappings.values import Lazy, Memo, Value, is_meta, shape_of
from moeport.parallel import once
from moeport.zoo.gguf_arch import merge_kv_b, split_kv_b


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
            want = len(self.order)
            raise MoeportError(f"{self.source}: {list(shape)} does not have the {want} rows to permute")
        memo = Memo(v)
        rows = torch.tensor(self.order)
        return {self.target: Lazy(shape, v.dtype, is_meta(v), produce=lambda: memo().index_select(0, rows))}

    def inverse(self) -> Op:
        inverse = torch.argsort(torch.tensor(self.order))
        return PermuteRows(self.target, self.source, tuple(inverse.tolist()))


@dataclass(frozen=True)
class SplitKvB(OneToMany):
    """MLA's kv_b_proj -> llama.cpp's k_b (transposed) and v_b (zoo.gguf_arch.split_kv_b)."""

    source: str
    targets: tuple[str, ...]  # (k_b, v_b)
    heads: int
    nope: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        rows, lora = shape_of(v)
        if rows % self.heads or rows // self.heads <= self.nope:
            raise MoeportError(f"{self.source}: {rows} rows do not hold {self.heads} heads of {self.nope}+v")
        per = rows // self.heads
        memo = Memo(v)
        both = once(lambda: split_kv_b(memo(), self.heads, self.nope))
        k, val = self.targets
        return {
            k: Lazy((self.heads, lora, self.nope), v.dtype, is_meta(v), produce=lambda: both()[0]),
            val: Lazy((self.heads, per - self.nope, lora), v.dtype, is_meta(v), produce=lambda: both()[1]),
        }

    def inverse(self) -> Op:
        return MergeKvB(self.targets, self.source, self.heads, self.nope)


@dataclass(frozen=True)
class MergeKvB(ManyToOne):
    """k_b and v_b back into kv_b_proj (zoo.gguf_arch.merge_kv_b)."""

    sources: tuple[str, ...]  # (k_b, v_b)
    target: str
    heads: int
    nope: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        k, v = (values[s] for s in self.sources)
        (heads, lora, nope), per_v = shape_of(k), shape_of(v)[1]
        memos = Memo(k), Memo(v)
        shape = (heads * (nope + per_v), lora)
        return {
            self.target: Lazy(shape, k.dtype, is_meta(k), produce=lambda: merge_kv_b(*(m() for m in memos)))
        }

    def inverse(self) -> Op:
        return SplitKvB(self.target, self.sources, self.heads, self.nope)
