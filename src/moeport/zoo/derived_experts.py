"""Where a transformers model keeps its routed experts, read off its module tree and its mapping.

In memory transformers holds each MoE block's experts as two 3-D stacks: `experts.gate_up_proj`
and `experts.down_proj` in most models, the block's own `input_linear.weight` /
`output_linear.weight` in others (JetMoE), sometimes directly in the layer (Gemma-4), sometimes
with per-expert biases beside them (GPT-OSS-like `gate_up_proj_bias`). On the Hub the same
experts are per-expert linears (a `MergeModulelist` converter in transformers' mapping), or the
same stacks under other names (Granite's `input_linear.weight`, Aria's `fc1.weight`: a plain
rename, so the reverted tensor is the very object the model holds), or the memory layout itself.
Each of these is read here as an `ExpertLayout`; anything else is refused with the reason.
"""

from __future__ import annotations

import re
from typing import Any

from moeport.errors import MoeportError
from moeport.zoo.derived_gate_up import INTERLEAVED, converted_gate_up
from moeport.zoo.derived_stacks import NotStacks, main_and_stacks, main_hub
from moeport.zoo.families import ExpertLayout
from moeport.zoo.tiny import EXPERTS

_HUB_KEY = re.compile(
    r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<block>(?:\w+\.)*?)experts\.(?P<E>\d+)\.(?P<proj>\w+)\.weight$"
)
_LAYER_KEY = re.compile(r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<rest>.+)$")
_SOURCE_PROJ = re.compile(r"experts\.\*\.(\w+)\.weight")
_ATTENTION = re.compile(r"(^|\.)(self_)?att(n|ention)(\.|$)")  # JetMoE's mixture of attention heads
FUSED_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}
UP_DOWN = {"up": "up_proj", "down": "down_proj"}
BIAS = "_bias"


class NotDerivable(MoeportError):
    """transformers' definitions of a model type do not give a layout moeport can use (why)."""


def stack_name(rest: str) -> tuple[str, str, bool]:
    """(module path relative to the layer, stack name, dotted) of a 3-D expert parameter."""
    module, _, name = rest.rpartition(".")
    if name == "weight" and module:  # a module's parameter: JetMoE's `mlp.input_linear.weight`
        module, _, name = module.rpartition(".")
        return module, name, True
    return module, name, False


def _where(module: str) -> tuple[str, str]:
    """(block, container) of the module holding the stacks: 'mlp.experts' -> ('mlp', 'experts')."""
    head, _, last = module.rpartition(".")
    return (head, last) if last == "experts" else (module, "")


def _orient(
    model_type: str, gate_up: tuple[int, ...], down: tuple[int, ...], hidden: int
) -> tuple[bool, int]:
    """(transposed, intermediate) of a gated pair, from how the two stacks' shapes chain
    ([E, 2I, X] with [E, X, I], or transposed [E, X, 2I] with [E, I, X]); X is the experts' own
    hidden size (MuseSpark projects into a wider one). The model's hidden size breaks a tie."""
    if len(gate_up) != 3 or len(down) != 3:
        raise NotDerivable(f"{model_type}: expert stacks {list(gate_up)}, {list(down)} are not [E, N, K]")
    plain = gate_up[2] == down[1] and gate_up[1] == 2 * down[2]
    flipped = gate_up[1] == down[2] and gate_up[2] == 2 * down[1]
    if plain and flipped:
        plain, flipped = gate_up[2] == hidden, gate_up[1] == hidden
    if plain == flipped:
        why = f"gate_up {list(gate_up)} and down {list(down)} do not chain as a gated MLP"
        raise NotDerivable(f"{model_type}: {why}")
    return flipped, (gate_up[2] if flipped else gate_up[1]) // 2


