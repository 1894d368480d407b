"""The zero-compute experts' rows of a fused gate_up stack (LongCat-Flash: detect/zero_experts.py).

transformers 5.24's `gate_up_proj` holds E + Z experts, the last Z never read (identity experts);
5.25's holds E, as the Hub's per-expert form does (zoo/zero_rows.py asks the installed one). Where
transformers holds them, fusing pads the stack with Z zero experts (`PadExperts`: what they
hold does not matter, transformers' forward never reads them, so zeros, not invented data);
unfusing leaves them out (`CropExperts`). Each is the other's inverse; hub -> fused -> hub is
bit-identical, fused -> hub -> fused gives the Z rows back as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeport.mappings.experts import LayerNames, Parts
from moeport.mappings.ops import Chain, OneToOne, Op
from moeport.mappings.values import Lazy, Memo, Value, derived, fill_into, is_meta, shape_of
from moeport.zoo.zero_rows import fused_holds_zero_experts

ROUTED = "#routed"  # the name of a stack cut to its routed experts


@dataclass(frozen=True)
class PadExperts(OneToOne):
    """[E, ...] -> [E + extra, ...], the extra experts zero."""

    source: str
    target: str
    extra: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)

        def fill(out) -> None:
            fill_into(v, out[: shape[0]])
            out[shape[0] :].zero_()

        return {self.target: Lazy((shape[0] + self.extra, *shape[1:]), v.dtype, is_meta(v), fill=fill)}

    def inverse(self) -> Op:
        return CropExperts(self.target, self.source, self.extra)


@dataclass(frozen=True)
class CropExperts(OneToOne):
    """[E + extra, ...] -> [E, ...]: the last `extra` experts left out (read one at a time where
    the source allows it)."""

    source: str
    target: str
    extra: int

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        shape = shape_of(v)
        kept = (shape[0] - self.extra, *shape[1:])
        if isinstance(v, Lazy) and v.select is not None and not v.meta:
            return {self.target: Lazy(kept, v.dtype, produce=lambda: v.realize()[: kept[0]], select=v.select)}
        return {self.target: derived(Memo(v), kept, v.dtype, is_meta(v), lambda x: x[: kept[0]])}

    def inverse(self) -> Op:
        return PadExperts(self.target, self.source, self.extra)


def zero_rows_moved(zero: int, held: int, model_type: str, src_kind: str, dst_kind: str) -> tuple[int, int]:
    """(rows to cut from the source's fused gate_up stacks, rows to pad the written ones with) when
    the layout kind changes: the rows the source holds (`held`: Z from transformers 5.24, 0 from
    5.25), and Z where the installed transformers allocates them."""
    if not zero or src_kind == dst_kind:
        return 0, 0
    pad = zero if dst_kind == "fused" and fused_holds_zero_experts(model_type) else 0
    return (held if src_kind == "fused" else 0), pad


def crop_zero_experts(
    parts: Parts, zero: int, shapes: dict[str, tuple[int, ...]], shape_of_name
) -> tuple[Parts, dict[str, Op]]:
    """A fused source's gate_up parts cut to the routed experts (named `<name>#routed`, their
    shapes recorded in `shapes`), and the crop op producing each, by that name."""
    if not zero or (-1, "gate_up") not in parts:
        return parts, {}
    crops: dict[str, Op] = {}
    cut: dict[str, str] = {}
    for part, name in parts[(-1, "gate_up")].items():
        crops[name + ROUTED] = CropExperts(name, name + ROUTED, zero)
        full = shape_of_name(name)
        shapes[name + ROUTED] = (full[0] - zero, *full[1:])
        cut[part] = name + ROUTED
    return {**parts, (-1, "gate_up"): cut}, crops


def with_crops(ops: list[Op], crops: dict[str, Op]) -> list[Op]:
    """Each op reading a cut stack, preceded by its crop."""
    if not crops:
        return ops
    return [Chain((*(crops[i] for i in op.inputs if i in crops), op)) for op in ops]


def pad_zero_experts(ops: list[Op], dst: LayerNames, zero: int, parts: tuple[str, ...]) -> list[Op]:
    """The ops writing a fused gate_up stack (each of its `parts`), followed by the zero experts' rows."""
    if not zero:
        return ops
    stacks = {dst.fused("gate_up", p) for p in parts}
    out: list[Op] = []
    for op in ops:
        padded = [PadExperts(o, o, zero) for o in op.outputs if o in stacks]
        out.append(Chain((op, *padded)) if padded else op)
    return out
