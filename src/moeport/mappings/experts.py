"""Routed experts of one layer from one zoo layout to another, as a chain of invertible ops.

per-expert -> fused: for each companion part, gate and up rows of every expert are concatenated
(`Concat`, with the part's RowRule) and the experts stacked (`Stack`); down is stacked.
fused -> per-expert is literally the inverse of the chain the forward direction would build, so
the two directions cannot drift apart. Layouts are zoo data; there is no per-model code here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from moeport.codecs.format import ExpertFormat
from moeport.codecs.registry import FLOAT_FORMATS, hub_part
from moeport.errors import MoeportError
from moeport.mappings.flat import Flatten
from moeport.mappings.ops import Chain, Concat, Copy, Op, Stack, Transpose
from moeport.mappings.rules import row_rules
from moeport.zoo.families import ROLES, ExpertLayout

FUSED_ROLES = {"gate": "gate_up", "up": "gate_up", "down": "down"}


def roles_in(layout: ExpertLayout, fused_role: str) -> list[str]:
    """The per-expert roles a fused stack holds: gate and up in gate_up; itself otherwise (not
    gated, or gate and up stacked apart)."""
    return [r for r in ROLES if FUSED_ROLES[r] == fused_role] if "gate_up" in layout.projs else [fused_role]


@dataclass(frozen=True)
class LayerNames:
    """Names of one layer's expert tensors under a layout (prefix is the layer, e.g. 'model.layers.3.')."""

    layout: ExpertLayout
    prefix: str
    offset: int = 0  # per-expert index of expert 0 (an expert group's range of the layer's list)

    def per_expert(self, e: int, role: str, part: str) -> str:
        part = part[1:] if part.startswith("_") else part
        return f"{self.prefix}{self.layout.expert_base}{e + self.offset}.{self.layout.proj_dot(role)}{part}"

    def fused(self, fused_role: str, part: str) -> str:
        name = f"{self.prefix}{self.layout.base}{self.layout.projs[fused_role]}"
        if self.layout.dotted:  # a module's parameters: `input_linear.weight`
            return f"{name}.{part.removeprefix('_')}"
        return f"{name}{fused_suffix(part)}"


def fused_suffix(part: str) -> str:
    """transformers' fused names: weight -> '', weight_scale_inv -> '_scale_inv', bias -> '_bias'."""
    if part == "weight":
        return ""
    if part.startswith("weight_"):
        return part[len("weight") :]
    return part if part.startswith("_") else f"_{part}"


# parts: role -> {part: source name}; per-expert roles are (e, "gate"|"up"|"down"),
# fused roles are (-1, "gate_up"|"down").
Parts = dict[tuple[int, str], dict[str, str]]
ShapeOf = Callable[[str], tuple[int, ...]]
RowsOf = Callable[[dict[str, str]], int]  # logical output rows N of a weight given its parts


def relayout_experts(
    parts: Parts,
    experts: int,
    src: LayerNames,
    dst: LayerNames,
    fmt: ExpertFormat,
    shape_of: ShapeOf,
    rows_of: RowsOf,
) -> list[Op]:
    """Ops taking the expert tensors named in `parts` (laid out as `src`) to `dst` names."""
    if src.layout.groups or dst.layout.groups:  # each expert group's range on its own
        return [
            op
            for group in _groups(parts, experts, src, dst)
            for op in relayout_experts(*group, fmt, shape_of, rows_of)
        ]
    kind_src, kind_dst = src.layout.kind, dst.layout.kind
    if src.layout.gated != dst.layout.gated:
        raise MoeportError(f"{src.prefix}: gated and non-gated expert layouts do not convert into each other")
    apart = src.layout.split_gate_up or dst.layout.split_gate_up  # Step-3.7: gate, up stacks
    if (not src.layout.gated or apart) and kind_src != kind_dst:
        return _restack(parts, experts, src, dst, fmt, shape_of)
    if apart and src.layout.split_gate_up != dst.layout.split_gate_up:
        return _join(parts, src, dst, fmt, shape_of, rows_of)
    if kind_src == kind_dst == "per-expert":
        return [
            Copy(name, dst.per_expert(e, role, part))
            for (e, role), group in parts.items()
            for part, name in group.items()
        ]
    if kind_src == kind_dst == "fused":
        if src.layout.gate_up_interleaved != dst.layout.gate_up_interleaved:
            return _reorder(parts, experts, src, dst, fmt, shape_of, rows_of)
        # Qwen3-VL-MoE: the Hub's stacks are [E, H, 2I], transformers holds [E, 2I, H]
        flip = src.layout.transposed != dst.layout.transposed
        if flip and fmt.name not in FLOAT_FORMATS:
            raise MoeportError(f"{src.prefix}: transposing {fmt.name} expert stacks is not supported")
        return [
            (Transpose if flip and part == "weight" else Copy)(name, dst.fused(role, part))
            for (_, role), group in parts.items()
            for part, name in group.items()
        ]
    if kind_src == "per-expert":
        _check_companions(parts, experts)
        return _fuse(parts, experts, src, dst, fmt, shape_of, rows_of)
    # fused -> per-expert: the inverse of fusing `dst`-named experts into these fused tensors.
    per_expert, per_shape, rows = _unfused(parts, experts, src, dst, fmt, shape_of, rows_of)
    # the fused names are the actual inputs (they may be intermediates, e.g. decoded tensors)
    forward = _fuse(
        per_expert,
        experts,
        dst,
        src,
        fmt,
        per_shape.__getitem__,
        lambda _: rows // 2,
        fused_name=lambda role, part: parts[(-1, role)][part],
    )
    return [op.inverse() for op in forward]


