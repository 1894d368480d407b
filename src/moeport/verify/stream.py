"""Both sides of a comparison as streams of tensors, paired one tensor at a time.

The source is walked unit by unit of its canonical plan (verify.canonical), one output tensor at a
time; each is paired with the output's tensor of the same name, computed on demand: the output
unit that makes it is applied lazily and only that tensor realised. Fused stacks are re-laid out
before they are decoded (recipes.hf), so a unit shares at most one expert between its outputs.
Memory is therefore about one tensor of each side in float32 plus the comparison's temporaries,
not a layer (`memory_bound`); kt outputs, whose description is read layer by layer, keep one
layer of the output side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from moeport.convert.plan import Plan, apply_unit
from moeport.dtypes import torch_dtype_of
from moeport.mappings.values import Value, realize
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import CanonicalLayer

Item = tuple[int | None, str, torch.Tensor]  # (layer, canonical name, float32 tensor)
CHUNK_FLOAT32 = 16 << 20  # float32 bytes of the chunk of rows verify.compare.measure takes at once


FIXED = 64 << 20  # reading (one expert of a stack at a time), the allocator's slack


def memory_bound(largest: int, held_layer: int = 0) -> int:
    """Bytes a comparison holds beyond the interpreter: the largest tensor (float32 bytes) of each
    side, its per-block error table (1/8 of it), one chunk's float64 temporaries (10x its float32
    bytes), a layer the output side holds (kt), and FIXED."""
    return 2 * largest + largest // 8 + 10 * min(largest, CHUNK_FLOAT32) + held_layer + FIXED


def as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def plan_items(ck: Checkpoint, plan: Plan) -> Iterator[Item]:
    """Every canonical tensor of `plan`, one at a time, in unit order."""
    for unit in plan.units:
        outs = apply_unit(unit, ck)
        for name in list(outs):
            value = outs.pop(name)
            yield unit.layer, name, as_float(realize(value))
            del value


def layer_items(layers: Iterable[CanonicalLayer], keep: set[str] | None = None) -> Iterator[Item]:
    for c in layers:
        for name in list(c.tensors):
            if keep is None or name in keep:
                yield c.layer, name, c.tensors.pop(name)


def largest_float32(plan: Plan) -> int:
    """Bytes of the plan's largest output as float32."""
    return max((4 * _numel(s.shape) for s in plan.specs), default=0)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class PlanSide:
    """The output side of an HF checkpoint: any tensor by name, computed when asked for."""

    def __init__(self, ck: Checkpoint, plan: Plan):
        self.ck, self.units = ck, plan.units
        self.unit_of = {name: i for i, u in enumerate(plan.units) for name in u.op.outputs}
        self.lazy: dict[str, Value] = {}
        self.applied: set[int] = set()
        self.by_layer: dict[int | None, list[int]] = {}
        for i, u in enumerate(plan.units):
            self.by_layer.setdefault(u.layer, []).append(i)

    def take(self, layer: int | None, name: str) -> torch.Tensor | None:
        i = self.unit_of.get(name)
        if i is None:
            return None
        if i not in self.applied:
            self.applied.add(i)
            self.lazy.update(apply_unit(self.units[i], self.ck))
        value = self.lazy.pop(name, None)
        return None if value is None else as_float(realize(value))

    def rounding(self, name: str) -> float:
        """The relative error that storing `name` as a plain 16- or 32-bit float may give: an FP8
        checkpoint cast to BF16 is off by up to 2^-7 in any block, which is no bad scale. 0 for a
        quantized output (codes and scales, FP8 included), whose every check applies."""
        i = self.unit_of.get(name)
        stored = (
            [torch_dtype_of(self.ck.info(k).dtype) for k in self.units[i].op.inputs] if i is not None else []
        )
        if not stored or any(not d.is_floating_point or d.itemsize < 2 for d in stored):
            return 0.0
        return max(torch.finfo(d).eps for d in stored)

    def release(self, layer: int | None) -> list[str]:
        """Names of `layer` never asked for (extra), their lazy values dropped."""
        extra: list[str] = []
        for i in self.by_layer.get(layer, []):
            for name in self.units[i].op.outputs:
                if i not in self.applied:
                    extra.append(name)
                elif self.lazy.pop(name, None) is not None:
                    extra.append(name)
            self.applied.add(i)
        return extra

    def rest(self) -> list[str]:
        return [n for layer in list(self.by_layer) for n in self.release(layer)]


class LayerSide:
    """The output side as canonical layers (kt outputs): one layer held at a time."""

    def __init__(self, layers: Iterable[CanonicalLayer]):
        self.it = iter(layers)
        self.pending: dict[int | None, dict[str, torch.Tensor]] = {}

    def _layer(self, layer: int | None) -> dict[str, torch.Tensor]:
        while layer not in self.pending:
            c = next(self.it, None)
            if c is None:
                return {}
            self.pending[c.layer] = c.tensors
        return self.pending[layer]

    def take(self, layer: int | None, name: str) -> torch.Tensor | None:
        return self._layer(layer).pop(name, None)

    def rounding(self, name: str) -> float:  # kt's weights are quantized: no float rounding bound
        return 0.0

    def release(self, layer: int | None) -> list[str]:
        return list(self.pending.pop(layer, {}))

    def rest(self) -> list[str]:
        names = [n for tensors in self.pending.values() for n in tensors]
        return names + [n for c in self.it for n in c.tensors]
