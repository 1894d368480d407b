"""Targets `kt-int4|kt-int8`: kt-kernel's AMXINT4/AMXINT8 CPU expert weights.

Per routed expert (MTP layers included, as kt's own converter does) the plan is: decode each of
gate/up/down from its stored format to bf16 (kt quantizes from bf16; float sources are rounded by
the codec itself), `Split` it into T NUMA slices of the intermediate dim (gate/up rows, down
columns), and `Encode` every slice with `KtAmxCodec`. Transformers-fused sources are `Unstack`ed
first, read one expert at a time. Non-expert tensors are copied unchanged into the merged form's
base shards; the folder form holds experts only. Sinks: sinks.kt (merged files or layer folders).
"""

from __future__ import annotations

import torch

from moeport.codecs import kt_amx as K
from moeport.convert.dequantize import FLOAT_FORMATS, Decode, active_parts
from moeport.convert.encode import Encode, part_specs
from moeport.convert.plan import Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Copy, Op, Split, Unstack
from moeport.mappings.rules import ROWS, VECTOR
from moeport.mappings.zero_experts import ROUTED, CropExperts
from moeport.recipes.base import Options, Target
from moeport.recipes.kt_cpu import check_cpu, host_flags
from moeport.recipes.kt_shapes import expert_shape, one_size
from moeport.recipes.provenance import source_name
from moeport.sinks.kt import KtFoldersSink, KtMergedSink
from moeport.sinks.kt_layout import LAYOUT_VERSION, KtLayout, KtSlot
from moeport.sources.checkpoint import Checkpoint

KT_LAYOUTS = ("merged", "folders")
Groups = dict[tuple[int, str], dict[str, str]]  # (expert or -1 when fused, role) -> {part: key}


