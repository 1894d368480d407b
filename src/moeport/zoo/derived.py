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
from dataclasses import fields as dataclass_fields
from functools import cache
from typing import Any

from moeport.errors import MoeportError
from moeport.mappings.rename import Rename
from moeport.zoo.derived_experts import NotDerivable, fused_experts, hub_experts
from moeport.zoo.derived_groups import hub_block_members
from moeport.zoo.derived_modules import module_experts, module_stacks, saved_heads
from moeport.zoo.derived_renames import carried_names, converted_sources, segment_renames, transformers_name
from moeport.zoo.derived_stacks import stacks_of
from moeport.zoo.families import HUB_MODEL_TYPES, ConfigFields, ExpertLayout, Family, family_for_model_type
from moeport.zoo.tiny import EXPERTS, PER_TOKEN, build_model, tiny_config

LINEAR_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
SHARED_COUNT = re.compile(r"(moe_)?(n|num)_shared_experts")


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
    tied = frozenset(getattr(model, "all_tied_weights_keys", None) or ())  # not saved: another's weights
    hub_state = _revert(model, state)
    try:
        fused, fused_keys = fused_experts(model_type, state, hidden, tied)
    except NotDerivable as why:  # no stacks: experts as separate modules (Switch, NLLB-MoE), or `why`
        fused, fused_keys = module_experts(model_type, state, hub_state, hidden, EXPERTS, why)
    if fused["layout"].kind == "per-expert":  # saved as held: the hub layout is the memory layout
        hub_layout, hub_prefix, hub_keys = fused["layout"], fused["prefix"], fused_keys
    else:
        hub_layout, hub_prefix, hub_keys = hub_experts(model_type, model, state, hub_state, fused, fused_keys)
    renames = _renames(model_type, model, state, hub_state, set(hub_keys))
    layer = fused["layers"][0]
    scored = EXPERTS + int(getattr(text, "n_shared_experts", None) or 0)  # Inkling's router scores both
    converted = converted_sources(model, state, hub_state)  # Ergo's router, transposed on load
    router, bias, shared = _block_members(
        state, fused, layer, renames, hub_layout, hub_prefix, scored, converted
    )
    if fused["layout"].groups and hub_layout != fused["layout"]:  # routers carried under hub names
        hub_block = f"{hub_prefix}{layer}.{hub_layout.block_prefix}"
        more = hub_block_members(hub_state, hub_block, fused["experts"], len(fused["layout"].groups))
        router, bias = tuple(dict.fromkeys(router + more[0])), tuple(dict.fromkeys(bias + more[1]))
    if not router and not fused["layout"].one_linear:  # VitPose+: the caller's dataset index picks
        where = f"{fused['prefix']}{layer}.{fused['block']}"
        raise NotDerivable(f"{model_type}: no router tensor under '{where}'")
    fused_layout: ExpertLayout = fused["layout"]
    hub = fused_layout if hub_layout == fused_layout else hub_layout
    linear = None
    if hub.kind == "fused":  # per-expert 2-D linears where the Hub has fused stacks only
        names = {r: LINEAR_NAMES[r] for r in hub.roles}  # under `experts.`
        linear = ExpertLayout("per-expert", hub.block, names)
    prefixes = tuple(dict.fromkeys((hub_prefix + "{L}.", fused["prefix"] + "{L}.")))
    stacks, config_at = (), ""
    if "templates" in fused:  # expert modules: the encoder's, the decoder's (zoo/derived_modules.py)
        prefixes, stacks = module_stacks(fused, saved_heads(config))
    elif fused.get("stacks"):  # more expert stacks under other layer prefixes (Qwen3-Omni's talker)
        _, stacks, config_at = stacks_of(
            model, state, hub_state, fused["prefix"], fused["stacks"], set(fused_keys)
        )
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
        fields=_aliased(
            _fields(model_type, _declared(text), fused["intermediate"], fused["hidden"], hidden), text
        ),
        fused_renames=renames,
        linear=linear,
        stacks=stacks,
        config="" if config_at == "text_config" else config_at,
    )


def lookup_family(model_types: Iterable[str]) -> tuple[Family, str]:
    """The zoo's family of the first of `model_types` it lists (a wrapper's, then its text
    model's, unless that entry is for its own checkpoints only: Step-3.5's, whose wrapper Step-3.7
    transformers maps itself), else the first one derived from transformers; NotDerivable gives
    every reason."""
    model_types = list(model_types)
    for i, model_type in enumerate(model_types):
        family = family_for_model_type(model_type)
        if family is not None and (i == 0 or family.read_in_wrappers):
            return family, model_type
    reasons = []
    for model_type in model_types:
        try:
            return derive_family(HUB_MODEL_TYPES.get(model_type, model_type)), model_type
        except NotDerivable as e:
            reasons.append(str(e))
    raise NotDerivable("; ".join(reasons) or "no model_type")