def fused_experts(
    model_type: str, state: dict, hidden: int, tied: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], list[str]]:
    """transformers' in-memory experts: one module path, gate_up and down stacks (transposed or
    not), biases beside them; the dict holds prefix, block ('mlp.' or ''), layout, experts,
    intermediate, the experts' hidden size and the MoE layers."""
    found: dict[tuple[str, str], dict[str, tuple[str, tuple[int, ...], bool]]] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if not m or len(value.shape) != 3:
            continue
        module, name, dotted = stack_name(m["rest"])
        if value.shape[0] != EXPERTS and name not in FUSED_NAMES.values():
            continue
        if _ATTENTION.search(module) or "shared" in module:
            continue
        block, container = _where(module)
        if container or name in FUSED_NAMES.values() or dotted:
            found.setdefault((m["prefix"], module), {})[name] = (key, tuple(value.shape), dotted)
    if not found:
        per_expert = next((k for k in state if ".experts." in k), None)
        rows = next((k for k, v in state.items() if "embed" in k and v.shape[:1] == (EXPERTS,)), None)
        why = f"experts are separate modules ('{per_expert}')" if per_expert else "no routed experts"
        if rows and not per_expert:  # Doge's cross-domain MoE: one row of an embedding per expert
            why = f"experts are embedding rows ('{rows}' [E, H]), not linear layers"
        flat = [k for k, v in state.items() if ".experts." in k and v.dim() == 2 and not v.shape[0] % EXPERTS]
        if flat and flat[0] == per_expert and not per_expert.endswith((".weight", ".bias")):
            # DBRX: a bare parameter `ffn.experts.mlp.w1` [E * I, H], not a module's linear per expert
            shape = list(state[flat[0]].shape)
            why = f"experts are one 2-D parameter per role ('{flat[0]}' {shape}: [E * I, H], not [E, N, K])"
        raise NotDerivable(f"{model_type}: {why} in transformers' model, no fused expert stacks")
    try:  # one module under several layer prefixes: several stacks (zoo/derived_stacks.py)
        tied_paths = {path for path, stacks in found.items() if {k for k, _, _ in stacks.values()} <= tied}
        (prefix, module), others = main_and_stacks(list(found), tied_paths)
    except NotStacks as e:
        raise NotDerivable(f"{model_type}: {e}") from e
    stacks = found[(prefix, module)]
    names = _gate_up_down(model_type, stacks)
    first = next(iter(names))  # gate_up, or up where the MLP is not gated
    gate_up, down = stacks[names[first]][1], stacks[names["down"]][1]
    if gate_up[:1] != down[:1]:  # LongCat: zero-compute experts in gate_up only
        why = f"gate_up_proj holds {gate_up[0]} experts, down_proj {down[0]}"
        if gate_up[0] > down[0]:  # allocated for the zero-compute (identity) experts too, never read
            why += f" ({gate_up[0] - down[0]} zero-compute experts with gate/up weights it never reads)"
        raise NotDerivable(f"{model_type}: {why}")
    if first == "gate_up":
        transposed, inter = _orient(model_type, gate_up, down, hidden)
    else:
        transposed, inter = _orient_up(model_type, gate_up, down, hidden)
    block, container = _where(module)
    dotted = stacks[names[first]][2]
    layout = ExpertLayout("fused", block, names, transposed=transposed, container=container, dotted=dotted)
    wanted = set(names.values()) | {n + BIAS for n in names.values()}
    keys = []
    for key in state:
        m = _LAYER_KEY.match(key)
        if (
            m
            and m["prefix"] in (prefix, *others)
            and stack_name(m["rest"])[:2] in {(module, n) for n in wanted}
        ):
            keys.append(key)
    layers = sorted({int(m["L"]) for k in keys if (m := _LAYER_KEY.match(k)) and m["prefix"] == prefix})
    out = {"prefix": prefix, "block": layout.block_prefix, "layout": layout, "experts": gate_up[0]}
    out["stacks"] = others  # further stacks' layer prefixes, in the model's order
    expert_hidden = gate_up[1] if transposed else gate_up[2]
    return {**out, "intermediate": inter, "hidden": expert_hidden, "layers": layers}, keys


def _orient_up(model_type: str, up: tuple[int, ...], down: tuple[int, ...], hidden: int) -> tuple[bool, int]:
    """(transposed, intermediate) of a non-gated pair: up [E, I, H] with down [E, H, I], or both
    transposed; only the hidden size tells the two apart."""
    if len(up) != 3 or down != (up[0], up[2], up[1]) or hidden not in up[1:]:
        why = f"up {list(up)} and down {list(down)} do not chain as an MLP of hidden size {hidden}"
        raise NotDerivable(f"{model_type}: {why}")
    transposed = up[1] == hidden
    return transposed, up[2] if transposed else up[1]


