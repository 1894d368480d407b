"""Find the routed-expert tensors of a family in a list of keys, using its templates."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from moeport.zoo.families import ExpertLayout


@dataclass
class LayerExperts:
    """Expert tensors found in one layer."""

    keys: list[str] = field(default_factory=list)
    experts: set[int] = field(default_factory=set)  # per-expert layout only
    # (expert, proj) -> {part suffix: key}; expert is -1 in the fused layout
    parts: dict[tuple[int, str], dict[str, str]] = field(default_factory=lambda: defaultdict(dict))


@dataclass
class LayoutMatch:
    layout: ExpertLayout
    layer_prefix: str  # template with {L}
    layers: dict[int, LayerExperts]


def layer_prefix_pattern(layer_prefix: str) -> str:
    """Regex source for a layer prefix template: '{L}' becomes the named group L."""
    return re.escape(layer_prefix).replace(re.escape("{L}"), r"(?P<L>\d+)")


def _expert_regex(layout: ExpertLayout, layer_prefix: str) -> re.Pattern[str]:
    prefix = layer_prefix_pattern(layer_prefix)
    block = re.escape(layout.block)
    projs = "|".join(re.escape(p) for p in layout.projs.values())
    if layout.kind == "per-expert":
        tail = rf"(?P<E>\d+)\.(?P<proj>{projs})\.(?P<part>[A-Za-z0-9_]+)"
    else:
        tail = rf"(?P<proj>{projs})(?P<part>_[A-Za-z0-9_]+|\.weight)?"
    return re.compile(rf"^{prefix}{block}\.experts\.{tail}$")


def match_layout(keys: list[str], layout: ExpertLayout, layer_prefix: str) -> LayoutMatch | None:
    """All expert tensors of `layout` under `layer_prefix`; None when nothing matches."""
    regex = _expert_regex(layout, layer_prefix)
    layers: dict[int, LayerExperts] = defaultdict(LayerExperts)
    for key in keys:
        m = regex.match(key)
        if not m:
            continue
        layer = layers[int(m["L"])]
        layer.keys.append(key)
        expert = int(m["E"]) if layout.kind == "per-expert" else -1
        if expert >= 0:
            layer.experts.add(expert)
        part = _normalise_part(m["part"] or "", layout.kind)
        layer.parts[(expert, m["proj"])][part] = key
    return LayoutMatch(layout, layer_prefix, dict(layers)) if layers else None


# GPT-OSS names its MXFP4/bias companions with these suffixes; they keep their own names.
_FUSED_OWN_SUFFIXES = ("_blocks", "_scales", "_bias")


def _normalise_part(part: str, kind: str) -> str:
    """Give fused companions per-expert names: '' -> 'weight', '_scale_inv' -> 'weight_scale_inv'."""
    if kind == "per-expert" or part in _FUSED_OWN_SUFFIXES:
        return part
    if part in ("", ".weight"):
        return "weight"
    return "weight" + part
