"""Config facts of a family whose layers hold expert groups (ERNIE-4.5-VL: text and vision).

The Hub's config.json of ERNIE-4.5-VL says `moe_num_experts: [64, 64]` and
`moe_intermediate_size: [1536, 512]`, one value per group; transformers' config says
`moe_num_experts: 64` (per group) and keeps the list of sizes. A layer holds every group's experts
(one per-expert list of 2E on the Hub), so the count detection checks is the sum.
"""

from __future__ import annotations

from moeport.zoo.families import Family
from moeport.zoo.model_config import ModelConfig


def _whole_list(value: object, groups: int) -> list[int] | None:
    if isinstance(value, list) and len(value) == groups and all(type(v) is int for v in value):
        return value
    return None


def configured_experts(cfg: ModelConfig, family: Family) -> int | None:
    """Routed experts per layer that config.json states: every group's together."""
    groups = len(family.fused.groups)
    if groups and (counts := _whole_list(cfg.first(family.fields.num_experts), groups)) is not None:
        return sum(counts)
    n = cfg.first_int(family.fields.num_experts)
    return n * groups if n is not None and groups else n


def configured_intermediate(cfg: ModelConfig, family: Family) -> int | None:
    """The experts' intermediate size; None where the groups' sizes differ (no one value)."""
    groups = len(family.fused.groups)
    if groups and (sizes := _whole_list(cfg.first(family.fields.expert_intermediate), groups)) is not None:
        return sizes[0] if len(set(sizes)) == 1 else None
    return cfg.first_int(family.fields.expert_intermediate)
