"""`--to mxfp4 --flavor gpt-oss`: MXFP4 experts in GPT-OSS's own layout, for GPT-OSS only.

GPT-OSS ships its routed experts fused and gate/up interleaved, as `mlp.experts.gate_up_proj_blocks`
U8 [E, 2I, H/32, 16] + `gate_up_proj_scales` U8 (E8M0) [E, 2I, H/32] and `down_proj_blocks/_scales`
([out, in] rows, unlike its transposed BF16 form), BF16 biases beside them, every other tensor in
16 bits and `quantization_config: {quant_method: mxfp4, modules_to_not_convert: [...]}`: what
transformers' Mxfp4 quantizer, vLLM and SGLang read for GPT-OSS. OCP scale choice (codecs.fp4).

A GPT-OSS MXFP4 source is copied tensor for tensor (same bytes). Any other source is planned by the
GPU recipe into per-expert `_blocks`/`_scales` (RTN from BF16/FP8; MXFP4 in another layout, e.g.
compressed-tensors, moves its codes and scales unchanged), then fused by the zoo's mapping ops
(`relayout_experts`: interleaved Concat and Stack, each part with its row rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moeport.codecs import GptOssMxfp4Codec
from moeport.codecs.base import Codec
from moeport.codecs.format import ExpertFormat
from moeport.convert.plan import HF_QUANT_CONFIG, Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.experts import LayerNames, Parts, relayout_experts
from moeport.mappings.ops import Chain, Op
from moeport.recipes.gpu import plan_gpu
from moeport.recipes.hf import plan_hf
from moeport.sources.checkpoint import Checkpoint

FORMAT = ExpertFormat("mxfp4", {"variant": "gpt-oss", "group_size": 32})
# GPT-OSS's config as published (openai/gpt-oss-20b, -120b): only the routed experts are MXFP4
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


@dataclass(frozen=True)
class GptOssRecipe:
    """The per-expert half of the plan (recipes.gpu.plan_gpu's recipe protocol)."""

    scheme: str = "mxfp4"
    targets: str = "experts"
    ignore: tuple[str, ...] = ()
    allow_nonfinite: bool = False

    def codec(self) -> Codec:
        return GptOssMxfp4Codec()

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        return None  # GPT-OSS's own MXFP4 is copied whole by plan_gpt_oss, never reaches plan_gpu

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        return dict(QUANTIZATION_CONFIG)


def fits(det: Detection) -> bool:
    return det.family.name == "gpt_oss"


def plan_gpt_oss(ck: Checkpoint, det: Detection, device: str = "cpu") -> Plan:
    """The whole plan: a copy of a GPT-OSS MXFP4 source, else per-expert encodes then the fusing ops."""
    if not fits(det):
        raise MoeportError(
            f"--to mxfp4 --flavor gpt-oss: GPT-OSS's fused _blocks/_scales layout is read for GPT-OSS "
            f"only, not {det.family.title} (--flavor compressed-tensors writes MXFP4 for any family)"
        )
    fmt = det.expert_format
    if fmt.name == "mxfp4" and fmt.params.get("variant") == "gpt-oss":
        plan = plan_hf(ck, det, "hub", None, device)
        if plan.config is not None:
            plan.config["quantization_config"] = dict(QUANTIZATION_CONFIG)
        n = sum(1 for s in plan.specs if s.name.endswith(("_blocks", "_scales")))
        plan.notes.append(f"mxfp4 (gpt-oss): {n} expert tensors copied bit-exact (GPT-OSS MXFP4 source)")
        return plan
    linear = plan_gpu(ck, det, GptOssRecipe(), device)
    units = _fuse_units(linear, det)
    plan = Plan(units, linear.config, notes=linear.notes, side_files=linear.side_files)
    plan.side_files[HF_QUANT_CONFIG] = None
    plan.notes.append("mxfp4 (gpt-oss): per-expert _blocks/_scales fused into GPT-OSS's interleaved stacks")
    return finalize(plan, ck)


def _fuse_units(linear: Plan, det: Detection) -> list[Unit]:
    """The units of the per-expert plan with each layer's experts fused into GPT-OSS's stacks; the
    units producing one layer's experts merge into one (its fusing ops read all of them)."""
    family = det.family
    per_expert = family.per_expert
    projs = "|".join(re.escape(p) for p in per_expert.projs.values())
    expert_re = re.compile(
        rf"^({det.naming.pattern()}){re.escape(per_expert.block)}\.experts\.(\d+)\.({projs})\.(_blocks|_scales|bias)$"
    )
    role_of = {proj: role for role, proj in per_expert.projs.items()}
    spec_of = {s.name: s.shape for s in linear.specs}
    ops: list[list[Op]] = [[u.op] for u in linear.units]
    unit_of: dict[str, int] = {}
    layers: dict[str, Parts] = {}
    for i, unit in enumerate(linear.units):
        for name in unit.op.outputs:
            m = expert_re.match(name)
            if m:
                unit_of[name] = i
                layers.setdefault(m[1], {}).setdefault((int(m[2]), role_of[m[3]]), {})[m[4]] = name
    for prefix, parts in layers.items():
        fused = relayout_experts(
            parts,
            det.experts_per_layer,
            LayerNames(per_expert, prefix),
            LayerNames(family.hub, prefix),
            FORMAT,
            spec_of.__getitem__,
            lambda group: spec_of[group["_blocks"]][-3],
        )
        homes = sorted({unit_of[n] for group in parts.values() for n in group.values()})
        for other in homes[1:]:
            ops[homes[0]] += ops[other]
            ops[other] = []
        ops[homes[0]] += fused
    return [
        Unit(unit.layer, chain[0] if len(chain) == 1 else Chain(tuple(chain)))
        for unit, chain in zip(linear.units, ops, strict=True)
        if chain
    ]
