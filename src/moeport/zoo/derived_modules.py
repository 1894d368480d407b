"""Routed experts that transformers keeps as separate modules, one MLP per expert.

Switch Transformers and NLLB-MoE hold each expert as its own module in a `ModuleDict`
(`mlp.experts.expert_3.wi`, `ffn.experts.expert_3.fc1` with biases): transformers has no fused
stacks for them and no conversion mapping, so the names it holds in memory are the names it saves
(checked here: its own revert hands back the very tensors it holds), and the hub layout is the
fused one. Their experts are not gated (one projection in, one out: ReLU MLPs); which one is which
is read off the shapes, [I, H] in and [H, I] out. Gated separate modules are refused: nothing in
transformers' definitions would say which of their projections is the gate.
"""

from __future__ import annotations

import re
from typing import Any

from moeport.zoo.derived_experts import NotDerivable
from moeport.zoo.families import ExpertLayout

# `{prefix}{L}.{block}.experts.{word}{E}.{proj}.weight|bias`: the index may follow a word (`expert_3`)
_MODULE_KEY = re.compile(
    r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<block>(?:\w+\.)*?)experts\."
    r"(?P<index>[A-Za-z_]*?)(?P<E>\d+)\.(?P<proj>\w+)\.(?P<part>weight|bias)$"
)


def module_experts(
    model_type: str, state: dict, hub_state: dict, hidden: int, experts: int, why: NotDerivable
) -> tuple[dict[str, Any], list[str]]:
    """transformers' per-expert modules as `fused_experts` describes stacks (prefix, block,
    layout, experts, intermediate, hidden, layers) and their keys; `why` (the reason no fused
    stacks were found) is raised again where the model has no such modules."""
    paths: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key, value in state.items():
        m = _MODULE_KEY.match(key)
        if m is None or (m["part"] == "weight" and value.dim() != 2):
            continue
        path = paths.setdefault((m["prefix"], m["block"], m["index"]), {"keys": [], "shapes": {}, "E": set()})
        path["keys"].append(key)
        path["E"].add(int(m["E"]))
        path["shapes"].setdefault((m["proj"], m["part"]), set()).add(tuple(value.shape))
    if not paths:
        raise why
    if len(paths) > 1:
        where = sorted((prefix, f"{block}experts.{index}") for prefix, block, index in paths)
        raise NotDerivable(f"{model_type}: experts under several module paths {where}")
    (prefix, block, index), found = next(iter(paths.items()))
    if found["E"] != set(range(experts)):
        numbered = f"its expert modules are numbered {sorted(found['E'])}, not 0..{experts - 1}"
        raise NotDerivable(f"{model_type}: {numbered}")
    projs = _up_down(model_type, found["shapes"], hidden)
    _check_saved_as_held(model_type, state, hub_state, found["keys"])
    layout = ExpertLayout("per-expert", block.removesuffix("."), projs, index_prefix=index)
    (up,) = found["shapes"][(projs["up"], "weight")]
    layers = sorted({int(m["L"]) for k in found["keys"] if (m := _MODULE_KEY.match(k))})
    out = {"prefix": prefix, "block": layout.block_prefix, "layout": layout, "experts": experts}
    return {**out, "intermediate": up[0], "hidden": up[1], "layers": layers}, found["keys"]


def _up_down(model_type: str, shapes: dict[tuple[str, str], set], hidden: int) -> dict[str, str]:
    """{'up': name, 'down': name} of a non-gated expert: up [I, H] into the MLP, down [H, I] out."""
    weights = {proj: s for (proj, part), s in shapes.items() if part == "weight"}
    if len(weights) != 2 or any(len(s) != 1 for s in weights.values()):
        why = f"expert modules hold projections {sorted(weights)}"
        if len(weights) == 3:
            why += ", gated: transformers' definitions do not say which is the gate"
        raise NotDerivable(f"{model_type}: {why}; moeport reads separate expert modules as up and down only")
    (a, (sa,)), (b, (sb,)) = sorted((p, tuple(s)) for p, s in weights.items())
    if sa[1] == hidden and sb == (sa[1], sa[0]):
        return {"up": a, "down": b}
    if sb[1] == hidden and sa == (sb[1], sb[0]):
        return {"up": b, "down": a}
    why = f"expert projections {a} {list(sa)} and {b} {list(sb)} do not chain as an MLP"
    raise NotDerivable(f"{model_type}: {why} of hidden size {hidden}")


def _check_saved_as_held(model_type: str, state: dict, hub_state: dict, keys: list[str]) -> None:
    """transformers saves these modules as it holds them: its revert hands back the same tensors
    under the same names (no conversion mapping touches them)."""
    for key in keys:
        if hub_state.get(key) is not state[key]:
            why = f"transformers saves its expert module '{key}' under another name"
            raise NotDerivable(f"{model_type}: {why}")