def _revert(model, state: dict) -> dict:
    """What `save_pretrained` writes: transformers reverts its own conversion mapping (meta tensors)."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        return revert_weight_conversion(model, dict(state))
    except Exception as e:  # transformers' own reverse conversion failing: its reason
        raise NotDerivable(f"{model.config.model_type}: transformers cannot revert its mapping ({e})") from e


def _renames(
    model_type: str, model, state: dict, hub_state: dict, hub_experts: set[str]
) -> tuple[tuple[str, str], ...]:
    """Segment renames hub -> fused for non-expert tensors (zoo/derived_renames.py): transformers'
    renames, and the names under which tensors it converts on load are carried."""
    try:
        moved = carried_names(model, state, hub_state, hub_experts)
        return segment_renames(moved, transformers_name(model))
    except MoeportError as e:
        raise NotDerivable(f"{model_type}: {e}") from e


def _block_members(
    state: dict,
    fused: dict[str, Any],
    layer: int,
    renames: tuple[tuple[str, str], ...],
    hub: ExpertLayout,
    hub_prefix: str,
    scored: int = 0,
    converted: dict[str, list[str]] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """Router weights ([E, H] or [H, E]; [E + shared, H] where the router scores the shared
    experts too, `scored` rows), router biases ([E]) and the shared-expert module of a MoE block
    (its parameters, or sub-modules, under a name with 'shared'; not a `shared_expert_gate`),
    named relative to the block in both layouts. A router transformers converts on load
    (`converted`: in-memory key -> hub keys) is also named as the Hub stores it, which is how
    moeport carries it in either layout (zoo/derived_renames.py)."""
    block = f"{fused['prefix']}{layer}.{fused['block']}"
    stacks = f"{fused['prefix']}{layer}.{fused['layout'].base}"
    back = Rename(renames).inverse()
    hub_block = f"{hub_prefix}{layer}.{hub.block_prefix}"
    experts = fused["experts"]
    router: list[str] = []
    bias: list[str] = []
    late_router: list[str] = []
    late_bias: list[str] = []
    shared: str | None = None
    for key, value in state.items():
        in_stacks = fused["layout"].container and key.startswith(stacks)  # '' : stacks sit in the block
        if not key.startswith(block) or in_stacks or len(value.shape) > 2:
            continue
        rel = key[len(block) :]
        first = rel.split(".")[0]
        if "shared" in first and not first.endswith("gate"):
            shared = shared or first
            continue
        names = [rel] + ([h[len(hub_block) :]] if (h := back(key)).startswith(hub_block) else [])
        hubs = [h[len(hub_block) :] for h in (converted or {}).get(key, ()) if h.startswith(hub_block)]
        rows = {experts, scored}
        if len(value.shape) == 2 and rows & set(value.shape) and rel.endswith(".weight"):
            router += names
            late_router += hubs
        elif experts in value.shape and value.numel() == experts:
            bias += names
            late_bias += hubs
    # converted hub names last: the names a rename gives keep their order (ERNIE-4.5-VL's groups)
    return tuple(dict.fromkeys(router + late_router)), tuple(dict.fromkeys(bias + late_bias)), shared


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


def _aliased(fields: ConfigFields, text) -> ConfigFields:
    """Each field name found through the config's `attribute_map` followed by the name it reads:
    config.json holds the latter (ERNIE-4.5-VL's `moe_k` for `num_experts_per_tok`, Switch's and
    NLLB-MoE's `d_model` for `hidden_size`, `num_layers` / `encoder_layers` for the depth)."""
    aliases = getattr(type(text), "attribute_map", None) or {}
    grown = {
        f.name: tuple(
            dict.fromkeys(n for name in getattr(fields, f.name) for n in (name, aliases.get(name)) if n)
        )
        for f in dataclass_fields(fields)
    }
    return ConfigFields(**grown)


def _fields(
    model_type: str,
    text: dict[str, Any],
    inter: int,
    expert_hidden: int,
    hidden: int,
) -> ConfigFields:
    """Config names of the facts, found by the values the tiny config was given (the names a
    config class reads them by are added by `_aliased`)."""

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
        expert_intermediate=named(inter, ("intermediate", "ffn", "d_ff")) or defaults.expert_intermediate,
        first_dense=declared(defaults.first_dense),
        mtp_layers=declared(defaults.mtp_layers),
        # the shared-expert count under each family's name (ERNIE's and Aria's `moe_num_shared_experts`,
        # AFMoE's `num_shared_experts`); read only where the checkpoint holds shared-expert tensors
        shared_experts=tuple(k for k in text if SHARED_COUNT.fullmatch(k)),
        # the experts' own hidden size where it is not the model's (MuseSpark's `moe_hidden_size`)
        hidden_size=(named(expert_hidden, ("hidden",)) if expert_hidden != hidden else ())
        or defaults.hidden_size,
    )
