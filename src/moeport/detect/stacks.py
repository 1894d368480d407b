"""Expert stacks stored apart from the main layers in one checkpoint (zoo.families.Stack).

Qwen3-Omni keeps a thinker (`thinker.model.layers.{L}.`) and a talker (`talker.model.layers.{L}.`),
each a MoE decoder with its own sizes and its own nested text config; an encoder-decoder keeps its
encoder's layers beside its decoder's. Each further stack found in the keys becomes more layers of
one `LayerNaming`, numbered after the layers before it, so the recipes, verify and kt see layer
numbers only. What may differ between stacks (expert count, hidden and intermediate sizes) is read
per stack from its own config, and said per stack in `StackFacts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeport.detect.groups import configured_intermediate
from moeport.detect.layout import (
    LayerExperts,
    LayerNaming,
    layer_prefix_pattern,
    match_layout,
    storage_counts,
)
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.families import ExpertLayout, Family
from moeport.zoo.model_config import ModelConfig


@dataclass(frozen=True)
class StackFacts:
    """One stack of layers: where it is, its layer numbers (global), and its config's sizes."""

    prefix: str  # layer prefix with {L}
    first: int  # the global number of its layer 0
    layers: tuple[int, ...]  # global numbers of its layers in the checkpoint (MoE or dense)
    config: str  # dotted path of its text config in config.json ('' : none found)
    experts: int  # routed experts per MoE layer (from the tensors)
    hidden_size: int | None
    expert_intermediate_size: int | None
    experts_per_token: int | None


def stack_configs(family: Family, cfg: ModelConfig) -> list[ModelConfig]:
    """The config of the main stack, then of each of the family's further stacks."""
    main = cfg.at(family.config) if family.config else cfg
    return [main] + [cfg.at(s.config) if s.config else main for s in family.stacks]


def with_family_stacks(
    keys: list[str], family: Family, naming: LayerNaming, main_layers: int | None, config: dict | None
) -> tuple[LayerNaming, list[ModelConfig]]:
    """`naming` with each of the family's further stacks that has a router under one of its
    prefixes (the first such prefix: a stack with MoE layers, not the encoder of DiffusionGemma,
    whose only own tensors are buffers, its weights being the decoder's), numbered after the layers
    before it, and the config of every stack in the result (main first). Routers are in every
    output (kt keeps them), so the same numbering comes out wherever it runs."""
    cfgs = stack_configs(family, ModelConfig(config or {}))
    found: list[str] = []
    used: list[ModelConfig] = [cfgs[0]]
    for stack, scfg in zip(family.stacks, cfgs[1:], strict=True):
        for prefix in stack.prefixes:
            regex = re.compile("^" + layer_prefix_pattern(prefix) + f"(?:{_routers(family)})$")
            if any(regex.match(k) for k in keys):
                found.append(prefix)
                used.append(scfg)
                break
    if not found:
        return naming, used
    counts = storage_counts(keys, [naming.main, *([naming.mtp] if naming.mtp else []), *found])
    if main_layers is not None:
        counts[naming.main] = max(counts[naming.main], main_layers)
    for prefix, scfg in zip(found, used[1:], strict=True):  # a stack's trailing dense layers count too
        counts[prefix] = max(counts[prefix], scfg.first_int(family.fields.num_layers) or 0)
    return naming.with_stacks(found, counts), used


def _routers(family: Family) -> str:
    blocks = {layout.block_prefix for layout in family.layouts}
    return "|".join(re.escape(b + r) for b in blocks for r in family.router)


def find_stacks(
    ck: Checkpoint, family: Family, naming: LayerNaming, layout: ExpertLayout, main_layers: int | None
) -> tuple[LayerNaming, dict[int, LayerExperts], list[ModelConfig]]:
    """`naming` with the family's further stacks found in the keys, the experts of those stacks by
    global layer number, and the config of each stack in naming (main first). A stack stored in
    another expert layout than the main one is refused."""
    keys = ck.keys()
    grown, cfgs = with_family_stacks(keys, family, naming, main_layers, ck.config)
    experts: dict[int, LayerExperts] = {}
    for prefix, first in grown.stacks[len(naming.stacks) :]:
        refuse_other_layout(
            ck, family, layout, prefix, f"experts under '{prefix}'", f"those under '{naming.main}'"
        )
        match = match_layout(keys, layout, prefix)
        experts.update({first + L: le for L, le in (match.layers if match else {}).items()})
    return grown, experts, cfgs


def refuse_other_layout(
    ck: Checkpoint, family: Family, layout: ExpertLayout, prefix: str, these: str, others: str
) -> None:
    """Layers stored apart (a further stack, MTP layers) hold their experts in the main layers'
    `layout`: another of the family's layouts under `prefix` is refused in one line."""
    other = next(
        (lay for lay in family.layouts if lay != layout and match_layout(ck.keys(), lay, prefix)), None
    )
    if other is not None:
        raise MoeportError(
            f"{ck.root}: {these} are {other.kind}, {others} {layout.kind}; "
            "one checkpoint holds one expert layout"
        )


def stack_facts(
    family: Family,
    naming: LayerNaming,
    cfgs: list[ModelConfig],
    layer_bytes: dict[int, int],
    layer_experts: dict[int, int],
) -> list[StackFacts]:
    """Facts of every stack (main first), each from its own config; layer_experts: per MoE layer."""
    storages = [(naming.main, 0)] + list(naming.stacks)
    out = []
    for index, ((prefix, first), cfg) in enumerate(zip(storages, cfgs, strict=True)):
        layers = tuple(L for L in sorted(layer_bytes) if naming.stack_of(L) == index)
        counts = [layer_experts[L] for L in layers if L in layer_experts]
        fields = family.fields
        out.append(
            StackFacts(
                prefix=prefix,
                first=first,
                layers=layers,
                config=cfg.text_path,
                experts=counts[0] if counts else 0,
                hidden_size=cfg.first_int(fields.hidden_size),
                expert_intermediate_size=configured_intermediate(cfg, family),
                experts_per_token=cfg.first_int(fields.experts_per_token),
            )
        )
    return out


def check_stack_counts(
    ck: Checkpoint, family: Family, facts: list[StackFacts], layer_experts: dict[int, int]
) -> list[str]:
    """Each stack's config expert count against its tensors (refused when they disagree); warnings
    where a stack's own layers differ in expert count."""
    warnings = []
    for stack in facts[1:]:  # the main stack is checked by detect itself
        counts = {layer_experts[L] for L in stack.layers if L in layer_experts}
        if len(counts) > 1:
            warnings.append(f"expert count differs between layers under '{stack.prefix}': {sorted(counts)}")
        n_cfg = (
            ModelConfig(ck.config or {}).at(stack.config).first_int(family.fields.num_experts)
            if stack.config
            else None
        )
        if n_cfg is not None and counts and n_cfg != stack.experts:
            raise MoeportError(
                f"{ck.root}: config.json says {n_cfg} experts per layer ({stack.config}."
                f"{family.fields.num_experts[0]}), the tensors under '{stack.prefix}' hold {stack.experts}"
            )
    return warnings
