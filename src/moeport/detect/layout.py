"""Find the routed-expert tensors of a family in a list of keys, using its templates."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

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


@dataclass(frozen=True)
class LayerNaming:
    """Where each layer's tensors are: decoder layers under `main` ('model.layers.{L}.'), MTP layers
    stored apart (Qwen3-Next 'mtp.layers.{L}.', DeepSeek-V4 'mtp.{L}.') under `mtp`. MTP layer k is
    numbered `mtp_first + k` (num_hidden_layers + k), as DeepSeek-V3 stores its own MTP layer, so
    every consumer of layer numbers treats both storages alike."""

    main: str
    mtp: str | None = None
    mtp_first: int = 0

    def prefix(self, layer: int) -> str:
        if self.mtp is not None and layer >= self.mtp_first:
            return self.mtp.replace("{L}", str(layer - self.mtp_first))
        return self.main.replace("{L}", str(layer))

    @cached_property
    def _regexes(self) -> list[tuple[re.Pattern[str], int]]:
        out = [(re.compile("^" + layer_prefix_pattern(self.main)), 0)]
        if self.mtp is not None:
            out.append((re.compile("^" + layer_prefix_pattern(self.mtp)), self.mtp_first))
        return out

    def split(self, key: str) -> tuple[int, str] | None:
        """(layer, name relative to the layer) of a key under a layer, else None."""
        for regex, offset in self._regexes:
            m = regex.match(key)
            if m:
                return int(m["L"]) + offset, key[m.end() :]
        return None

    def layer_of(self, key: str) -> int | None:
        found = self.split(key)
        return None if found is None else found[0]

    def pattern(self) -> str:
        """Regex source (no groups) matching the prefix of any layer, MTP included."""
        sources = [self.main] + ([self.mtp] if self.mtp is not None else [])
        return "(?:" + "|".join(re.escape(p).replace(re.escape("{L}"), r"\d+") for p in sources) + ")"

    def expert_layers(self, keys: list[str], layout: ExpertLayout) -> dict[int, LayerExperts]:
        """The routed-expert tensors of `layout` in every layer, MTP layers renumbered."""
        found = match_layout(keys, layout, self.main)
        layers = dict(found.layers) if found else {}
        if self.mtp is not None:
            mtp = match_layout(keys, layout, self.mtp)
            layers.update({self.mtp_first + L: le for L, le in (mtp.layers if mtp else {}).items()})
        return layers


def find_naming(
    keys: list[str], main: str, mtp_prefixes: tuple[str, ...], num_layers: int | None
) -> LayerNaming:
    """The main layer prefix, and the first of the family's MTP prefixes the keys use, its layers
    numbered from num_hidden_layers (or after the last main layer when the config does not say)."""
    for mtp in mtp_prefixes:
        regex = re.compile("^" + layer_prefix_pattern(mtp))
        if any(regex.match(k) for k in keys):
            main_re = re.compile("^" + layer_prefix_pattern(main))
            found = [int(m["L"]) for k in keys if (m := main_re.match(k))]
            first = num_layers if num_layers is not None else max(found, default=-1) + 1
            return LayerNaming(main, mtp, first)
    return LayerNaming(main)


def layer_prefix_pattern(layer_prefix: str) -> str:
    """Regex source for a layer prefix template: '{L}' becomes the named group L."""
    return re.escape(layer_prefix).replace(re.escape("{L}"), r"(?P<L>\d+)")


def _expert_regex(layout: ExpertLayout, layer_prefix: str) -> re.Pattern[str]:
    prefix = layer_prefix_pattern(layer_prefix)
    base = re.escape(layout.base)
    projs = "|".join(re.escape(p) for p in layout.projs.values())
    if layout.kind == "per-expert":
        index = re.escape(layout.index_prefix)  # `experts.expert_3.` (Switch, NLLB-MoE)
        tail = rf"{index}(?P<E>\d+)\.(?P<proj>{projs})\.(?P<part>[A-Za-z0-9_]+)"
    elif layout.dotted:  # module parameters: `input_linear.weight`, `input_linear.weight_scale`
        tail = rf"(?P<proj>{projs})\.(?P<part>[A-Za-z0-9_]+)"
    else:
        tail = rf"(?P<proj>{projs})(?P<part>_[A-Za-z0-9_]+|\.weight)?"
    return re.compile(rf"^{prefix}{base}{tail}$")


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
    if kind == "per-expert" or part in _FUSED_OWN_SUFFIXES or not part.startswith(("_", ".")) and part:
        return part
    if part in ("", ".weight"):
        return "weight"
    return "weight" + part
