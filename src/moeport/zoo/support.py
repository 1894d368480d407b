"""Which MoE model types the installed transformers implements, and how moeport supports each.

A model type counts as MoE when its config class (or one of its sub-configs) declares a field
about experts; transformers' own config classes say it, no list is kept here. Each is supported
from the zoo (hand-checked data), derived from transformers' definitions (zoo/derived.py), or not,
with the reason.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from functools import lru_cache

from moeport.zoo.derived import NotDerivable, derive_family
from moeport.zoo.families import Family, family_for_model_type
from moeport.zoo.tiny import declared_model_classes


@dataclass(frozen=True)
class Support:
    model_type: str
    how: str  # "zoo" | "derived" | "not"
    family: Family | None
    why: str  # the family's title, or the reason it is not supported


@lru_cache(maxsize=1)
def moe_model_types() -> tuple[str, ...]:
    """Every model type of the installed transformers whose config declares expert fields."""
    from transformers import CONFIG_MAPPING

    return tuple(sorted(mt for mt in CONFIG_MAPPING.keys() if _declares_experts(CONFIG_MAPPING[mt])))


def _declares_experts(cls: type, seen: frozenset[type] = frozenset()) -> bool:
    try:
        names = {f.name for f in dataclasses.fields(cls)}
    except TypeError:  # not a dataclass config: its constructor's arguments
        names = set(inspect.signature(cls.__init__).parameters)
    if any("expert" in n for n in names):
        return True
    subs = (getattr(cls, "sub_configs", None) or {}).values()
    return any(isinstance(s, type) and s not in seen and _declares_experts(s, seen | {cls}) for s in subs)


def support(model_type: str) -> Support:
    """How moeport supports `model_type`: the zoo first, else derived, else why not."""
    family = family_for_model_type(model_type)
    if family is not None:
        return Support(model_type, "zoo", family, family.title)
    try:
        family = derive_family(model_type)
    except NotDerivable as e:
        why = str(e).removeprefix(f"{model_type}: ")
        text = _text_model_type(model_type)
        inner = support(text) if text not in (None, model_type) else None
        if inner is not None and inner.family is not None:
            # detection would try the text model's family under the wrapper's prefixes; unchecked here
            why += f" (its text model {text} is {inner.how}; tried under wrapper prefixes, not checked)"
        return Support(model_type, "not", None, why + _backbone(model_type) + _held_by(model_type))
    return Support(model_type, "derived", family, _summary(family) + _held_by(model_type))


def _held_by(model_type: str) -> str:
    """Where checkpoints of a sub-config type come from: the wrappers holding its config class
    (Qwen3-Omni's thinker text and talker, DeepSeek-OCR-2's text model), and how each is supported.
    Detection reads a wrapper's checkpoint with the wrapper's family, else its text model's."""
    holders = _holders().get(model_type, ())
    if not holders:
        return ""
    return f" (a sub-model of {', '.join(f'{h}: {_how(h)}' for h in holders)})"


def _how(model_type: str) -> str:
    """zoo / derived / not of a wrapper, without its own wrapper note (no recursion through support)."""
    if family_for_model_type(model_type) is not None:
        return "zoo"
    try:
        derive_family(model_type)
    except NotDerivable:
        return "not"
    return "derived"


@lru_cache(maxsize=1)
def _holders() -> dict[str, tuple[str, ...]]:
    """model_type -> the MoE model types whose config holds its config class, at any depth."""
    from transformers import CONFIG_MAPPING

    by_class = {CONFIG_MAPPING[mt]: mt for mt in moe_model_types()}
    held: dict[str, list[str]] = {}
    for outer in moe_model_types():
        for cls in _sub_classes(CONFIG_MAPPING[outer]):
            if cls in by_class and by_class[cls] != outer:
                held.setdefault(by_class[cls], []).append(outer)
    return {k: tuple(sorted(set(v))) for k, v in held.items()}


def _sub_classes(cls: type, seen: frozenset[type] = frozenset()) -> list[type]:
    subs = [
        s for s in (getattr(cls, "sub_configs", None) or {}).values() if isinstance(s, type) and s not in seen
    ]
    return subs + [c for s in subs for c in _sub_classes(s, seen | {cls})]


def _backbone(model_type: str) -> str:
    """Said where transformers' only model classes for the type are backbones (VitPose+): a vision
    feature extractor, whose 'experts' moeport does not take for a language model's."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    mapped = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    if any(model_type in names for names in (*mapped, auto.MODEL_MAPPING_NAMES)):
        return ""  # a language or multimodal model class maps it (names only: no module imported)
    classes = declared_model_classes(CONFIG_MAPPING[model_type])
    if not classes or not all(c.__name__.endswith("Backbone") for c in classes):
        return ""
    names = ", ".join(c.__name__ for c in classes)
    return f"; transformers' class for it is a vision backbone ({names}), not a language model"


def _text_model_type(model_type: str) -> str | None:
    """The model_type of a multimodal config's text sub-config class, where it declares one."""
    from transformers import CONFIG_MAPPING

    text = (getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}).get("text_config")
    return getattr(text, "model_type", None) if isinstance(text, type) else None


def _summary(family: Family) -> str:
    """One line: where the experts are, and their hub and fused forms."""
    hub = family.hub
    if hub.kind == "per-expert":
        names = "/".join(hub.projs[r] for r in hub.roles) or "weight (each expert one linear)"
        form = f"hub {hub.expert_base}{{E}}.{names}"
    else:
        width = "2I" if hub.gated else "I"  # gate and up stacked, or up alone (Ergo's ReLU² experts)
        form = f"hub {hub.templates('')[0]}{f' [E, H, {width}]' if hub.transposed else ''}"
    fused = "same as hub" if family.fused == hub else f"fused {family.fused.templates('')[0]}"
    if family.fused.groups:  # ERNIE-4.5-VL: one block of stacks per contiguous range of experts
        fused += f" (expert groups {', '.join(family.fused.groups)}, in order)"
    renames = f", {len(family.fused_renames)} rename(s)" if family.fused_renames else ""
    stacks = "".join(f" (and {st.prefixes[0]})" for st in family.stacks)  # Qwen3-Omni's talker
    return f"{family.layer_prefixes[0]}{stacks}: {form}; {fused}{renames}"


def all_support() -> list[Support]:
    return [support(mt) for mt in moe_model_types()]
