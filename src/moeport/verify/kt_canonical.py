"""kt-kernel merged outputs (`blk.{L}.ffn_{gate|up|down}_exps.{E}.numa.{t}.weight|scale`) in canonical form.

Each expert matrix is dequantized slice by slice (kt_amx.kt_dequantize) and the TP slices are put
back together (gate/up: rows, down: columns), under the hub names of the source family recorded
in the shard metadata. Non-expert tensors are decoded like any HF tensor.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

import torch

from moeport.codecs.kt_amx import kt_dequantize
from moeport.convert.hf import _Builder
from moeport.convert.plan import Unit, run_unit
from moeport.errors import MoeportError
from moeport.mappings.rename import IDENTITY, Rename
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import CanonicalLayer
from moeport.zoo.families import family_for_model_type
from moeport.zoo.model_config import ModelConfig

KT_KEY = re.compile(
    r"^blk\.(?P<L>\d+)\.ffn_(?P<proj>gate|up|down)_exps\.(?P<E>\d+)\.numa\.(?P<t>\d+)\.(?P<part>weight|scale)$"
)


def _meta(ck: Checkpoint) -> dict[str, str]:
    for meta in ck.metadata.values():
        if "kt_method" in meta:
            return meta
    return {}


def is_kt(ck: Checkpoint) -> bool:
    return bool(_meta(ck)) or any(KT_KEY.match(k) for k in ck.keys())


def kt_layers(ck: Checkpoint) -> Iterator[CanonicalLayer]:
    meta = _meta(ck)
    method = meta.get("kt_method")
    if method not in ("AMXINT4", "AMXINT8"):
        raise MoeportError(f"{ck.root}: kt output without a known kt_method in its metadata ({method!r})")
    bits = 4 if method == "AMXINT4" else 8
    cfg = ModelConfig(ck.config or {})
    family = next((f for f in map(family_for_model_type, cfg.model_types) if f is not None), None)
    if family is None:
        raise MoeportError(f"{ck.root}: kt output needs the source config.json to name its tensors")
    experts: dict[int, dict[tuple[int, str], dict[int, dict[str, str]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    others: list[str] = []
    for key in ck.keys():
        m = KT_KEY.match(key)
        if m:
            experts[int(m["L"])][(int(m["E"]), m["proj"])][int(m["t"])][m["part"]] = key
        else:
            others.append(key)
    rename = _to_hub_names(family, others)
    prefix = _layer_prefix(family, others)
    by_layer: dict[int | None, list[str]] = defaultdict(list)
    layer_re = re.compile("^" + re.escape(prefix).replace(re.escape("{L}"), r"(?P<L>\d+)"))
    for key in others:
        m = layer_re.match(key)
        by_layer[int(m["L"]) if m else None].append(key)
    builder = _Builder(ck, cfg.quantization_config or {}, torch.float32, True)
    for layer in sorted(set(by_layer) | set(experts), key=lambda L: -1 if L is None else L):
        tensors: dict[str, torch.Tensor] = {}
        for op in builder.other_tensors(by_layer.get(layer, []), rename):
            for name, t in run_unit(Unit(layer, op), ck):
                tensors[name] = t.float() if t.is_floating_point() else t
        for (e, proj), slices in sorted(experts.get(layer, {}).items()):
            block = f"{prefix.replace('{L}', str(layer))}{family.hub.block}"
            name = f"{block}.experts.{e}.{family.hub.projs[proj]}.weight"
            tensors[name] = _expert(ck, slices, bits, proj, name)
        yield CanonicalLayer(layer, tensors)


def _expert(ck: Checkpoint, slices: dict[int, dict[str, str]], bits: int, proj: str, where: str):
    parts = []
    for t in sorted(slices):
        w, s = ck.read(slices[t]["weight"]), ck.read(slices[t]["scale"])
        n = s.numel()
        k = w.numel() * (2 if bits == 4 else 1) // n
        parts.append(kt_dequantize(w, s, n, k, bits, where=where))
    return torch.cat(parts, dim=1 if proj == "down" else 0)


def _layer_prefix(family, keys: list[str]) -> str:
    for prefix in family.layer_prefixes:
        pattern = re.compile("^" + re.escape(prefix).replace(re.escape("{L}"), r"\d+"))
        if any(pattern.match(k) for k in keys):
            return prefix
    return family.layer_prefixes[0]


def _to_hub_names(family, keys: list[str]) -> Rename:
    """kt outputs keep the source's non-expert names; bring fused-layout names back to hub names."""
    if not family.fused_renames:
        return IDENTITY
    forward = Rename(family.fused_renames)
    back = forward.inverse()
    fused_named = any(back(k) != k for k in keys) and not any(forward(k) != k for k in keys)
    return back if fused_named else IDENTITY
