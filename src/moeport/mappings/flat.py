"""Expert stacks stored flat, one 2-D parameter [E * N, K] per role (DBRX's `ffn.experts.mlp.w1`).

`Unflatten` views such a parameter as the [E, N, K] stack the other expert ops take, and `Flatten`
is its inverse; the bytes are the same, in the same order (a row-major view), so a round trip
through them is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeport.errors import MoeportError
from moeport.mappings.ops import OneToOne, Op
from moeport.mappings.values import Lazy, Memo, Value, derived, fill_into, is_meta, shape_of


@dataclass(frozen=True)
class Unflatten(OneToOne):
    """[E * N, K] -> [E, N, K]; item e is rows e*N:(e+1)*N of the source."""

    source: str
    target: str
    experts: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)
        if len(shape) != 2 or shape[0] % self.experts:
            raise MoeportError(
                f"{self.source}: shape {list(shape)}, expected [{self.experts} * N, K] (one 2-D "
                f"parameter holding {self.experts} experts' rows)"
            )
        rows = shape[0] // self.experts
        memo = Memo(v)
        stack = (self.experts, rows, shape[1])
        return {self.target: derived(memo, stack, v.dtype, is_meta(v), lambda x: x.view(stack))}

    def inverse(self) -> Op:
        return Flatten(self.target, self.source, self.experts)


@dataclass(frozen=True)
class Flatten(OneToOne):
    """[E, N, K] -> [E * N, K], filled in place (a stack fills each expert's rows directly)."""

    source: str
    target: str
    experts: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)
        if len(shape) != 3 or shape[0] != self.experts:
            why = f"expected a stack of {self.experts} experts to flatten"
            raise MoeportError(f"{self.source}: shape {list(shape)}, {why}")
        flat = (shape[0] * shape[1], shape[2])
        return {self.target: Lazy(flat, v.dtype, is_meta(v), fill=lambda out: fill_into(v, out.view(shape)))}

    def inverse(self) -> Op:
        return Unflatten(self.target, self.source, self.experts)
