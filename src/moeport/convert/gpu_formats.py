"""Recipes `--to w4a16|w8a16|fp8|fp8-block`: quantized checkpoints that GPU servers load.

w4a16/w8a16: compressed-tensors `pack-quantized` (RTN, symmetric, per group or per channel), fp8:
compressed-tensors `float-quantized` (E4M3, per-channel scale, dynamic per-token activations), fp8-block:
DeepSeek-style E4M3 + `weight_scale_inv` per 128×128 block with `quant_method: fp8`. Built on the
hf recipe (hub names): each targeted weight is decoded from whatever the source stores, in float32,
and encoded; untargeted tensors keep their storage (quantized ones are dequantized to bf16, since
one checkpoint holds one quantization scheme).
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from moeport.codecs import Fp8BlockCodec, PackQuantizedCodec, float_quantized_codec
from moeport.codecs.base import Codec
from moeport.convert.batching import active_batcher
from moeport.convert.dequantize import Cast
from moeport.convert.hf import build_hf
from moeport.convert.plan import Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.device import stack_to, to_device, to_host
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Op
from moeport.mappings.values import Lazy, Value, is_meta, realize, realize_on, shape_of
from moeport.sources.checkpoint import Checkpoint

SCHEMES = ("w4a16", "w8a16", "fp8", "fp8-block")
# Never quantized whatever --targets says: embeddings, norms, routers, the LM head, vision towers.
ALWAYS_IGNORED = (
    r"embed",
    r"norm",
    r"lm_head",
    r"(^|\.)head\.",
    r"\.mlp\.gate\.",
    r"\.gate\.weight$",
    r"router",
    r"shared_expert_gate",
    r"visual|vision",
    r"\.indexer\.",
)


@dataclass(frozen=True)
class Recipe:
    scheme: str
    group_size: int | None = 128  # None: per channel (w4a16/w8a16 only)
    targets: str = "experts"  # "experts" | "all-linear"
    ignore: tuple[str, ...] = ()  # extra regexes (re.search on the weight name)

    def codec(self) -> Codec:
        if self.scheme in ("w4a16", "w8a16"):
            bits = 4 if self.scheme == "w4a16" else 8
            return PackQuantizedCodec(bits=bits, group_size=self.group_size, symmetric=True)
        if self.scheme == "fp8":
            return float_quantized_codec("channel")
        if self.scheme == "fp8-block":
            return Fp8BlockCodec(block=(128, 128))
        raise MoeportError(f"--to {self.scheme}: unknown scheme; expected one of {', '.join(SCHEMES)}")


@dataclass(frozen=True)
class Encode(Op):
    """A float weight -> the parts of `codec` (names: `{base}{part}`), one weight at a time."""

    source: str
    base: str  # target name prefix, e.g. 'model.layers.1.mlp.experts.0.up_proj.'
    codec: Codec
    part_specs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    device: str = "cpu"

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.source,)

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.base + p for p, _, _ in self.part_specs)

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        v = values[self.source]
        batcher = active_batcher()
        if batcher is not None and not is_meta(v):
            key = ("encode", self.codec, self.part_specs)
            run = functools.partial(_encode_batch, self.codec, self.part_specs, batcher.device, self.base)
            encoded = batcher.submit(key, v, math.prod(shape_of(v)), run)
        else:
            encoded = functools.cache(lambda: self._encode(realize(v)))  # one encode serves every part
        return {
            self.base + part: Lazy(shape, dtype, is_meta(v), produce=lambda p=part: encoded()[p])
            for part, dtype, shape in self.part_specs
        }

    def _encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.codec.encode(to_device(w, self.device))  # codecs compute in float32 themselves
        parts = {p: t.cpu() for p, t in parts.items()}
        for part, dtype, shape in self.part_specs:
            got = parts[part]
            if got.dtype != dtype or tuple(got.shape) != shape:
                raise MoeportError(
                    f"{self.base}{part}: encoded {got.dtype}{list(got.shape)}, planned {shape}"
                )
        return parts

    def inverse(self) -> Op:
        raise MoeportError(f"{self.source}: quantizing is lossy and has no inverse")


def _encode_batch(codec: Codec, part_specs, device: str, where: str, batch: list[Value]) -> list[dict]:
    """Encode same-shape weights together: stacked on the device, one encode, one copy back per part."""
    w = stack_to(device, [realize_on(v, device) for v in batch])
    if codec.stacked_encode:
        parts = codec.encode(w)
    else:
        each = [codec.encode(w[i]) for i in range(len(batch))]
        parts = {p: torch.stack([e[p] for e in each]) for p in each[0]}
    host = {p: to_host(t) for p, t in parts.items()}
    for part, dtype, shape in part_specs:
        got = host[part]
        if got.dtype != dtype or tuple(got.shape) != (len(batch), *shape):
            raise MoeportError(f"{where}{part}: encoded {got.dtype}{list(got.shape[1:])}, planned {shape}")
    return [{p: t[i] for p, t in host.items()} for i in range(len(batch))]


def plan_gpu(ck: Checkpoint, det: Detection, recipe: Recipe, device: str = "cpu") -> Plan:
    codec = recipe.codec()
    base, decoded = build_hf(ck, det, "hub", torch.float32, cast_floats=False, device=device)
    base = finalize(base, ck)  # specs of the float plan tell which outputs are 2-D weights
    spec_of = {s.name: s for s in base.specs}
    expert_re = _expert_regex(det)
    ignore = [re.compile(p) for p in (*ALWAYS_IGNORED, *recipe.ignore)]
    part_cache: dict[tuple[int, ...], tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]] = {}
    quantized: list[str] = []
    kept_linear: list[str] = []

    def is_target(name: str) -> bool:
        spec = spec_of[name]
        if not name.endswith(".weight") or len(spec.shape) != 2 or any(r.search(name) for r in ignore):
            return False
        return recipe.targets == "all-linear" or bool(expert_re.match(name))

    units: list[Unit] = []
    for unit in base.units:
        extra: list[Op] = []
        for name in unit.op.outputs:
            if is_target(name):
                shape = spec_of[name].shape
                if shape not in part_cache:
                    part_cache[shape] = _part_specs(codec, shape, name)
                extra.append(Encode(name, name.removesuffix("weight"), codec, part_cache[shape], device))
                quantized.append(name)
            else:
                if name in decoded:
                    extra.append(Cast(name, name, torch.bfloat16))
                if name.endswith(".weight") and len(spec_of[name].shape) == 2:
                    kept_linear.append(name.removesuffix(".weight"))
        units.append(Unit(unit.layer, Chain((unit.op, *extra)) if extra else unit.op))
    if not quantized:
        raise MoeportError(f"{ck.root}: no weight matches --targets {recipe.targets} (after --ignore)")
    plan = Plan(units, _config(ck.config, recipe, kept_linear))
    plan.notes.append(f"{recipe.scheme}: {len(quantized)} weights quantized, {len(kept_linear)} linear kept")
    return finalize(plan, ck)


def _expert_regex(det: Detection) -> re.Pattern[str]:
    layout = det.family.hub
    prefix = re.escape(det.layer_prefix).replace(re.escape("{L}"), r"\d+")
    projs = "|".join(re.escape(p) for p in layout.projs.values())
    return re.compile(rf"^{prefix}{re.escape(layout.block)}\.experts\.\d+\.({projs})\.weight$")


def _part_specs(codec: Codec, shape: tuple[int, ...], where: str):
    """Names, dtypes and shapes of the encoded parts (encode a small stand-in of the same shape)."""
    try:
        parts = codec.encode(torch.ones(shape))
    except MoeportError as exc:
        raise MoeportError(f"{where}: {exc}") from None
    return tuple((p, t.dtype, tuple(t.shape)) for p, t in parts.items())


def _config(config: dict[str, Any] | None, recipe: Recipe, kept_linear: list[str]) -> dict[str, Any] | None:
    if config is None:
        return None
    cfg = copy.deepcopy(config)
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict):
            c.pop("quantization_config", None)
    cfg["quantization_config"] = quantization_config(recipe, kept_linear)
    return cfg


def quantization_config(recipe: Recipe, kept_linear: list[str]) -> dict[str, Any]:
    """config.json `quantization_config`, as compressed-tensors (or DeepSeek FP8) reads it."""
    if recipe.scheme == "fp8-block":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": sorted(kept_linear) + ["lm_head"],
        }
    if recipe.scheme == "fp8":
        weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
        activations = {
            "num_bits": 8,
            "type": "float",
            "strategy": "token",
            "symmetric": True,
            "dynamic": True,
        }
        fmt = "float-quantized"
    else:
        bits = 4 if recipe.scheme == "w4a16" else 8
        grouped = recipe.group_size is not None
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": True,
            "strategy": "group" if grouped else "channel",
            "group_size": recipe.group_size,
        }
        activations = None
        fmt = "pack-quantized"
    weights.update({"dynamic": False, "actorder": None, "observer": "minmax"})
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activations,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": sorted(kept_linear) + ["lm_head"],
        "kv_cache_scheme": None,
    }
