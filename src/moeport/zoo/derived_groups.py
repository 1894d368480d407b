"""Expert groups: one layer's experts held in several blocks of stacks, read off transformers.

ERNIE-4.5-VL keeps one per-expert list of 2E experts per MoE layer on the Hub (text experts
first, then vision: `mlp.experts.{0..2E-1}`), while transformers holds two blocks of stacks,
`mlp.text_moe.experts.gate_up_proj` and `mlp.vision_moe.experts.gate_up_proj` (its
`ErnieFuseAndSplitTextVisionExperts` converter cuts the list into equal, contiguous ranges). moeport
describes that as data (`ExpertLayout.groups`) and re-lays it out with its own Stack/Concat ops
per range, so the converter is accepted only where it is exactly that: seeded stacks run through
transformers' own revert must come out, expert by expert, as the ranges in the groups' order.
"""

from __future__ import annotations

import torch

from moeport.errors import MoeportError
from moeport.zoo.families import ExpertLayout

Stacks = dict[str, tuple[str, tuple[int, ...], bool]]  # stack name -> (key, shape, dotted)


def expert_groups(found: dict[tuple[str, str], Stacks]) -> tuple[str, tuple[str, ...]]:
    """(block, groups) where the stacks found under several module paths are groups: one layer
    prefix, modules `{block}.{group}.{container}` alike but for the group, the same stack names and
    expert count in each; ('', ()) otherwise. Groups keep the module tree's order."""
    prefixes = {prefix for prefix, _ in found}
    split = [module.rsplit(".", 2) for _, module in found]
    if len(found) < 2 or len(prefixes) != 1 or any(len(s) != 3 for s in split):
        return "", ()
    if len({(block, container) for block, _, container in split}) != 1:
        return "", ()
    stacks = list(found.values())
    if any(set(s) != set(stacks[0]) or _experts(s) != _experts(stacks[0]) for s in stacks):
        return "", ()
    return split[0][0], tuple(group for _, group, _ in split)


def _experts(stacks: Stacks) -> set[int]:
    return {shape[0] for _, shape, _ in stacks.values()}


def check_group_ranges(
    model_type: str, model, state: dict, fused: dict, hub: ExpertLayout, hub_prefix: str
) -> None:
    """Seeded stacks of the first MoE layer's groups, reverted by transformers, must give hub
    expert g*E + e as expert e of group g (gate rows, then up rows of gate_up); NotDerivable-style
    MoeportError naming the first expert that does not."""
    from transformers.core_model_loading import revert_weight_conversion

    layout: ExpertLayout = fused["layout"]
    layer = fused["layers"][0]
    experts = fused["experts"]
    g = torch.Generator().manual_seed(0)
    stacks = {}
    for n in range(len(layout.groups)):
        for role, name in layout.group(n).projs.items():
            dot = ".weight" if layout.dotted else ""
            key = f"{fused['prefix']}{layer}.{layout.group(n).base}{name}{dot}"
            stacks[(n, role)] = key, torch.randn(tuple(state[key].shape), generator=g)
    try:
        saved = revert_weight_conversion(model, {key: value for key, value in stacks.values()})
    except Exception as e:  # transformers' own revert failing on real tensors: its reason
        raise MoeportError(f"{model_type}: transformers cannot revert its expert groups ({e})") from e
    for (n, role), (key, value) in stacks.items():  # gate_up: gate rows, then up rows
        for e in range(experts):
            half = value.shape[1] // 2
            parts = (
                {"gate": value[e, :half], "up": value[e, half:]} if role == "gate_up" else {"down": value[e]}
            )
            for part, want in parts.items():
                name = f"{hub_prefix}{layer}.{hub.base}{n * experts + e}.{hub.projs[part]}.weight"
                if name not in saved or not torch.equal(saved[name], want):
                    why = f"'{name}' is not expert {e} of '{key}' ({part}) in transformers' own save"
                    raise MoeportError(f"{model_type}: {why}")


def hub_block_members(
    hub_state: dict, hub_block: str, experts: int, groups: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(routers, router biases) of a grouped layer as the Hub names them, relative to the block:
    transformers converts them on load (ERNIE-4.5-VL's `gate.weight` / `gate.weight_1` [H, E],
    transposed; `moe_statics.e_score_correction_bias` [groups, E], cut per group), so they are
    carried under these names in either layout (zoo/derived_renames.py `carried_names`)."""
    router: list[str] = []
    bias: list[str] = []
    for key, value in hub_state.items():
        rel = key[len(hub_block) :]
        if not key.startswith(hub_block) or rel.startswith(("experts.", "shared")) or value.dim() != 2:
            continue
        if tuple(value.shape) == (groups, experts):
            bias.append(rel)
        elif experts in value.shape:
            router.append(rel)
    return tuple(router), tuple(bias)