def _groups(
    parts: Parts, experts: int, src: LayerNames, dst: LayerNames
) -> list[tuple[Parts, int, LayerNames, LayerNames]]:
    """(parts, experts, src, dst) of each expert group: its fused stacks (key -1 - g in `parts`)
    as a plain fused layout, and its contiguous range of per-expert names, renumbered from 0."""
    grouped = src.layout if src.layout.groups else dst.layout
    if src.layout.groups and dst.layout.groups and src.layout.groups != dst.layout.groups:
        raise MoeportError(f"{src.prefix}: expert groups {src.layout.groups} and {dst.layout.groups} differ")
    count = len(grouped.groups)
    if experts % count:
        raise MoeportError(f"{src.prefix}: {experts} experts do not split into {count} equal groups")
    per = experts // count
    out = []
    for g in range(count):
        sides = []
        for names in (src, dst):
            if names.layout.groups:
                sides.append(LayerNames(names.layout.group(g), names.prefix))
            else:
                sides.append(LayerNames(names.layout, names.prefix, names.offset + g * per))
        if src.layout.groups:
            mine = {(-1, role): group for (k, role), group in parts.items() if k == -1 - g}
        else:
            mine = {
                (e - g * per, r): group for (e, r), group in parts.items() if g * per <= e < (g + 1) * per
            }
        out.append((mine, per, sides[0], sides[1]))
    return out


