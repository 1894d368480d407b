"""Recipe `--to gguf --gguf-type bf16|f16|q8_0|q4_0|mxfp4`: a GGUF llama.cpp and kt-kernel load.

The hf recipe's plan in its per-expert float32 form (any source format decoded one weight at a
time) is regrouped per GGUF tensor: each weight is cast or quantized (gguf-py's codecs,
codecs/ggml.py), llama arch's q/k rows permuted, the experts of a projection stacked [E, N, K]
under llama.cpp's name (zoo/gguf_arch.py). Tensor types follow llama.cpp's converter: 1-D tensors
and the router (`ffn_gate_inp`) stay F32, weights whose rows are not whole blocks fall back to F16;
`mxfp4` puts the routed experts in MXFP4 and other weights in Q8_0 (llama-quantize's MXFP4_MOE).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from moeport.codecs.ggml import GgmlCodec, block_geometry, quant_type
from moeport.convert.dequantize import Cast
from moeport.convert.encode import Encode
from moeport.convert.plan import Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.llama_cpp import PermuteRows, SplitKvB
from moeport.mappings.ops import Chain, Copy, Op, Stack
from moeport.recipes.base import Options, Target
from moeport.recipes.gguf_meta import file_type, model_keys
from moeport.recipes.hf import build_hf
from moeport.sinks.gguf import GgufSink
from moeport.sinks.safetensors_file import TensorSpec
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.gguf_arch import BY_MODEL_TYPE, GgufArch, arch_for, rope_rows
from moeport.zoo.model_config import ModelConfig

GGUF_TYPES = ("bf16", "f16", "q8_0", "q4_0", "mxfp4")
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_KEEP_F32 = ("ffn_gate_inp", "exp_probs_b")  # llama.cpp's converter keeps routers in F32


def tensor_type(name: str, shape: tuple[int, ...], stacked: bool, gguf_type: str) -> Any:
    """The GGML type llama.cpp's converter (or llama-quantize, for mxfp4) gives this tensor."""
    if len(shape) - stacked <= 1 or any(k in name for k in _KEEP_F32):
        return quant_type("F32")
    if gguf_type in ("bf16", "f16"):
        return quant_type(gguf_type)
    wanted = gguf_type if gguf_type != "mxfp4" or stacked else "q8_0"
    qtype = quant_type(wanted)
    return qtype if shape[-1] % block_geometry(qtype)[0] == 0 else quant_type("F16")


class _GgufPlan:
    """Regroups the hf plan's per-expert float units into one unit per set of GGUF tensors that
    share source work (gate and up of a fused stack are computed together)."""

    def __init__(self, ck: Checkpoint, det: Detection, arch: GgufArch, gguf_type: str):
        hf, _ = build_hf(ck, det, "linear", torch.float32)
        self.heads = _heads(ck.config or {})
        self.hf = finalize(self._llama_cpp_units(hf, ck, det), ck)
        self.arch = arch
        self.gguf_type = gguf_type
        self.spec = {s.name: s for s in self.hf.specs}
        self.types: dict[str, Any] = {}
        members: dict[str, list[tuple[int | None, str]]] = defaultdict(list)  # GGUF name -> hub names
        unit_of: dict[str, int] = {}
        for i, unit in enumerate(self.hf.units):
            for hub in unit.op.outputs:
                name, expert = arch.gguf_name(hub)
                members[name].append((expert, hub))
                unit_of[hub] = i
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
        first = self.spec[hubs[0][1]]
        shape = (len(hubs), *first.shape) if stacked else first.shape
        qtype = tensor_type(name, shape, stacked, self.gguf_type)
        self.types[name] = qtype
        ops: list[Op] = []
        pieces = []
        for expert, hub in hubs:
            src = hub
            heads = self.arch.permuted_heads(hub, self.heads)
            if heads:
                ops.append(PermuteRows(hub, f"{hub}#rope", tuple(rope_rows(first.shape[0], heads).tolist())))
                src = f"{hub}#rope"
            head, dot, suffix = name.rpartition(".")
            piece = f"{head}#{expert}{dot}{suffix}" if stacked else name
            ops.append(self._convert(src, piece, qtype, first))
            pieces.append(piece)
        if stacked:
            ops.append(Stack(tuple(pieces), name))
        return ops

    def _convert(self, src: str, dst: str, qtype: Any, spec: TensorSpec) -> Op:
        if qtype.name in _FLOAT:
            want = _FLOAT[qtype.name]
            return Copy(src, dst) if _FLOAT.get(spec.dtype) == want else Cast(src, dst, want)
        block, size = block_geometry(qtype)
        rows = (*spec.shape[:-1], spec.shape[-1] // block * size)
        base = dst.removesuffix("weight")
        if base == dst:
            raise MoeportError(f"{dst}: only weights are quantized")
        return Encode(src, base, GgmlCodec(qtype), (("weight", torch.uint8, rows),))


def _components(members: dict[str, list], unit_of: dict[str, int]) -> list[tuple[list[str], list[int]]]:
    """GGUF names whose sources come from common hf units, merged (union-find), in plan order."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.setdefault(i, i) != i:
            i = parent[i]
        return i

    for hubs in members.values():
        ids = [unit_of[h] for _, h in hubs]
        for i in ids[1:]:
            parent[find(i)] = find(ids[0])
    groups: dict[int, tuple[list[str], set[int]]] = {}
    for name, hubs in members.items():
        ids = {unit_of[h] for _, h in hubs}
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
    built = _GgufPlan(ck, det, arch, opts.gguf_type)
    plan = finalize(Plan(built.units(), built.hf.config), ck)
    plan.title = f"{det.family.title}: GGUF {arch.arch}, {opts.gguf_type}"
    plan.notes += built.hf.notes
    keys = model_keys(ck, det, arch, file_type(opts.gguf_type), metadata)
    return plan, GgufSink(arch.arch, built.types, keys, opts.max_shard_bytes)


TARGET = Target(
    "gguf",
    f"GGUF for llama.cpp / kt-kernel LLAMAFILE (--gguf-type {'|'.join(GGUF_TYPES)})",
    _build,
    fields=lambda o: {"gguf_type": o.gguf_type},
    takes=frozenset({"gguf_type", "max_shard_bytes"}),
    fits=lambda det: det.family.name in BY_MODEL_TYPE,
)
