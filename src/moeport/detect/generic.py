"""A family for a MoE checkpoint whose model_type neither the zoo nor transformers knows.

Remote-code MoE models (inclusionAI's Ling/Ring 2.0 `bailing_moe`, MiniMax-M1, ...) mostly store
their routed experts under the universal per-expert Hub names of a family we do know (Qwen3-MoE's
`mlp.experts.{E}.gate_proj`, Mixtral's `block_sparse_moe.experts.{E}.w1`). Those names alone are
enough for every target that rewrites experts linear by linear: the reference families' per-expert
layouts are matched against the checkpoint's own keys (detect/layout.py's matching), and exactly
one match gives a family. Everything beside the experts (attention, router, its bias, shared
experts) is carried under its own name: no rename is guessed. There is no transformers class to
run or fuse into, so `--layout fused` and `--method gptq` refuse (Family.generic says why).
"""

from __future__ import annotations

import re
from dataclasses import replace

from moeport.detect.layout import LayoutMatch, match_layout
from moeport.zoo.derived import NotDerivable, lookup_family
from moeport.zoo.families import ConfigFields, Family, wrapped_prefixes

# Families whose hub layout is per-expert 2-D linears, tried in order; one whose layout equals an
# earlier one's adds nothing (DeepSeek-V3's names are Qwen3-MoE's).
REFERENCES = ("qwen3_moe", "mixtral", "deepseek_v3")
NAME_PREFIX = "generic-"  # Family.name: "generic-qwen3_moe"; outputs record it (kt's source_family)

# Config facts under the names the Hub's MoE configs use (remote-code ones included: Ling's
# `num_shared_experts`, Mixtral's `num_local_experts`); a fact none of them holds is read off the
# tensors (the expert count) or left unknown.
GENERIC_FIELDS = ConfigFields(
    num_experts=("num_experts", "n_routed_experts", "num_local_experts"),
    experts_per_token=("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"),
    hidden_size=("hidden_size", "d_model"),
    expert_intermediate=("moe_intermediate_size", "expert_intermediate_size"),
    num_layers=("num_hidden_layers", "num_layers", "n_layers"),
    first_dense=("first_k_dense_replace",),
    mtp_layers=("num_nextn_predict_layers",),
    shared_experts=("n_shared_experts", "num_shared_experts"),
)


def references() -> list[Family]:
    """The reference families installed here, each with a per-expert hub layout not seen before."""
    found: list[Family] = []
    for model_type in REFERENCES:
        try:
            family = lookup_family([model_type])[0]
        except NotDerivable:  # a transformers without it: one reference fewer
            continue
        if family.hub.kind == "per-expert" and all(f.hub != family.hub for f in found):
            found.append(family)
    return found


def generic_family(model_types: list[str], keys: list[str]) -> tuple[Family | None, str]:
    """The generic family of a checkpoint with tensor names `keys` whose `model_types` transformers
    does not know at all, or None and what was tried (no reference layout matched, or several
    did). A type transformers knows keeps its own verdict (Llama: no MoE), never a guess."""
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # the references are derived from transformers too
        return None, "generic per-expert fallback: needs transformers installed"
    if not model_types or any(t in CONFIG_MAPPING for t in model_types):
        return None, "generic per-expert fallback: only for a model_type transformers does not know"
    model_type = model_types[0]
    matches: list[tuple[Family, LayoutMatch]] = []
    for ref in references():
        for prefix in (*ref.layer_prefixes, *wrapped_prefixes(ref.layer_prefixes)):
            if (m := match_layout(keys, ref.hub, prefix)) is not None:
                matches.append((ref, m))
                break
    tried = ", ".join(f"{_short(r)}'s '{r.hub.templates(r.layer_prefixes[0])[0]}'" for r in references())
    if len(matches) != 1:
        found = (
            "none matched" if not matches else "several matched: " + ", ".join(_short(r) for r, _ in matches)
        )
        return None, f"generic per-expert fallback tried {tried}: {found}"
    ref, match = matches[0]
    return build_generic(model_type, ref, keys, match.layer_prefix), ""


def build_generic(model_type: str, ref: Family, keys: list[str], layer_prefix: str) -> Family:
    """The family of `model_type` checkpoints whose experts are named as `ref`'s hub names them."""
    import transformers

    block = ref.hub.block_prefix
    members = _block_members(keys, layer_prefix, ref.hub.base, block)
    why = f"{model_type} is unknown to transformers {transformers.__version__}"
    shared = next((m for m in members if "shared" in m and "gate" not in m), None)
    return Family(
        name=NAME_PREFIX + ref.name,
        title=f"generic per-expert MoE ({why}; expert names as {_short(ref)}'s)",
        model_types=(model_type,),
        hub=ref.hub,
        fused=ref.hub,  # no transformers layout: the hub names are the only ones
        layer_prefixes=tuple(dict.fromkeys((layer_prefix, *ref.layer_prefixes))),
        router=tuple(m for m in members if _router(m) and m.endswith(".weight")),
        router_bias=tuple(m for m in members if _router(m) and not m.endswith(".weight")),
        shared_expert=shared,
        # the reference's own name for the experts' size too (Mixtral's and MiniMax's `intermediate_size`)
        fields=replace(
            GENERIC_FIELDS,
            expert_intermediate=tuple(
                dict.fromkeys(GENERIC_FIELDS.expert_intermediate + ref.fields.expert_intermediate)
            ),
        ),
        generic=f"{why} (no model class to run or to fuse its experts into)",
    )


def family_named(name: str, model_type: str) -> Family | None:
    """The generic family an output recorded as its source's (`generic-<reference>`), else None:
    outputs whose experts are not HF tensors (kt) are named back without matching keys."""
    if not name.startswith(NAME_PREFIX):
        return None
    ref = next((r for r in references() if r.name == name.removeprefix(NAME_PREFIX)), None)
    return None if ref is None else build_generic(model_type, ref, [], ref.layer_prefixes[0])


def _block_members(keys: list[str], layer_prefix: str, experts_base: str, block: str) -> list[str]:
    """Names relative to the MoE block of what sits beside the experts in one layer: router
    tensors (`gate.weight`, `gate.expert_bias`) as they are, modules (shared experts) by name."""
    layer = re.escape(layer_prefix).replace(re.escape("{L}"), r"\d+")
    pattern = re.compile(f"^{layer}{re.escape(block)}(?P<rel>.+)$")
    out: dict[str, None] = {}
    for key in keys:
        m = pattern.match(key)
        if m is None or m["rel"].startswith(experts_base.removeprefix(block)):
            continue
        rel = m["rel"]
        out[rel if _router(rel) else rel.split(".")[0]] = None
    return list(out)


def _router(rel: str) -> bool:
    """A router tensor: the block's `gate.*` / `router.*` parameters (not a shared expert's gate)."""
    return rel.split(".")[0] in ("gate", "router") and rel.count(".") == 1


def _short(family: Family) -> str:
    """A family's name for messages: its title without the '(derived ...)' note."""
    return family.title.split(" (")[0]
