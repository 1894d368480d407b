"""Recipe `--to gguf --gguf-type bf16|f16|q8_0|q4_0|mxfp4`: a GGUF llama.cpp and kt-kernel load.

The hf recipe's plan in its per-expert float32 form (any source format decoded one weight at a
time) is regrouped per GGUF tensor: each weight is cast or quantized (gguf-py's codecs,
codecs/ggml.py), llama arch's q/k rows permuted, the experts of a projection stacked [E, N, K]
under llama.cpp's name (zoo/gguf_arch.py). Tensor types follow llama.cpp's converter: 1-D tensors
and the router (`ffn_gate_inp`) stay F32, weights whose rows are not whole blocks fall back to F16;
`mxfp4` puts the routed experts in MXFP4 and other weights in Q8_0 (llama-quantize's MXFP4_MOE).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from moeport.codecs.ggml import GgmlCodec, block_geometry
from moeport.convert.dequantize import Cast
from moeport.convert.encode import Encode
from moeport.convert.plan import Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.llama_cpp import PermuteRows, SplitKvB
from moeport.mappings.ops import Chain, Copy, Op, Stack
from moeport.recipes.base import Options, Target
from moeport.recipes.gguf_meta import file_type, model_keys
from moeport.recipes.gguf_stored import Stored, stored_experts, tensor_type
from moeport.recipes.hf import build_hf
from moeport.sinks.gguf import GgufSink
from moeport.sinks.safetensors_file import TensorSpec
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.gguf_arch import BY_MODEL_TYPE, GgufArch, arch_for, rope_rows
from moeport.zoo.model_config import ModelConfig

GGUF_TYPES = ("bf16", "f16", "q8_0", "q4_0", "mxfp4")
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _GgufPlan:
    """Regroups the hf plan's per-expert float units into one unit per set of GGUF tensors that
    share source work (gate and up of a fused stack are computed together)."""

    def __init__(
        self, ck: Checkpoint, det: Detection, arch: GgufArch, gguf_type: str, allow_nonfinite: bool = False
    ):
        experts_as = stored_experts(ck, det, gguf_type)
        hf, _ = build_hf(ck, det, "linear", torch.float32, keep_experts=experts_as is not None)
        self.stored = Stored()
        if experts_as is not None:
            self.stored.experts(hf, det, experts_as)
        hf = self.stored.gguf_units(hf, ck, arch, gguf_type)
        self.heads = _heads(ck.config or {})
        self.hf = finalize(self._llama_cpp_units(hf, ck, det), ck)
        self.arch = arch
        self.gguf_type = gguf_type
        self.allow_nonfinite = allow_nonfinite
        self.spec = {s.name: s for s in self.hf.specs}
        self.types: dict[str, Any] = {}
        self.copied: dict[str, str] = {}  # GGUF name -> the source format its rows come from
        members: dict[str, list[tuple[int | None, str]]] = defaultdict(list)  # GGUF name -> hub names
        unit_of: dict[str, set[int]] = {}  # hub name -> the hf units giving it (a stored weight's parts)
        for i, unit in enumerate(self.hf.units):
            for out in unit.op.outputs:
                hub = self.stored.part_of.get(out, out)  # a stored weight's parts count as it
                if hub not in unit_of:
                    name, expert = arch.gguf_name(hub)
                    members[name].append((expert, hub))
                unit_of.setdefault(hub, set()).add(i)
        self.members = members
        self.groups = _components(members, unit_of)

    def _llama_cpp_units(self, hf: Plan, ck: Checkpoint, det: Detection) -> Plan:
        """The hf units as llama.cpp's converter sees the model: MTP layers dropped (it skips
        them), MLA's kv_b_proj split into k_b and v_b."""
        layers = ModelConfig(ck.config or {}).first_int(("num_hidden_layers",))
        units = [u for u in hf.units if layers is None or u.layer is None or u.layer < layers]
        if len(units) < len(hf.units):
            hf.notes.append(f"MTP layers (from {layers}) left out, as llama.cpp's converter does")
        mla = ModelConfig(ck.config or {}).first_int(("qk_nope_head_dim",))
        for i, unit in enumerate(units):
            kv_b = [o for o in unit.op.outputs if o.endswith("self_attn.kv_b_proj.weight")]
            if kv_b and mla:
                split = [
                    SplitKvB(n, (n.replace("kv_b", "k_b"), n.replace("kv_b", "v_b")), self.heads[0], mla)
                    for n in kv_b
                ]
                units[i] = Unit(unit.layer, Chain((unit.op, *split)))
        return Plan(units, hf.config, notes=hf.notes)

    def units(self) -> list[Unit]:
        out = []
        for names, unit_ids in self.groups:
            ops: list[Op] = [self.hf.units[i].op for i in unit_ids]
            for name in names:
                ops += self._write(name, sorted(self.members[name], key=lambda m: m[0] or 0))
            out.append(Unit(self.hf.units[unit_ids[0]].layer, Chain(tuple(ops))))
        return out

    def _write(self, name: str, hubs: list[tuple[int | None, str]]) -> list[Op]:
        stacked = hubs[0][0] is not None
        if stacked and [e for e, _ in hubs] != list(range(len(hubs))):
            raise MoeportError(f"{name}: experts {[e for e, _ in hubs]} are not 0..{len(hubs) - 1}")
        stored = hubs[0][1] in self.stored.parts
        first_shape = self.stored.shape(hubs[0][1], self.spec) if stored else self.spec[hubs[0][1]].shape
        shape = (len(hubs), *first_shape) if stacked else first_shape
        qtype = tensor_type(name, shape, stacked, self.gguf_type)
        self.types[name] = qtype
        ops: list[Op] = []
        pieces = []
        for expert, hub in hubs:
            head, dot, suffix = name.rpartition(".")
            piece = f"{head}#{expert}{dot}{suffix}" if stacked else name
            pieces.append(piece)
            if stored:
                heads = self.arch.permuted_heads(hub, self.heads)
                order = tuple(rope_rows(first_shape[0], heads).tolist()) if heads else ()

                def rope(src: str, out: str, order=order) -> Op | None:
                    return PermuteRows(src, out, order) if order else None

                ops += self.stored.move(hub, piece, qtype, self.spec, rope)
                self.copied[name] = self.stored.codec[hub].name
                continue
            first = self.spec[hubs[0][1]]
            src = hub
            heads = self.arch.permuted_heads(hub, self.heads)
            if heads:
                ops.append(PermuteRows(hub, f"{hub}#rope", tuple(rope_rows(first.shape[0], heads).tolist())))
                src = f"{hub}#rope"
            ops.append(self._convert(src, piece, qtype, first, hub))
        if stacked:
            ops.append(Stack(tuple(pieces), name))
        return ops

    def summary(self) -> list[str]:
        """What the dry-run plan says about each GGUF tensor: copied as stored, or converted."""
        notes = []
        copied: dict[str, set[str]] = defaultdict(set)
        converted: dict[str, set[str]] = defaultdict(set)
        for name, qtype in self.types.items():
            short = re.sub(r"^blk\.\d+\.", "blk.*.", name)
            if name in self.copied:
                copied[f"{self.copied[name]} -> {qtype.name}"].add(short)
            else:
                converted[qtype.name].add(short)
        for how, names in copied.items():
            notes.append(f"copied as stored ({how}, no requantizing): {', '.join(sorted(names))}")
        for qtype, names in converted.items():
            verb = "quantized to" if qtype not in _FLOAT else "written as"
            notes.append(f"{verb} {qtype}: {', '.join(sorted(names))}")
        return notes

    def _convert(self, src: str, dst: str, qtype: Any, spec: TensorSpec, hub: str) -> Op:
        if qtype.name in _FLOAT:
            want = _FLOAT[qtype.name]
            return Copy(src, dst) if _FLOAT.get(spec.dtype) == want else Cast(src, dst, want)
        block, size = block_geometry(qtype)
        rows = (*spec.shape[:-1], spec.shape[-1] // block * size)
        base = dst.removesuffix("weight")
        if base == dst:
            raise MoeportError(f"{dst}: only weights are quantized")
        specs = (("weight", torch.uint8, rows),)
        label = f"{hub.removesuffix('.weight')} (GGUF {base.rstrip('.').replace('#', ', expert ')})"
        return Encode(src, base, GgmlCodec(qtype), specs, allow_nonfinite=self.allow_nonfinite, label=label)


def _components(members: dict[str, list], unit_of: dict[str, set[int]]) -> list[tuple[list[str], list[int]]]:
    """GGUF names whose sources come from common hf units, merged (union-find), in plan order."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for hubs in members.values():
        ids = [i for _, h in hubs for i in sorted(unit_of[h])]
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
    groups: dict[int, tuple[list[str], set[int]]] = {}
    for name, hubs in members.items():
        ids = {i for _, h in hubs for i in unit_of[h]}
        root = find(next(iter(ids)))
        names, units = groups.setdefault(root, ([], set()))
        names.append(name)
        units.update(ids)
    ordered = sorted(groups.values(), key=lambda g: min(g[1]))
    return [(names, sorted(units)) for names, units in ordered]


def _heads(config: dict[str, Any]) -> tuple[int, int]:
    mc = ModelConfig(config)
    heads = mc.first_int(("num_attention_heads",)) or 0
    return heads, mc.first_int(("num_key_value_heads",)) or heads


def _build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
    if opts.gguf_type not in GGUF_TYPES:
        raise MoeportError(f"--gguf-type {opts.gguf_type}: expected one of {', '.join(GGUF_TYPES)}")
    arch = arch_for(det.family.name)
    built = _GgufPlan(ck, det, arch, opts.gguf_type, opts.allow_nonfinite)
    plan = finalize(Plan(built.units(), built.hf.config), ck)
    plan.title = f"{det.family.title}: GGUF {arch.arch}, {opts.gguf_type}"
    plan.notes += built.hf.notes + built.summary()
    keys = model_keys(ck, det, arch, file_type(opts.gguf_type), metadata)
    return plan, GgufSink(arch.arch, built.types, keys, opts.max_shard_bytes)


TARGET = Target(
    "gguf",
    f"GGUF for llama.cpp / kt-kernel LLAMAFILE (--gguf-type {'|'.join(GGUF_TYPES)})",
    _build,
    fields=lambda o: {"gguf_type": o.gguf_type} | ({"allow_nonfinite": True} if o.allow_nonfinite else {}),
    takes=frozenset({"gguf_type", "max_shard_bytes", "allow_nonfinite"}),
    fits=lambda det: det.family.name in BY_MODEL_TYPE,
)