def plan_kt(ck: Checkpoint, det: Detection, bits: int, opts: Options) -> tuple[Plan, KtLayout]:
    """Check everything headers can tell (layout, shapes, alignment), then plan every expert."""
    if opts.kt_layout not in KT_LAYOUTS:
        raise MoeportError(f"--kt-layout {opts.kt_layout}: expected one of {', '.join(KT_LAYOUTS)}")
    if opts.numa < 1:
        raise MoeportError(
            f"--numa {opts.numa}: expected a positive number of NUMA slices (kt's threadpool_count)"
        )
    layout = det.layout
    if det.family.not_linear:
        raise MoeportError(
            f"{ck.root}: {det.family.title}: {det.family.not_linear}; kt-kernel runs linear experts"
        )
    if not layout.gated:
        what = "each one linear" if layout.one_linear else "up/down only"  # VitPose+: one linear
        raise MoeportError(
            f"{ck.root}: {det.family.title} experts are {what} (no gate); kt-kernel runs gated "
            "(SwiGLU) experts only"
        )
    if layout.transposed or layout.gate_up_interleaved or layout.split_gate_up or layout.groups:
        how = "with gate/up interleaved" if layout.gate_up_interleaved else "transposed ([E, H, 2I])"
        how = "as separate gate and up stacks" if layout.split_gate_up else how
        how = f"in expert groups ({', '.join(layout.groups)})" if layout.groups else how
        raise MoeportError(
            f"{ck.root}: {det.family.title} stores its experts {how}; kt's AMX layout is planned from "
            "[2I, H] stacks or per-expert linears: convert with --to hf --layout linear first"
        )
    found_layers = det.naming.expert_layers(ck.keys(), layout)
    if not found_layers:
        raise MoeportError(f"{ck.root}: no routed-expert tensors found")
    role_of = {proj: role for role, proj in layout.projs.items()}
    fused = layout.kind == "fused"
    layers: dict[int, tuple[Groups, int]] = {}
    shapes: dict[int, tuple[int, int]] = {}
    for number in sorted(set(det.moe_layers) | {L for L in det.mtp_layers if L in found_layers}):
        found = found_layers[number]
        groups: Groups = {}
        for (e, proj), group in found.parts.items():
            bias = sorted(p for p in group if "bias" in p)
            if bias:
                raise MoeportError(f"{group[bias[0]]}: kt-kernel AMX experts have no bias term")
            groups[(e, role_of[proj])] = active_parts(group)
        experts, zero = _fused_experts(ck, groups, "gate_up") if fused else det.experts_in(number), 0
        # LongCat: a fused gate_up may hold the zero-compute experts' rows after the E routed ones
        # (transformers 5.24 writes E + Z, 5.25 E, as down_proj); kt's layout holds the E
        if fused and det.zero_experts and experts == _fused_experts(ck, groups, "down") + det.zero_experts:
            experts, zero = experts - det.zero_experts, det.zero_experts
        shapes[number] = expert_shape(ck, number, groups, experts, det.expert_format, fused, zero)
        layers[number] = (groups, experts)
    if not layers:
        raise MoeportError(f"{ck.root}: no MoE layers to convert")
    kept, stack_note = one_size(det, {L: (*shapes[L], layers[L][1]) for L in layers})
    layers = {L: layers[L] for L in kept}
    shapes = {L: shapes[L] for L in kept}
    converted = {k for L in kept for k in found_layers[L].keys}
    first = next(iter(layers))
    hidden, inter = shapes[first]
    for number, hi in shapes.items():
        if hi != (hidden, inter):
            raise MoeportError(
                f"{ck.root}: layer {number} experts are hidden {hi[0]} x intermediate {hi[1]}, layer "
                f"{first} {hidden} x {inter}; kt needs one size for all MoE layers"
            )
    if det.hidden_size is not None and det.hidden_size != hidden:
        raise MoeportError(
            f"{ck.root}: expert tensors have hidden size {hidden}, config.json says {det.hidden_size}"
        )
    K.check_alignment(hidden, inter, opts.numa, bits, where=f"{ck.root} experts [I={inter}, H={hidden}]")
    experts = {e for _, e in layers.values()}
    if len(experts) != 1:
        raise MoeportError(f"{ck.root}: MoE layers have {sorted(experts)} experts; kt needs one count")
    kt = KtLayout(bits, opts.numa, hidden, inter, tuple(layers), experts.pop())
    builder = _Builder(kt, det, opts.device)
    units: list[Unit] = []
    others = [k for k in ck.keys() if k not in converted]
    if opts.kt_layout == "merged":
        units += [Unit(None, Copy(k, k)) for k in others]
    for number, (groups, _) in layers.items():
        if fused:
            units.append(Unit(number, Chain(tuple(builder.fused_layer(ck, number, groups)))))
        else:
            units += [
                Unit(number, Chain(tuple(builder.expert(number, e, groups)))) for e in range(kt.experts)
            ]
    plan = Plan(units, None)
    fmt = det.expert_format
    plan.title = (
        f"{det.family.title} ({fmt.name}, {layout.kind}) -> {kt.method} T={kt.tp} {opts.kt_layout}: "
        f"{len(kt.layers)} MoE layers x {kt.experts} experts, H={hidden} I={inter}"
    )
    if stack_note:
        plan.notes.append(stack_note)
    if others and opts.kt_layout == "folders":
        plan.notes.append(f"{len(others)} non-expert tensors not copied: kt's folder form holds experts only")
    return finalize(plan, ck), kt


def _fused_experts(ck: Checkpoint, groups: Groups, role: str) -> int:
    """The experts along dim 0 of a layer's fused `role` stack."""
    stack = groups.get((-1, role))
    if not stack:
        raise MoeportError(f"{ck.root}: fused experts without a {role} tensor")
    return ck.info(stack.get("weight") or next(iter(stack.values()))).shape[0]


