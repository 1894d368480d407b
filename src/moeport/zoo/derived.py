"""Families derived from transformers' own definitions, for model types the zoo does not list.

transformers knows every model it implements twice: its module tree (the names it holds in memory,
the fused `experts.gate_up_proj` / `experts.down_proj` stacks) and its checkpoint conversion
mapping (`conversion_mapping.py`: the per-expert names on the Hub, which of them is gate and
which up, renames of other modules). We build a tiny model of the type on `meta` (no memory, no
weights), let transformers revert its own mapping on that state dict (what `save_pretrained`
writes), and read the layout off both sides. Nothing is accepted unless it checks out: the renames
we derive must give transformers' own hub names for every non-expert tensor, and invert; detection
then matches the layout against the checkpoint's actual keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

from moeport.errors import MoeportError
from moeport.mappings.rename import Rename
from moeport.zoo.derived_renames import carried_names, segment_renames
from moeport.zoo.families import ConfigFields, ExpertLayout, Family, family_for_model_type
from moeport.zoo.tiny import EXPERTS, PER_TOKEN, build_model, tiny_config

_FUSED_KEY = re.compile(r"^(?P<prefix>.*?\.)(?P<L>\d+)\.(?P<block>(?:\w+\.)*?)experts\.(?P<name>\w+)$")
_HUB_KEY = re.compile(
    r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<block>(?:\w+\.)*?)experts\.(?P<E>\d+)\.(?P<proj>\w+)\.weight$"
)
_SOURCE_PROJ = re.compile(r"experts\.\*\.(\w+)\.weight")
LINEAR_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
FUSED_NAMES = {"gate_up": "gate_up_proj", "down": "down_proj"}


class NotDerivable(MoeportError):
    """transformers' definitions of a model type do not give a layout moeport can use (why)."""


def derive_family(model_type: str) -> Family:
    """The Family of `model_type` as transformers defines it; NotDerivable says why not."""
    found = _derive(model_type)
    if isinstance(found, NotDerivable):
        raise NotDerivable(str(found))
    return found


@cache
def _derive(model_type: str) -> Family | NotDerivable:
    """Derivation, remembered either way (a refusal costs as much as a family)."""
    try:
        return _derive_or_raise(model_type)
    except NotDerivable as e:
        return e


def _derive_or_raise(model_type: str) -> Family:
    try:
        config = tiny_config(model_type, small_vision=False)
        model = build_model(config, "meta")
    except MoeportError as e:
        raise NotDerivable(str(e)) from e
    state = model.state_dict()
    text = config.get_text_config()
    hidden = int(text.hidden_size)
    fused, fused_keys = _fused_experts(model_type, state, hidden)
    hub_state = _revert(model, state)
    hub_layout, hub_prefix, hub_keys = _hub_experts(model_type, model, hub_state, fused, hidden)
    renames = _renames(model_type, model, state, hub_state, set(hub_keys))
    layer = _moe_layer(state, fused)
    scored = EXPERTS + int(getattr(text, "n_shared_experts", None) or 0)  # Inkling's router scores both
    router, bias, shared = _block_members(state, fused, layer, renames, hub_layout, hub_prefix, scored)
    if not router:
        where = f"{fused['prefix']}{layer}.{fused['block']}"
        raise NotDerivable(f"{model_type}: no router tensor under '{where}'")
    fused_layout: ExpertLayout = fused["layout"]
    hub = fused_layout if hub_layout == fused_layout else hub_layout
    linear = None
    if hub.kind == "fused":  # per-expert 2-D linears where the Hub has fused stacks only
        linear = ExpertLayout("per-expert", hub.block, dict(LINEAR_NAMES))
    prefixes = tuple(dict.fromkeys((hub_prefix + "{L}.", fused["prefix"] + "{L}.")))
    return Family(
        name=model_type,
        title=f"{type(config).__name__.removesuffix('Config')} (derived from transformers)",
        model_types=(model_type,),
        hub=hub,
        fused=fused_layout,
        layer_prefixes=prefixes,
        router=router,
        router_bias=bias,
        shared_expert=shared,
        fields=_fields(model_type, _declared(text), fused["intermediate"]),
        fused_renames=renames,
        linear=linear,
    )


def lookup_family(model_types: Iterable[str]) -> tuple[Family, str]:
    """The zoo's family of the first of `model_types` it lists (a wrapper's, then its text
    model's), else the first one derived from transformers; NotDerivable gives every reason."""
    model_types = list(model_types)
    for model_type in model_types:
        family = family_for_model_type(model_type)
        if family is not None:
            return family, model_type
    reasons = []
    for model_type in model_types:
        try:
            return derive_family(model_type), model_type
        except NotDerivable as e:
            reasons.append(str(e))
    raise NotDerivable("; ".join(reasons) or "no model_type")