def _reorder(
    parts: Parts, experts: int, src: LayerNames, dst: LayerNames, fmt: ExpertFormat, shape_of, rows_of
) -> list[Op]:
    """Fused stacks to fused stacks whose gate/up rows are ordered otherwise (Inkling's hub
    alternates them, transformers holds gate then up): each stack is cut into its experts' gate
    and up (named under the layer's `#split.` scratch prefix) and fused again, one chain per
    stored part, so the rows are re-ordered by the same ops that fuse and split experts."""
    scratch = LayerNames(_SCRATCH, f"{src.prefix}#split.")
    per_expert, per_shape, rows = _unfused(parts, experts, src, scratch, fmt, shape_of, rows_of)
    cut = relayout_experts(parts, experts, src, scratch, fmt, shape_of, rows_of)
    fused = _fuse(per_expert, experts, scratch, dst, fmt, per_shape.__getitem__, lambda _: rows // 2)
    out: list[Op] = []
    for op in cut:
        (again,) = [f for f in fused if set(f.inputs) <= set(op.outputs)]
        out.append(Chain((op, again)))
    return out


_SCRATCH = ExpertLayout("per-expert", "", {"gate": "gate", "up": "up", "down": "down"})


def _unfused(
    parts: Parts, experts: int, src: LayerNames, dst: LayerNames, fmt: ExpertFormat, shape_of, rows_of
) -> tuple[Parts, dict[str, tuple[int, ...]], int]:
    """The per-expert parts (named as `dst`) fused stacks hold, each one's shape, and the
    fused gate_up rows."""
    gate_up = parts.get((-1, "gate_up"))
    down = parts.get((-1, "down"))
    if gate_up is None or down is None:
        raise MoeportError(f"{src.prefix}: fused experts need both gate_up and down tensors")
    # a transposed fused weight (GPT-OSS float [E, H, 2I]) holds its rows in the last dim
    transposed = src.layout.transposed and fmt.name in FLOAT_FORMATS
    rows = shape_of(gate_up["weight"])[-1] if transposed else rows_of(gate_up)
    if rows % 2:
        raise MoeportError(f"{src.fused('gate_up', 'weight')}: {rows} rows cannot be split into gate and up")
    per_expert: Parts = {}
    for e in range(experts):
        for role in ROLES:
            group = gate_up if role != "down" else down
            per_expert[(e, role)] = {part: dst.per_expert(e, role, hub_part(fmt, part)) for part in group}
    # One expert's part has the fused part's shape minus the expert dim (only its rank matters here).
    per_shape = {
        name: shape_of(parts[(-1, FUSED_ROLES[role])][part])[1:]
        for (_, role), group in per_expert.items()
        for part, name in group.items()
    }
    return per_expert, per_shape, rows


def _fuse(
    parts: Parts,
    experts: int,
    src: LayerNames,
    dst: LayerNames,
    fmt: ExpertFormat,
    shape_of: ShapeOf,
    rows_of: RowsOf,
    fused_name: Callable[[str, str], str] | None = None,
) -> list[Op]:
    name = fused_name or dst.fused
    ref = parts[(0, "gate")]
    rules = row_rules(fmt, {p: shape_of(n) for p, n in ref.items()}, src.per_expert(0, "gate", "weight"))
    if src.layout.transposed:
        raise MoeportError(f"{src.prefix}: per-expert tensors cannot be transposed")
    # only float weights are stored transposed (GPT-OSS BF16 [E, H, 2I]; its MXFP4 keeps [E, 2I, ..])
    transposed = dst.layout.transposed and fmt.name in FLOAT_FORMATS

    def stack(sources: tuple[str, ...], target: str, part: str) -> list[Op]:
        """Stack experts; a transposed layout's weights [E, N, K] -> [E, K, N] (biases stay)."""
        if not transposed or part != "weight":
            return [Stack(sources, target)]
        return [Stack(sources, f"{target}#rows"), Transpose(f"{target}#rows", target)]

    ops: list[Op] = []
    for part, rule in rules.items():
        target = name("gate_up", part)
        concats: list[Op] = []
        for e in range(experts):
            gate, up = parts[(e, "gate")], parts[(e, "up")]
            rows = (rows_of(gate), rows_of(up))
            concats.append(
                Concat((gate[part], up[part]), f"{target}#{e}", rule, rows, dst.layout.gate_up_interleaved)
            )
        ops.append(Chain((*concats, *stack(tuple(c.outputs[0] for c in concats), target, part))))
    for part in parts[(0, "down")]:
        sources = tuple(parts[(e, "down")][part] for e in range(experts))
        down = stack(sources, name("down", part), part)
        ops.append(down[0] if len(down) == 1 else Chain(tuple(down)))
    return ops


def _join(
    parts: Parts, src: LayerNames, dst: LayerNames, fmt: ExpertFormat, shape_of: ShapeOf, rows_of: RowsOf
) -> list[Op]:
    """Separate gate and up stacks [E, I, H] into one gate_up stack (its rows gate then up, or
    alternating), down copied; the other way round it is the inverse of that."""
    if src.layout.transposed or dst.layout.transposed:
        raise MoeportError(f"{src.prefix}: joining transposed gate and up stacks is not supported")
    if src.layout.split_gate_up:
        gate, up = parts[(-1, "gate")], parts[(-1, "up")]
        rows = (rows_of(gate), rows_of(up))
        names = {"gate": gate, "up": up, "gate_up": {p: dst.fused("gate_up", p) for p in gate}}
    else:
        joined = parts[(-1, "gate_up")]
        rows = (rows_of(joined) // 2,) * 2
        names = {r: {p: dst.fused(r, p) for p in joined} for r in ("gate", "up")}
        names["gate_up"] = joined
    if set(names["gate"]) != set(names["up"]):
        raise MoeportError(f"{src.prefix}: gate and up stacks carry different parts")
    stored = parts[(-1, "gate")] if src.layout.split_gate_up else parts[(-1, "gate_up")]
    rules = row_rules(fmt, {p: shape_of(n)[1:] for p, n in stored.items()}, next(iter(stored.values())))
    interleave = (src.layout if "gate_up" in src.layout.projs else dst.layout).gate_up_interleaved
    ops: list[Op] = [
        Concat((names["gate"][p], names["up"][p]), names["gate_up"][p], rule, rows, interleave)
        for p, rule in rules.items()
    ]
    if not src.layout.split_gate_up:
        ops = [op.inverse() for op in ops]
    return ops + [Copy(name, dst.fused("down", part)) for part, name in parts[(-1, "down")].items()]


def _restack(
    parts: Parts, experts: int, src: LayerNames, dst: LayerNames, fmt: ExpertFormat, shape_of: ShapeOf
):
    """Experts stacked one stack per role (up, down; gate, up, down stacked apart; DBRX's flat
    [E * N, K] ones): each role's experts stacked, or unstacked as the inverse."""
    fused = src.layout if src.layout.kind == "fused" else dst.layout
    if (fused.flat or fused.transposed_roles) and fmt.name not in FLOAT_FORMATS:
        raise MoeportError(f"{src.prefix}: {fmt.name} experts in flat or transposed stacks are not supported")
    if src.layout.kind == "per-expert":
        _check_companions(parts, experts, src.layout.roles)
        return _stack_roles(parts, experts, dst.layout, fmt, dst.fused)
    per_expert: Parts = {
        (e, role): {part: dst.per_expert(e, role, hub_part(fmt, part)) for part in parts[(-1, role)]}
        for e in range(experts)
        for role in dst.layout.roles
    }
    forward = _stack_roles(per_expert, experts, src.layout, fmt, lambda role, part: parts[(-1, role)][part])
    return [op.inverse() for op in forward]


def _stack_roles(
    parts: Parts, experts: int, fused: ExpertLayout, fmt: ExpertFormat, name: Callable[[str, str], str]
) -> list[Op]:
    ops: list[Op] = []
    for role in fused.fused_roles:
        for part in parts[(0, role)]:
            sources = tuple(parts[(e, role)][part] for e in range(experts))
            flip = part == "weight" and fmt.name in FLOAT_FORMATS and fused.role_transposed(role)
            ops.append(_stacked(sources, name(role, part), flip, experts if fused.flat else 0))
    return ops


def _stacked(sources: tuple[str, ...], target: str, flip: bool, flat: int) -> Op:
    """Experts [N, K] stacked into `target` [E, N, K]; flip: stored [E, K, N]; flat (the expert
    count, 0: not flat): stored [E * N, K] (DBRX), so each fused stack is what the model holds."""
    steps: list[Op] = [Stack(sources, f"{target}#rows")]
    if flip:
        steps.append(Transpose(steps[-1].outputs[0], f"{target}#cols"))
    if flat:
        steps.append(Flatten(steps[-1].outputs[0], f"{target}#flat", flat))
    if len(steps) == 1:
        return Stack(sources, target)
    steps[-1] = replace(steps[-1], target=target)  # type: ignore[type-var]
    return Chain(tuple(steps))


def _check_companions(parts: Parts, experts: int, roles: tuple[str, ...] = ROLES) -> None:
    """Every expert and role must carry the same companion parts as expert 0's gate."""
    for role in roles:
        ref = parts.get((0, role))
        if ref is None:
            raise MoeportError(f"expert 0 has no {role} projection")
        for e in range(experts):
            group = parts.get((e, role))
            if group is None:
                raise MoeportError(
                    f"expert {e} has no {role} projection (expert 0 has {next(iter(ref.values()))})"
                )
            missing = set(ref) - set(group)
            if missing:
                example = next(iter(group.values()))
                raise MoeportError(
                    f"{example}: missing companion tensor(s) {sorted(missing)} that expert 0 has"
                )
    if "gate" in roles and set(parts[(0, "gate")]) != set(parts[(0, "up")]):
        raise MoeportError(
            f"{next(iter(parts[(0, 'up')].values()))}: gate and up carry different companions "
            f"{sorted(parts[(0, 'gate')])} vs {sorted(parts[(0, 'up')])}"
        )
