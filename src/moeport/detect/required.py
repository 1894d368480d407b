"""Tensors a MoE layer cannot do without, checked from headers before any work.

A checkpoint missing one layer's router (or its score-correction bias, or a norm) converts
"successfully" into a model that cannot run. Which tensors are required is data: the family's
router names, and whatever router bias and layer norms the checkpoint's other layers of the same
kind carry (a layer stack is uniform; an MTP layer is compared with MTP layers only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from moeport.detect.layout import LayerNaming
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.families import ExpertLayout, Family

_NORM = re.compile(r"^[A-Za-z_]*norm[A-Za-z_]*\.weight$")  # directly under the layer


def check_required(
    ck: Checkpoint, family: Family, layout: ExpertLayout, naming: LayerNaming, groups: Iterable[list[int]]
) -> None:
    """Every MoE layer has a router; router bias and layer norms are present in all layers of a
    group or in none. Raises naming the first missing tensor."""
    by_layer = _relative_names(ck.keys(), naming)
    for layers in groups:
        if not layers:
            continue
        rel = {L: by_layer.get(L, set()) for L in layers}
        block = layout.block_prefix
        # a router transformers converts on load is carried under its hub block in either layout
        # (Ergo's `feed_forward.gate_kernel` beside `mlp.experts.*`), as detect/stacks.py finds it
        blocks = dict.fromkeys([block, *(other.block_prefix for other in family.layouts)])
        routers = [b + r for r in family.router for b in blocks]
        for L in layers:
            if routers and not any(r in rel[L] for r in routers):  # () : none (VitPose+)
                names = " or ".join(f"'{naming.prefix(L)}{r}'" for r in routers)
                raise MoeportError(f"{ck.root}: MoE layer {L} has no router tensor (expected {names})")
        wanted = {block + b for b in family.router_bias} | {
            n for r in rel.values() for n in r if _NORM.match(n)
        }
        for name in sorted(wanted):
            have = [L for L in layers if name in rel[L]]
            if have and len(have) != len(layers):
                missing = next(L for L in layers if name not in rel[L])
                raise MoeportError(
                    f"{ck.root}: layer {missing} has no '{naming.prefix(missing)}{name}', "
                    f"which layer {have[0]} has (layers of one kind carry the same router bias and norms)"
                )


def _relative_names(keys: list[str], naming: LayerNaming) -> dict[int, set[str]]:
    """Each layer's tensor names relative to the layer, in one pass over the keys."""
    out: dict[int, set[str]] = {}
    for key in keys:
        found = naming.split(key)
        if found:
            out.setdefault(found[0], set()).add(found[1])
    return out