def _fused_experts(model_type: str, state: dict, hidden: int) -> tuple[dict[str, Any], list[str]]:
    """transformers' in-memory experts: one module path, gate_up and down stacks (transposed or not)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    keys = []
    for key, value in state.items():
        m = _FUSED_KEY.match(key)
        if m:
            keys.append(key)
            found.setdefault((m["prefix"], m["block"]), {})[m["name"]] = tuple(value.shape)
    if not found:
        per_expert = next((k for k in state if ".experts." in k), None)
        why = f"experts are separate modules ('{per_expert}')" if per_expert else "no routed experts"
        raise NotDerivable(f"{model_type}: {why} in transformers' model, no fused expert stacks")
    if len(found) > 1:
        raise NotDerivable(f"{model_type}: experts under several module paths {sorted(found)}")
    (prefix, block), stacks = next(iter(found.items()))
    if not block:
        raise NotDerivable(f"{model_type}: experts sit directly in the layer ('{prefix}{{L}}.experts')")
    if "gate_up_proj" not in stacks or "down_proj" not in stacks:
        raise NotDerivable(f"{model_type}: expert stacks {sorted(stacks)}, not a gated gate_up/down MLP")
    gate_up = stacks["gate_up_proj"]
    if gate_up[:1] != stacks["down_proj"][:1]:  # LongCat: zero-compute experts in gate_up only
        why = f"gate_up_proj holds {gate_up[0]} experts, down_proj {stacks['down_proj'][0]}"
        raise NotDerivable(f"{model_type}: {why}")
    if len(gate_up) != 3 or hidden not in gate_up[1:]:
        raise NotDerivable(f"{model_type}: gate_up_proj {list(gate_up)} has no hidden dim {hidden}")
    transposed = gate_up[1] == hidden
    inter = gate_up[2 if transposed else 1] // 2
    layout = ExpertLayout("fused", block[:-1], dict(FUSED_NAMES), transposed=transposed)
    found_experts = {"prefix": prefix, "block": block, "layout": layout, "experts": gate_up[0]}
    return {**found_experts, "intermediate": inter}, keys


def _revert(model, state: dict) -> dict:
    """What `save_pretrained` writes: transformers reverts its own conversion mapping (meta tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return revert_weight_conversion(model, dict(state))
    except Exception as e:  # transformers' own reverse conversion failing: its reason
        raise NotDerivable(f"{model.config.model_type}: transformers cannot revert its mapping ({e})") from e


def _hub_experts(
    model_type: str, model, hub_state: dict, fused: dict[str, Any], hidden: int
) -> tuple[ExpertLayout, str, list[str]]:
    """The hub layout: per-expert names (gate/up told apart by transformers' own converter), or fused."""
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
        if len(per) > 1:
            raise NotDerivable(f"{model_type}: hub experts under several module paths {sorted(per)}")
        (prefix, block), projs = next(iter(per.items()))
        gate, up, interleaved = _gate_up_sources(model_type, model)
        down = sorted(projs - {gate, up})
        if {gate, up} - projs or len(down) != 1:
            why = f"hub expert projections {sorted(projs)} do not fit gate={gate}, up={up}"
            raise NotDerivable(f"{model_type}: {why}")
        if not block:
            raise NotDerivable(f"{model_type}: hub experts sit in the layer ('{prefix}{{L}}.experts')")
        layout = ExpertLayout("per-expert", block[:-1], {"gate": gate, "up": up, "down": down[0]})
        if interleaved:
            raise NotDerivable(f"{model_type}: transformers interleaves gate/up rows when it fuses them")
        return layout, prefix, keys
    stacks: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for key, value in hub_state.items():
        m = _FUSED_KEY.match(key)
        if m:
            keys.append(key)
            stacks.setdefault((m["prefix"], m["block"]), {})[m["name"]] = tuple(value.shape)
    if len(stacks) != 1:
        raise NotDerivable(f"{model_type}: no hub expert tensors transformers' mapping writes")
    (prefix, block), names = next(iter(stacks.items()))
    if set(names) != {"gate_up_proj", "down_proj"} or not block:
        raise NotDerivable(f"{model_type}: hub expert stacks {sorted(names)} in '{block}', not gate_up/down")
    # a fresh model saves its memory layout; a Transpose in transformers' mapping says the Hub's differs
    transposed = (names["gate_up_proj"][1] == hidden) != _hub_transposes(model)
    layout = ExpertLayout("fused", block[:-1], dict(FUSED_NAMES), transposed=transposed)
    return layout, prefix, keys


def _hub_transposes(model) -> bool:
    """Whether transformers transposes the hub's gate_up_proj stack on load (Qwen3-VL-MoE)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Transpose, WeightConverter

    return any(
        isinstance(conv, WeightConverter)
        and any(str(p).endswith("gate_up_proj") for p in conv.source_patterns)
        and any(isinstance(op, Transpose) for op in conv.operations)
        for conv in get_model_conversion_mapping(model, add_legacy=False)
    )


def _gate_up_sources(model_type: str, model) -> tuple[str, str, bool]:
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


def _renames(
    model_type: str, model, state: dict, hub_state: dict, hub_experts: set[str]
) -> tuple[tuple[str, str], ...]:
    """Segment renames hub -> fused for non-expert tensors (zoo/derived_renames.py): transformers'
    renames, and the names under which tensors it converts on load are carried."""
    try:
        moved = carried_names(model, state, hub_state, hub_experts)
        return segment_renames(moved)
    except MoeportError as e:
        raise NotDerivable(f"{model_type}: {e}") from e


def _moe_layer(state: dict, fused: dict[str, Any]) -> int:
    layers = sorted(int(m["L"]) for k in state if (m := _FUSED_KEY.match(k)) and m["name"] == "gate_up_proj")
    return layers[0]


def _block_members(
    state: dict,
    fused: dict[str, Any],
    layer: int,
    renames: tuple[tuple[str, str], ...],
    hub: ExpertLayout,
    hub_prefix: str,
    scored: int = 0,
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """Router weights ([E, H] or [H, E]; [E + shared, H] where the router scores the shared
    experts too, `scored` rows), router biases ([E]) and the shared-expert module of a MoE block
    (its parameters, or sub-modules, under a name with 'shared'; not a `shared_expert_gate`),
    named relative to the block in both layouts."""
    block = f"{fused['prefix']}{layer}.{fused['block']}"
    back = Rename(renames).inverse()
    hub_block = f"{hub_prefix}{layer}.{hub.block}."
    experts = fused["experts"]
    router: list[str] = []
    bias: list[str] = []
    shared: str | None = None
    for key, value in state.items():
        if not key.startswith(block) or key.startswith(block + "experts."):
            continue
        rel = key[len(block) :]
        first = rel.split(".")[0]
        if "shared" in first and not first.endswith("gate"):
            shared = shared or first
            continue
        names = [rel] + ([h[len(hub_block) :]] if (h := back(key)).startswith(hub_block) else [])
        rows = {experts, scored}
        if len(value.shape) == 2 and rows & set(value.shape) and rel.endswith(".weight"):
            router += names
        elif experts in value.shape and value.numel() == experts:
            bias += names
    return tuple(dict.fromkeys(router)), tuple(dict.fromkeys(bias)), shared


def _declared(text) -> dict[str, Any]:
    """The tiny text config's values of the fields its class declares (the overrides it merely
    stored, e.g. `moe_num_experts` on a config that calls it `num_experts`, are left out), and of
    the names its `attribute_map` reads them by: transformers 5 saves Qwen3-MoE's expert count as
    `num_local_experts`, while the Hub's config.json files say `num_experts`."""
    try:
        declared = set(type(text)().to_dict())
    except Exception:  # a config class that validates its defaults away: every field it holds
        declared = set(text.to_dict())
    values = {k: v for k, v in text.to_dict().items() if k in declared}
    aliases = getattr(type(text), "attribute_map", None) or {}
    return values | {alias: values[name] for alias, name in aliases.items() if name in values}


def _fields(model_type: str, text: dict[str, Any], inter: int) -> ConfigFields:
    """Config names of the facts, found by the values the tiny config was given."""

    def named(value: int, words: Iterable[str], avoid: Iterable[str] = ("shared",)) -> tuple[str, ...]:
        return tuple(
            k
            for k, v in text.items()
            if v == value and type(v) is int and any(w in k for w in words) and not any(a in k for a in avoid)
        )

    experts = named(EXPERTS, ("expert",), ("shared", "tok", "group"))
    if not experts:
        raise NotDerivable(f"{model_type}: its config has no field holding the expert count")
    defaults = ConfigFields()

    def declared(names: tuple[str, ...]) -> tuple[str, ...]:  # optional facts: only names it has
        return tuple(n for n in names if n in text)

    return ConfigFields(
        num_experts=experts,
        experts_per_token=named(PER_TOKEN, ("per_tok", "topk", "top_k")) or defaults.experts_per_token,
        expert_intermediate=named(inter, ("intermediate", "ffn")) or defaults.expert_intermediate,
        first_dense=declared(defaults.first_dense),
        mtp_layers=declared(defaults.mtp_layers),
        shared_experts=declared(defaults.shared_experts),
    )
