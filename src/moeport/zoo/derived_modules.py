"""Routed experts that transformers keeps as separate modules, one MLP per expert.

Switch Transformers and NLLB-MoE hold each expert as its own module in a `ModuleDict`
(`mlp.experts.expert_3.wi`, `ffn.experts.expert_3.fc1` with biases): transformers has no fused
stacks for them and no conversion mapping, so the names it holds in memory are the names it saves
(checked here: its own revert hands back the very tensors it holds), and the hub layout is the
fused one. Their experts are not gated (one projection in, one out: ReLU MLPs); which one is which
is read off the shapes, [I, H] in and [H, I] out. Gated separate modules are refused: nothing in
transformers' definitions would say which of their projections is the gate. VitPose+ holds each
expert as one bare linear (`mlp.experts.3.weight` [part, K], with a bias), chosen by the caller's
dataset index rather than a router: one role, "down", with no projection name.
"""

from __future__ import annotations

import re
from typing import Any

from moeport.zoo.derived_experts import NotDerivable
from moeport.zoo.families import ExpertLayout, Stack

# `{prefix}{L}.{block}.experts.{word}{E}.{proj}.weight|bias`: the index may follow a word (`expert_3`),
# and the projection is absent where the expert is one linear (VitPose+'s `experts.3.weight`)
_MODULE_KEY = re.compile(
    r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<block>(?:\w+\.)*?)experts\."
    r"(?P<index>[A-Za-z_]*?)(?P<E>\d+)\.(?:(?P<proj>\w+)\.)?(?P<part>weight|bias)$"
)


def module_experts(
    model_type: str, state: dict, hub_state: dict, hidden: int, experts: int, why: NotDerivable
) -> tuple[dict[str, Any], list[str]]:
    """transformers' per-expert modules as `fused_experts` describes stacks (prefix, block,
    layout, experts, intermediate, hidden, layers of the main stack) and their keys; `why` (the
    reason no fused stacks were found) is raised again where the model has no such modules.

    An encoder-decoder holds experts in both stacks, the encoder's first: the first path is the
    main stack, the others are given as layer templates in `stack_templates`. Where their blocks
    differ only before a common tail (Switch: `layer.1.mlp` in the encoder, `layer.2.mlp` in the
    decoder), the differing head joins each layer template (`encoder.block.{L}.layer.1.`) and the
    layout's block is the common tail (`mlp`), so one ExpertLayout names every stack's experts."""
    paths: dict[tuple[str, str, str], dict[str, Any]] = {}
    for key, value in state.items():
        m = _MODULE_KEY.match(key)
        if m is None or (m["part"] == "weight" and value.dim() != 2):
            continue
        path = paths.setdefault((m["prefix"], m["block"], m["index"]), {"keys": [], "shapes": {}, "E": set()})
        path["keys"].append(key)
        path["E"].add(int(m["E"]))
        path["shapes"].setdefault((m["proj"] or "", m["part"]), set()).add(tuple(value.shape))
    if not paths:
        raise why
    where = [(prefix, f"{block}experts.{index}") for prefix, block, index in paths]
    blocks = {block for _, block, _ in paths}
    tail = next(iter(blocks)) if len(blocks) == 1 else _common_tail([block for _, block, _ in paths])
    one_layout = len({i for _, _, i in paths}) == 1 and (tail or len(blocks) == 1)
    if len({prefix for prefix, _, _ in paths}) != len(paths) or not one_layout:
        raise NotDerivable(f"{model_type}: experts under several module paths {sorted(where)}")
    projs = None
    for (prefix, _, _), found in paths.items():
        if found["E"] != set(range(experts)):
            numbered = f"its expert modules under '{prefix}' are numbered {sorted(found['E'])}"
            raise NotDerivable(f"{model_type}: {numbered}, not 0..{experts - 1}")
        here = _up_down(model_type, found["shapes"], hidden)
        if projs not in (None, here):
            raise NotDerivable(f"{model_type}: expert modules named {projs} and {here} in its stacks")
        projs = here
        _check_saved_as_held(model_type, state, hub_state, found["keys"])
    (prefix, block, index), main = next(iter(paths.items()))
    layout = ExpertLayout("per-expert", tail.removesuffix("."), projs, index_prefix=index)
    templates = [f"{p}{{L}}.{b.removesuffix(tail)}" for p, b, _ in paths]
    (up,) = main["shapes"][(projs["down" if layout.one_linear else "up"], "weight")]
    if layout.one_linear:  # [N, K]: its input K is the MLP's hidden features, the model's hidden size stays
        up = (up[1], hidden)
    layers = sorted({int(m["L"]) for k in main["keys"] if (m := _MODULE_KEY.match(k))})
    out = {"prefix": prefix, "block": block, "layout": layout, "experts": experts, "layers": layers}
    out |= {"templates": templates[:1], "stack_templates": templates[1:]}
    keys = [k for found in paths.values() for k in found["keys"]]
    return {**out, "intermediate": up[0], "hidden": up[1]}, keys


def _common_tail(blocks: list[str]) -> str:
    """The whole segments every block ends with ('layer.1.mlp.', 'layer.2.mlp.' -> 'mlp.'), '' if none."""
    split = [b.removesuffix(".").split(".") for b in blocks]
    tail: list[str] = []
    while all(len(s) > len(tail) for s in split) and len({s[-1 - len(tail)] for s in split}) == 1:
        tail.insert(0, split[0][-1 - len(tail)])
    return ".".join(tail) + "." if tail else ""


def _up_down(model_type: str, shapes: dict[tuple[str, str], set], hidden: int) -> dict[str, str]:
    """{'up': name, 'down': name} of a non-gated expert: up [I, H] into the MLP, down [H, I] out;
    {'down': ''} where the expert is one linear module (VitPose+)."""
    weights = {proj: s for (proj, part), s in shapes.items() if part == "weight"}
    if list(weights) == [""] and len(weights[""]) == 1:
        return {"down": ""}
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


def saved_heads(config) -> tuple[str, ...]:
    """Where transformers' conditional-generation class of an encoder-decoder keeps its base
    model, as a head of every layer template: NllbMoeForConditionalGeneration saves
    `model.encoder.layers.{L}.` (what fine-tuned checkpoints hold; nllb-moe-54b on the Hub has the
    base model's `encoder.layers.{L}.`), Switch's holds the stacks itself (no head)."""
    if not getattr(config, "is_encoder_decoder", False):
        return ()
    import torch
    from transformers import AutoModelForSeq2SeqLM

    try:
        with torch.device("meta"):
            lm = AutoModelForSeq2SeqLM.from_config(config)
    except Exception:  # no conditional-generation class for this config: the base model's names only
        return ()
    return (f"{lm.base_model_prefix}.",) if lm.base_model is not lm else ()


def module_stacks(found: dict[str, Any], heads: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[Stack, ...]]:
    """(the main stack's layer prefixes, the other stacks) of `module_experts`' templates, each
    also under the `heads` transformers' conditional-generation class saves them with; every
    stack's sizes are in the one config (an encoder-decoder's)."""

    def spellings(template: str) -> tuple[str, ...]:
        return (template, *(head + template for head in heads))

    main = spellings(found["templates"][0])
    return main, tuple(Stack(spellings(t)) for t in found["stack_templates"])