def _gate_up_down(model_type: str, stacks: dict[str, tuple[str, tuple[int, ...], bool]]) -> dict[str, str]:
    """Which stack is gate_up (or up, not gated) and which down: transformers' names, else the
    only two stacks by how their shapes chain."""
    if set(FUSED_NAMES.values()) <= set(stacks):
        return dict(FUSED_NAMES)
    if set(stacks) == set(UP_DOWN.values()):  # Nemotron-H: ReLU² experts, no gate
        return dict(UP_DOWN)
    if len(stacks) == 2:
        a, b = sorted(stacks)
        ga, gb = stacks[a][1], stacks[b][1]
        try:  # the pair in the order whose shapes chain as gate_up, down
            _orient(model_type, ga, gb, -1)
            return {"gate_up": a, "down": b}
        except NotDerivable:
            _orient(model_type, gb, ga, -1)
            return {"gate_up": b, "down": a}
    raise NotDerivable(f"{model_type}: expert stacks {sorted(stacks)}, not a gated gate_up/down MLP")


def hub_experts(
    model_type: str, model, state: dict, hub_state: dict, fused: dict[str, Any], fused_keys: list[str]
) -> tuple[ExpertLayout, str, list[str]]:
    """The hub layout: per-expert names (gate/up told apart by transformers' own converter), or
    stacks: the memory layout renamed (the same tensor objects), transposed where the mapping says."""
    per: dict[tuple[str, str], set[str]] = {}
    keys = []
    experts = set()
    for key in hub_state:
        m = _HUB_KEY.match(key)
        if m:
            keys.append(key)
            experts.add(int(m["E"]))
            per.setdefault((m["prefix"], m["block"]), set()).add(m["proj"])
    if experts and experts != set(range(fused["experts"])):
        why = f"its own save writes {len(experts)} experts per layer, its stacks hold {fused['experts']}"
        raise NotDerivable(f"{model_type}: {why}")
    if per:
        try:  # several stacks: the main one's, which the others must match (zoo/derived_stacks.py)
            prefix, block = main_hub(per, state, hub_state, fused, set(fused_keys))
        except NotStacks as e:
            raise NotDerivable(f"{model_type}: {e}") from e
        projs = per[(prefix, block)]
        if not fused["layout"].gated:
            return _hub_up_down(model_type, model, block, projs), prefix, keys
        gate, up, interleaved = gate_up_sources(model_type, model)
        down = sorted(projs - {gate, up})
        if {gate, up} - projs or len(down) != 1:
            why = f"hub expert projections {sorted(projs)} do not fit gate={gate}, up={up}"
            raise NotDerivable(f"{model_type}: {why}")
        projs = {"gate": gate, "up": up, "down": down[0]}
        layout = ExpertLayout("per-expert", block.removesuffix("."), projs)
        if interleaved:
            raise NotDerivable(f"{model_type}: transformers interleaves gate/up rows when it fuses them")
        return layout, prefix, keys
    return _hub_stacks(model_type, model, state, hub_state, fused, fused_keys)


