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
    stored apart (Qwen3-Next 'mtp.layers.{L}.', DeepSeek-V4 'mtp.{L}.') under `mtp`, and further
    expert stacks stored apart (Qwen3-Omni's talker 'talker.model.layers.{L}.' beside its thinker)
    in `stacks`, as (prefix, first number). MTP layer k is numbered `mtp_first + k`
    (num_hidden_layers + k), as DeepSeek-V3 stores its own MTP layer, and layer k of a stack
    `first + k`, after every layer before it, so every consumer of layer numbers treats all
    storages alike."""

    main: str
    mtp: str | None = None
    mtp_first: int = 0
    stacks: tuple[tuple[str, int], ...] = ()

    @cached_property
    def _storages(self) -> list[tuple[str, int]]:
        """(prefix, first number) of every storage, the highest first number first."""
        out = [(self.main, 0)] + ([(self.mtp, self.mtp_first)] if self.mtp is not None else [])
        return sorted(out + list(self.stacks), key=lambda pf: -pf[1])

    def _storage(self, layer: int) -> tuple[str, int]:
        return next((p, f) for p, f in self._storages if layer >= f)

    def prefix(self, layer: int) -> str:
        prefix, first = self._storage(layer)
        return prefix.replace("{L}", str(layer - first))

    def stack_of(self, layer: int) -> int:
        """0 for a layer of the main storage (MTP included), k for one of `stacks[k - 1]`."""
        prefix, first = self._storage(layer)
        return next((i + 1 for i, s in enumerate(self.stacks) if s == (prefix, first)), 0)

    @cached_property
    def _regexes(self) -> list[tuple[re.Pattern[str], int]]:
        return [(re.compile("^" + layer_prefix_pattern(p)), first) for p, first in self._storages]

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
        """Regex source (no groups) matching the prefix of any layer, MTP and stacks included."""
        sources = [p for p, _ in sorted(self._storages, key=lambda pf: pf[1])]
        return "(?:" + "|".join(re.escape(p).replace(re.escape("{L}"), r"\d+") for p in sources) + ")"

    def expert_layers(self, keys: list[str], layout: ExpertLayout) -> dict[int, LayerExperts]:
        """The routed-expert tensors of `layout` in every layer, MTP and stack layers renumbered."""
        found = match_layout(keys, layout, self.main)
        layers = dict(found.layers) if found else {}
        for prefix, first in [(self.mtp, self.mtp_first)] * (self.mtp is not None) + list(self.stacks):
            other = match_layout(keys, layout, prefix)
            layers.update({first + L: le for L, le in (other.layers if other else {}).items()})
        return layers

    def with_stacks(self, prefixes: list[str], counts: dict[str, int]) -> LayerNaming:
        """This naming with `prefixes` added as stacks, in order, each numbered after every layer
        before it; `counts`: a storage's number of layers where known (else its keys' highest + 1)."""
        stacks = list(self.stacks)
        for prefix in prefixes:
            ends = [f + counts.get(p, 0) for p, f in self._storages] + [
                f + counts.get(p, 0) for p, f in stacks
            ]
            stacks.append((prefix, max(ends)))
        return LayerNaming(self.main, self.mtp, self.mtp_first, tuple(stacks))


def storage_counts(keys: list[str], prefixes: list[str]) -> dict[str, int]:
    """Each layer prefix's number of layers in `keys`: its highest layer index + 1 (0: none)."""
    out = {}
    for prefix in prefixes:
        regex = re.compile("^" + layer_prefix_pattern(prefix))
        out[prefix] = max((int(m["L"]) + 1 for k in keys if (m := regex.match(k))), default=0)
    return out


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
    if layout.groups:  # `mlp.(text_moe|vision_moe).experts.`: the group names the expert range
        groups = "|".join(re.escape(g) for g in layout.groups)
        base = (
            re.escape(layout.block_prefix)
            + rf"(?P<group>{groups})\."
            + re.escape(layout.base[len(layout.block_prefix) :])
        )
    projs = "|".join(re.escape(p) for p in layout.projs.values())
    if layout.kind == "per-expert":
        index = re.escape(layout.index_prefix)  # `experts.expert_3.` (Switch, NLLB-MoE)
        proj = "(?P<proj>)" if layout.one_linear else rf"(?P<proj>{projs})\."  # VitPose+: `experts.3.weight`
        tail = rf"{index}(?P<E>\d+)\.{proj}(?P<part>[A-Za-z0-9_]+)"
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
        expert = int(m["E"]) if layout.kind == "per-expert" else group_key(layout, m.groupdict().get("group"))
        if expert >= 0:
            layer.experts.add(expert)
        part = _normalise_part(m["part"] or "", layout.kind)
        layer.parts[(expert, m["proj"])][part] = key
    return LayoutMatch(layout, layer_prefix, dict(layers)) if layers else None


def group_key(layout: ExpertLayout, group: str | None) -> int:
    """The expert key of a fused stack in `parts`: -1, or -1 - g for expert group g."""
    return -1 - layout.groups.index(group) if group is not None else -1


def fused_keys(layout: ExpertLayout) -> list[int]:
    """The expert keys of a fused layout's stacks: [-1], or one per expert group."""
    return [-1 - g for g in range(len(layout.groups))] or [-1]


# GPT-OSS names its MXFP4/bias companions with these suffixes; they keep their own names.
_FUSED_OWN_SUFFIXES = ("_blocks", "_scales", "_bias")


def _normalise_part(part: str, kind: str) -> str:
    """Give fused companions per-expert names: '' -> 'weight', '_scale_inv' -> 'weight_scale_inv'."""
    if kind == "per-expert" or part in _FUSED_OWN_SUFFIXES or not part.startswith(("_", ".")) and part:
        return part
    if part in ("", ".weight"):
        return "weight"
    return "weight" + part
