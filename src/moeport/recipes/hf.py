"""Recipe `--to hf`: a Hugging Face checkpoint in the hub or transformers-fused layout.

Everything model-specific comes from the zoo (expert layouts, non-expert renames); this module only
strings the mapping ops together, layer by layer: optional dequantize/cast of each weight, then
the expert re-layout, then renames of the other tensors.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from typing import Any

import torch

from moeport.codecs.registry import hub_part
from moeport.convert.dequantize import (
    ACTIVATION_PARTS,
    FLOAT_FORMATS,
    Cast,
    Decode,
    active_parts,
    decoded_shape,
    weight_format,
)
from moeport.convert.plan import HF_QUANT_CONFIG, Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.detect.formats import ExpertFormat, Part
from moeport.dtypes import safetensors_name_of
from moeport.errors import MoeportError
from moeport.mappings.experts import LayerNames, Parts, relayout_experts, roles_in
from moeport.mappings.ops import Chain, Copy, Op
from moeport.mappings.rename import IDENTITY, Rename
from moeport.mappings.zero_experts import crop_zero_experts, pad_zero_experts, with_crops, zero_rows_moved
from moeport.recipes.base import Options, Target
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.model_config import ModelConfig, rewrite_storage_fields

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("hub", "fused", "linear")  # linear: per-expert 2-D weights even where the hub form is fused
_CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def plan_hf(
    ck: Checkpoint,
    det: Detection,
    layout: str,
    dtype: torch.dtype | None,
    device: str = "cpu",
    canonical: bool = False,
) -> Plan:
    """Plan the conversion of `ck` to the `layout` ('hub'|'fused') names, in `dtype` (None: keep).
    canonical: hub names with the zoo's hub aliases applied (verify's names for either side)."""
    plan, _ = build_hf(ck, det, layout, dtype, device=device, canonical=canonical)
    return finalize(plan, ck)


def build_hf(
    ck: Checkpoint,
    det: Detection,
    layout: str,
    dtype: torch.dtype | None,
    cast_floats: bool = True,
    device: str = "cpu",
    keep_experts: bool = False,
    canonical: bool = False,
) -> tuple[Plan, set[str]]:
    """Units of the hf recipe (not yet finalized) and the names of outputs that were dequantized.

    layout: 'hub', 'fused', or 'linear' (per-expert 2-D weights whatever the hub layout, Family.linear).

    cast_floats False: only quantized weights are decoded to `dtype`; float tensors keep theirs.
    keep_experts: routed experts keep their stored format (a target that already holds them so).
    """
    family = det.family
    dst_layout = {"hub": family.hub, "fused": family.fused, "linear": family.per_expert}[layout]
    rename = _rename_between(det, layout, canonical)
    quant = ModelConfig(ck.config or {}).quantization_config or {}
    builder = _Builder(ck, quant, dtype, cast_floats, device)
    builder.keep_experts = keep_experts

    layers = det.naming.expert_layers(ck.keys(), det.layout)
    expert_keys = {k for le in layers.values() for k in le.keys}
    others = [k for k in ck.keys() if k not in expert_keys]
    rename.check(others, str(ck.root))

    by_layer: dict[int | None, list[str]] = defaultdict(list)
    for key in others:
        by_layer[det.naming.layer_of(key)].append(key)

    units: list[Unit] = []
    for layer in sorted(set(by_layer) | set(layers), key=lambda L: -1 if L is None else L):
        for op in builder.other_tensors(by_layer.get(layer, []), rename):
            units.append(Unit(layer, op))
        if layer in layers:
            prefix = det.naming.prefix(layer)
            src = LayerNames(det.layout, prefix)
            # a wrapper's prefix may be renamed too, its experts with it (MiniMax-M3-VL:
            # `language_model.model.` -> `model.language_model.`; Aria)
            dst = LayerNames(dst_layout, rename(prefix.removesuffix(".")) + ".")
            for op in builder.experts(layers[layer].parts, det, src, dst, det.experts_in(layer)):
                units.append(Unit(layer, op))

    plan = Plan(units, _output_config(ck.config, builder.dequantized, dtype))
    if plan.config is not None and builder.experts_as is not None:
        rewrite_storage_fields(plan.config, family.storage_fields, builder.experts_as)
    if rename.pairs:  # aliases alone (LongCat) rename nothing worth a note
        plan.notes.append(f"renamed non-expert tensors with {len(rename.pairs)} family rule(s)")
    if det.zero_experts and det.layout.kind != dst_layout.kind:
        kinds = (det.layout.kind, dst_layout.kind)
        pad = zero_rows_moved(det.zero_experts, det.zero_rows, family.model_types[0], *kinds)[1]
        how = "zeros in the fused gate_up stacks" if pad else "left out"
        plan.notes.append(f"{det.zero_experts} zero-compute experts per layer (never read): {how}")
    if builder.dequantized:
        plan.notes.append(f"dequantized {builder.dequantized} weight(s); quantization_config removed")
        plan.side_files[HF_QUANT_CONFIG] = None
    decoded = {o for u in units if _decodes(u.op) for o in u.op.outputs}
    return plan, decoded


def canonical_other_tensors(ck: Checkpoint, keys: list[str], rename: Rename) -> list[Op]:
    """Ops giving non-expert tensors in canonical form (renamed, decoded or cast to float32), for
    readers of outputs whose experts are not HF tensors (verify of kt outputs)."""
    quant = ModelConfig(ck.config or {}).quantization_config or {}
    return _Builder(ck, quant, torch.float32, True).other_tensors(keys, rename)


def _decodes(op: Op) -> bool:
    """Whether the outputs of `op` are (a re-layout of) decoded data."""
    if isinstance(op, Decode):
        return True
    if isinstance(op, Chain):
        return any(isinstance(o, Decode) for o in op.ops)
    return False


def linear_prefix_pattern(det: Detection) -> str:
    """Regex source (no groups) of the layer prefixes `--layout linear` names experts under: the
    source's, or the hub's where a fused source's wrapper prefix is renamed with its layers
    (ERNIE-4.5-VL, MiniMax-M3-VL: `model.language_model.layers.` -> `model.layers.`)."""
    rename = _rename_between(det, "linear")
    hub = [rename(p.removesuffix(".")) + "." for p in (det.naming.main, det.naming.mtp) if p]
    escaped = [re.escape(p).replace(re.escape("{L}"), r"\d+") for p in hub]
    return "(?:" + "|".join([det.naming.pattern(), *escaped]) + ")"


def _rename_between(det: Detection, layout: str, canonical: bool = False) -> Rename:
    family = det.family
    src_is_hub = family.hub == family.fused or det.layout != family.fused  # per-expert linears: hub names
    aliases = family.hub_aliases if src_is_hub else ()
    if family.hub == family.fused or src_is_hub == (layout != "fused"):
        return Rename((), aliases) if canonical and aliases else IDENTITY
    forward = Rename(family.fused_renames, aliases)
    return forward if src_is_hub else forward.inverse()


class _Builder:
    """Makes the ops of each unit; remembers shapes of intermediate (decoded) tensors."""

    def __init__(
        self,
        ck: Checkpoint,
        quant: dict[str, Any],
        dtype: torch.dtype | None,
        cast_floats: bool,
        device: str = "cpu",
    ):
        self.ck = ck
        self.device = device
        self.quant = quant
        self.dtype = dtype
        self.cast_floats = cast_floats
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dequantized = 0
        self.keep_experts = False
        self.experts_as: str | None = None  # the codec of the output's experts, where they changed

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.shapes[name] if name in self.shapes else self.ck.info(name).shape

    def _part(self, name: str) -> Part:
        info = self.ck.info(name)
        return Part(info.dtype, info.shape)

    def _cast_needed(self, name: str) -> bool:
        info = self.ck.info(name)
        return (
            self.dtype is not None
            and self.cast_floats
            and info.dtype in ("BF16", "F16", "F32", "F64")
            and len(info.shape) >= 2
            and info.dtype != safetensors_name_of(self.dtype)
        )

    def other_tensors(self, keys: list[str], rename: Rename) -> list[Op]:
        """Non-expert tensors: renamed; with a target dtype, quantized weights decoded, floats cast."""
        groups: dict[str, dict[str, str]] = defaultdict(dict)
        for key in keys:
            head, _, last = key.rpartition(".")
            groups[head][last] = key
        ops: list[Op] = []
        done: set[str] = set()
        if self.dtype is not None:
            for head, parts in groups.items():
                fmt = weight_format({p: self._part(n) for p, n in parts.items()}, self.quant, head)
                if fmt is None:
                    continue
                active = active_parts(parts)
                shape = decoded_shape(fmt, {p: self.shape_of(n) for p, n in active.items()}, head)
                target = rename(f"{head}.weight")
                ops.append(Decode(tuple(active.items()), target, fmt, shape, self.dtype, device=self.device))
                self.dequantized += 1
                done.update(parts.values())
                for p, n in parts.items():
                    if p not in active and p not in ACTIVATION_PARTS:
                        ops.append(Copy(n, rename(n)))
        for key in keys:
            if key in done:
                continue
            if self._cast_needed(key):
                ops.append(Cast(key, rename(key), self.dtype))
            else:
                ops.append(Copy(key, rename(key)))
        return ops

    def experts(
        self,
        found: dict[tuple[int, str], dict[str, str]],
        det: Detection,
        src,
        dst,
        experts: int | None = None,
    ) -> list[Op]:
        """The ops of one layer's routed experts; `experts`: the layer's count (stacks may differ)."""
        experts = det.experts_per_layer if experts is None else experts
        # LongCat's zero-compute experts (mappings/zero_experts.py): not in the per-expert form
        kinds = (src.layout.kind, dst.layout.kind)
        crop, pad = zero_rows_moved(det.zero_experts, det.zero_rows, det.family.model_types[0], *kinds)
        parts = _roles(found, det)
        if det.zero_experts:  # their gate/up (transformers' save) are no routed experts' tensors
            parts = {k: v for k, v in parts.items() if k[0] < experts}
        parts, crops = crop_zero_experts(parts, crop, self.shapes, self.shape_of)
        stored = tuple(parts.get((0, "gate"), {})) + ("weight",)
        ops = self._experts(parts, det, src, dst, experts)
        return pad_zero_experts(with_crops(ops, crops), dst, pad, stored)

    def _experts(self, parts: Parts, det: Detection, src, dst, experts: int) -> list[Op]:
        fmt = det.expert_format
        pre: dict[str, Op] = {}  # decode/cast ops, by the intermediate name they produce
        is_float = fmt.name in FLOAT_FORMATS
        decode = (
            self.dtype is not None
            and not self.keep_experts
            and (not is_float or (self.cast_floats and fmt.name != _fmt_name(self.dtype)))
        )
        if decode and src.layout.kind == "fused" and dst.layout.kind == "per-expert":
            self.experts_as = _fmt_name(self.dtype)
            return self._unfuse_then_decode(parts, fmt, experts, src, dst)
        if decode:
            parts, fmt = self._decode_experts(parts, fmt, det, pre)
            self.experts_as = fmt.name
        ops = relayout_experts(parts, experts, src, dst, fmt, self.shape_of, self._rows(fmt))
        if not pre:
            return ops
        return [Chain((*(pre[i] for i in op.inputs if i in pre), op)) for op in ops]

    def _rows(self, fmt: ExpertFormat):
        def rows_of(group: dict[str, str]) -> int:
            shapes = {p: self.shape_of(n) for p, n in active_parts(group).items()}
            return decoded_shape(fmt, shapes, next(iter(group.values())))[-2]

        return rows_of

    def _unfuse_then_decode(self, parts: Parts, fmt: ExpertFormat, experts: int, src, dst) -> list[Op]:
        """Fused -> per-expert with decoding: the stored parts are re-laid out first and each
        expert's 2-D weight decoded (or cast) after, so a fused stack is read, decoded and held one
        expert at a time (verify's bounded memory, the GPU recipes' linear experts)."""
        ops = relayout_experts(parts, experts, src, dst, fmt, self.shape_of, self._rows(fmt))
        is_float = fmt.name in FLOAT_FORMATS
        out: list[Op] = []
        per = experts // (len(src.layout.groups) or 1)  # an expert group's stacks hold its range
        for (key, fused_role), group in parts.items():
            names = set(group.values())
            mine = [op for op in ops if names & set(op.inputs)]
            first = (-1 - key) * per if src.layout.groups else 0
            if is_float:
                roles = roles_in(src.layout, fused_role)
                finish: list[Op] = [
                    Cast(dst.per_expert(e, r, "weight"), dst.per_expert(e, r, "weight"), self.dtype)
                    for e in range(first, first + per)
                    for r in roles
                ]
            else:
                active = active_parts(group)
                stack = decoded_shape(
                    fmt, {p: self.shape_of(n) for p, n in active.items()}, next(iter(names))
                )
                roles = roles_in(src.layout, fused_role)
                finish = self._decode_each(active, stack, roles, range(first, first + per), fmt, dst)
                self.dequantized += 1
            out.append(Chain((*mine, *finish)))
        return out

    def _decode_each(
        self, active, stack, roles: list[str], experts: range, fmt: ExpertFormat, dst
    ) -> list[Op]:
        shape = (stack[-2] // len(roles), stack[-1])
        return [
            Decode(
                tuple((p, dst.per_expert(e, r, hub_part(fmt, p))) for p in active),
                dst.per_expert(e, r, "weight"),
                fmt,
                shape,
                self.dtype,
                device=self.device,
            )
            for e in experts
            for r in roles
        ]

    def _decode_experts(
        self, parts: Parts, fmt: ExpertFormat, det: Detection, pre: dict[str, Op]
    ) -> tuple[Parts, ExpertFormat]:
        out: Parts = {}
        transposed = det.layout.transposed and fmt.name not in FLOAT_FORMATS
        for role, group in parts.items():
            active = active_parts(group)
            weight = next(iter(active.values()))
            target = f"{weight}#decoded"
            if fmt.name in FLOAT_FORMATS:
                pre[target] = Cast(active["weight"], target, self.dtype)
                self.shapes[target] = self.shape_of(active["weight"])
            else:
                shape = decoded_shape(fmt, {p: self.shape_of(n) for p, n in active.items()}, weight)
                pre[target] = Decode(
                    tuple(active.items()), target, fmt, shape, self.dtype, transposed, self.device
                )
                self.shapes[target] = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape
                self.dequantized += 1
            out[role] = {"weight": target} | {
                p: n for p, n in group.items() if p not in active and p not in ACTIVATION_PARTS
            }
        return out, ExpertFormat(_fmt_name(self.dtype))


def _fmt_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, "")


def _roles(found: dict[tuple[int, str], dict[str, str]], det: Detection) -> Parts:
    """(expert, proj name) -> (expert, role): gate/up/down per expert, gate_up/down when fused."""
    role_of = {proj: role for role, proj in det.layout.projs.items()}
    out: Parts = {}
    for (e, proj), group in found.items():
        role = role_of[proj]
        if det.layout.kind == "fused" and role not in det.layout.fused_roles:
            raise MoeportError(f"{next(iter(group.values()))}: unexpected fused expert tensor")
        out[(e, role)] = dict(group)
    return out


def _output_config(config: dict[str, Any] | None, dequantized: int, dtype: torch.dtype | None) -> Any:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    if dtype is not None:
        for c in (cfg, cfg.get("text_config")):
            if not isinstance(c, dict):
                continue
            if dequantized:
                c.pop("quantization_config", None)
            for key in ("dtype", "torch_dtype"):
                if key in c or (key == "dtype" and c is cfg):
                    c[key] = _CONFIG_DTYPE[dtype]
    return cfg


def _build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
    if opts.layout not in LAYOUTS:
        raise MoeportError(f"--layout {opts.layout}: expected one of {', '.join(LAYOUTS)}")
    if opts.dtype != "keep" and opts.dtype not in DTYPES:
        raise MoeportError(f"--dtype {opts.dtype}: expected keep or one of {', '.join(DTYPES)}")
    if opts.layout == "fused" and det.family.generic:  # nothing reads a fused layout of it
        raise MoeportError(f"--layout fused: {ck.root}: {det.family.generic}; use --layout hub or linear")
    plan = plan_hf(ck, det, opts.layout, DTYPES.get(opts.dtype), opts.device)
    plan.title = f"{det.family.title}: {det.layout.kind} -> {opts.layout}, dtype {opts.dtype}"
    return plan, HfSink(opts.max_shard_bytes, metadata)


TARGET = Target(
    "hf",
    f"Hugging Face safetensors (--layout {'|'.join(LAYOUTS)}, --dtype {'|'.join(('keep', *DTYPES))})",
    _build,
    fields=lambda o: {"layout": o.layout, "dtype": o.dtype},
    lossless=lambda recipe: recipe.get("dtype") == "keep",
    takes=frozenset({"layout", "dtype", "max_shard_bytes"}),
)