def _hub_stacks(
    model_type: str, model, state: dict, hub_state: dict, fused: dict[str, Any], fused_keys: list[str]
) -> tuple[ExpertLayout, str, list[str]]:
    """Hub stacks: the hub tensors that are the memory stacks' own objects (a rename), with their
    module path and names read off the hub keys."""
    memory: ExpertLayout = fused["layout"]
    role_of = {id(state[k]): k for k in fused_keys}
    hub_of: dict[str, dict[str, str]] = {}  # memory key -> {role: hub key}, '': the memory's role
    for key, value in hub_state.items():
        if id(value) in role_of:
            hub_of[role_of[id(value)]] = {"": key}
    interleaved = memory.gate_up_interleaved
    if set(hub_of) != set(fused_keys):  # Inkling's interleaved rows, Step-3.7's gate and up stacks
        try:
            found, how = converted_gate_up(model_type, model, state, hub_state, set(fused_keys) - set(hub_of))
        except MoeportError as e:
            raise NotDerivable(str(e)) from e
        hub_of |= found
        interleaved = how == INTERLEAVED
    names: dict[str, str] = {}
    where: set[tuple[str, str, bool]] = set()
    for mem_key, by_role in hub_of.items():
        for hub_role, hub_key in by_role.items():
            m, h = _LAYER_KEY.match(mem_key), _LAYER_KEY.match(hub_key)
            if not m or not h:
                raise NotDerivable(f"{model_type}: hub expert stack '{hub_key}' is not under a layer")
            _, mem_name, _ = stack_name(m["rest"])
            is_bias = mem_name.endswith(BIAS) and mem_name.removesuffix(BIAS) in memory.projs.values()
            if is_bias:
                continue
            module, name, dotted = stack_name(h["rest"])
            role = hub_role or next(r for r, n in memory.projs.items() if n == mem_name)
            if names.setdefault(role, name) != name:
                why = f"hub names its {role} stacks both '{names[role]}' and '{name}'"
                raise NotDerivable(f"{model_type}: {why}")
            if m["prefix"] == fused["prefix"]:  # the main stack's (others: derived_stacks)
                where.add((h["prefix"], module, dotted))
    if len(where) != 1:
        raise NotDerivable(f"{model_type}: hub expert stacks under several module paths {sorted(where)}")
    prefix, module, dotted = next(iter(where))
    order = ("gate", "up", "down") if "gate" in names else memory.projs  # the memory layout's roles
    names = {role: names[role] for role in order}
    block, container = _where(module)
    transposed = memory.transposed != hub_transposes(model)
    layout = ExpertLayout("fused", block, names, interleaved, transposed, container=container, dotted=dotted)
    return layout, prefix, [k for by_role in hub_of.values() for k in by_role.values()]


def _hub_up_down(model_type: str, model, block: str, projs: set[str]) -> ExpertLayout:
    """Per-expert hub names of a non-gated MLP: the projections transformers stacks into up and down."""
    sources = stack_sources(model)
    memory = {"up": sources.get("up_proj", []), "down": sources.get("down_proj", [])}
    if any(len(v) != 1 for v in memory.values()) or {v[0] for v in memory.values()} != projs:
        raise NotDerivable(f"{model_type}: hub expert projections {sorted(projs)} do not fit up/down stacks")
    return ExpertLayout("per-expert", block.removesuffix("."), {r: v[0] for r, v in memory.items()})


def stack_sources(model) -> dict[str, list[str]]:
    """Per-expert projection names each in-memory stack is built from (transformers' converters)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    out: dict[str, list[str]] = {}
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(conv, WeightConverter) and len(conv.target_patterns) == 1:
            target = str(conv.target_patterns[0]).rpartition(".")[2]
            projs = [
                m[1] for p in conv.source_patterns if (m := _SOURCE_PROJ.search(str(p).replace("\\", "")))
            ]
            out.setdefault(target, []).extend(projs)
    return out


def hub_transposes(model) -> bool:
    """Whether transformers transposes the hub's gate_up_proj stack on load (Qwen3-VL-MoE)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    return any(
        isinstance(conv, WeightConverter)
        and any(str(p).endswith("gate_up_proj") for p in conv.source_patterns)
        and any(isinstance(op, Transpose) for op in conv.operations)
        for conv in get_model_conversion_mapping(model, add_legacy=False)
    )


def gate_up_sources(model_type: str, model) -> tuple[str, str, bool]:
    """(gate, up, interleaved) from the converter transformers uses to build gate_up_proj."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Interleave, WeightConverter

    for conv in get_model_conversion_mapping(model, add_legacy=False):
        if not isinstance(conv, WeightConverter):
            continue
        if not any(str(t).endswith("gate_up_proj") for t in conv.target_patterns):
            continue
        projs = [m[1] for p in conv.source_patterns if (m := _SOURCE_PROJ.search(str(p).replace("\\", "")))]
        if len(projs) == 2:
            return projs[0], projs[1], any(isinstance(op, Interleave) for op in conv.operations)
    raise NotDerivable(f"{model_type}: transformers' conversion mapping has no per-expert gate/up converter")