class _Builder:
    """The ops of one expert (or one fused layer): decode to bf16, NUMA slices, AMX encode."""

    def __init__(self, kt: KtLayout, det: Detection, device: str):
        self.kt, self.fmt, self.device = kt, det.expert_format, device
        self.zero = det.zero_experts  # rows after the routed experts in a fused gate_up (LongCat)
        self.codec = K.KtAmxCodec(kt.bits)
        self._specs: dict[tuple[int, int], tuple] = {}

    def _decoded(self, group: dict[str, str], shape: tuple[int, int], ops: list[Op]) -> str:
        """Name of the weight as bf16 (float sources go as they are: the codec rounds to bf16)."""
        if self.fmt.name in FLOAT_FORMATS:
            return group["weight"]
        weight = next(iter(group.values()))
        target = f"{weight}#bf16"
        ops.append(Decode(tuple(group.items()), target, self.fmt, shape, torch.bfloat16, device=self.device))
        return target

    def _slices(self, layer: int, e: int, mats: dict[str, str], ops: list[Op]) -> None:
        """Split gate/up rows and down columns into T slices; encode each, in kt's output order."""
        tp, part = self.kt.tp, self.kt.inter // self.kt.tp
        for proj, name in mats.items():
            if proj == "gate_up":  # one decoded [2I, H]: gate's T slices, then up's
                targets = tuple(f"{name}#{p}{t}" for p in ("gate", "up") for t in range(tp))
                ops.append(Split(name, targets, ROWS, (part,) * 2 * tp))
            else:
                rule = VECTOR if proj == "down" else ROWS  # down [H, I] is cut along its columns
                ops.append(Split(name, tuple(f"{name}#{proj}{t}" for t in range(tp)), rule, (part,) * tp))
        for slot in self.kt.expert_slots(layer, e):
            source = mats.get(slot.proj, mats.get("gate_up"))
            ops.append(self._encode(f"{source}#{slot.proj}{slot.t}", slot))

    def _encode(self, source: str, slot: KtSlot) -> Encode:
        shape = (slot.n, slot.k)
        if shape not in self._specs:
            self._specs[shape] = part_specs(self.codec, shape, slot.key("weight"))
        return Encode(
            source, slot.key("weight").removesuffix("weight"), self.codec, self._specs[shape], self.device
        )

    def expert(self, layer: int, e: int, groups: Groups) -> list[Op]:
        ops: list[Op] = []
        h, i = self.kt.hidden, self.kt.inter
        shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        mats = {role: self._decoded(groups[(e, role)], shapes[role], ops) for role in ("gate", "up", "down")}
        self._slices(layer, e, mats, ops)
        return ops

    def fused_layer(self, ck: Checkpoint, layer: int, groups: Groups) -> list[Op]:
        """Every part with an expert dim is unstacked (read one expert at a time); then per expert.
        LongCat's zero-compute experts' gate_up rows are cut first, as `--layout hub` does (kt's
        layout holds the E weighted experts; the zero-compute ones are identities, no weights)."""
        ops: list[Op] = []
        experts, h, i = self.kt.experts, self.kt.hidden, self.kt.inter
        per_expert: dict[str, list[dict[str, str]]] = {}
        for role in ("gate_up", "down"):
            per_expert[role] = [{} for _ in range(experts)]
            for part, key in groups[(-1, role)].items():
                shape = ck.info(key).shape
                cut = self.zero if role == "gate_up" and shape and shape[0] == experts + self.zero else 0
                if shape and shape[0] == experts + cut:
                    source = key + ROUTED if cut else key
                    if cut:
                        ops.append(CropExperts(key, source, cut))
                    names = tuple(f"{key}#{e}" for e in range(experts))
                    ops.append(Unstack(source, names))
                else:  # one value shared by every expert (a per-tensor scale)
                    names = (key,) * experts
                for e in range(experts):
                    per_expert[role][e][part] = names[e]
        for e in range(experts):
            mats = {
                "gate_up": self._decoded(per_expert["gate_up"][e], (2 * i, h), ops),
                "down": self._decoded(per_expert["down"][e], (h, i), ops),
            }
            self._slices(layer, e, mats, ops)
        return ops


def _build(bits: int):
    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        plan, kt = plan_kt(ck, det, bits, opts)
        plan.warnings += filter(None, [check_cpu(kt.method, host_flags(), opts.kt_any_cpu)])
        meta = {
            **metadata,
            "source": source_name(ck, opts.source_label),
            "source_family": det.family.name,
            "source_format": det.expert_format.name,
        }
        sink = KtMergedSink(kt, meta) if opts.kt_layout == "merged" else KtFoldersSink(kt, meta)
        return plan, sink

    return build


def _fields(bits: int):
    def fields(opts: Options) -> dict[str, object]:
        method = K.method_name(bits)
        return {
            "method": method,
            "threadpool_count": opts.numa,
            "kt_layout": opts.kt_layout,
            "layout_version": LAYOUT_VERSION,
        }

    return fields


TARGETS = [
    Target(
        f"kt-int{bits}",
        f"kt-kernel {K.method_name(bits)} CPU experts (--numa T, --kt-layout {'|'.join(KT_LAYOUTS)})",
        _build(bits),
        _fields(bits),
        takes=frozenset({"numa", "kt_layout", "kt_any_cpu"}),
    )
    for bits in (4, 8)
]
