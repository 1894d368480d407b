"""`detect(checkpoint)`: family from config.json, expert layout and formats from tensor headers.

No tensor data is read: headers give names, dtypes and shapes, which is all we need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeport.codecs.format import ExpertFormat, Part
from moeport.codecs.registry import classify
from moeport.detect.generic import generic_family
from moeport.detect.groups import configured_experts, configured_intermediate
from moeport.detect.layout import (
    LayerExperts,
    LayerNaming,
    LayoutMatch,
    find_naming,
    fused_keys,
    match_layout,
)
from moeport.detect.required import check_required
from moeport.detect.stacks import (
    StackFacts,
    check_stack_counts,
    find_stacks,
    refuse_other_layout,
    stack_facts,
)
from moeport.detect.zero_experts import drop_zero_experts, stack_zero_rows
from moeport.errors import MoeportError
from moeport.mappings.rename import Rename
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.derived import NotDerivable, lookup_family
from moeport.zoo.families import (
    ExpertLayout,
    Family,
    known_model_types,
    wrapped_prefixes,
)
from moeport.zoo.model_config import ModelConfig


@dataclass
class Detection:
    family: Family
    model_type: str
    layout: ExpertLayout
    layer_prefix: str
    num_layers: int | None
    moe_layers: list[int]
    dense_layers: list[int]
    mtp_layers: list[int]
    experts_per_layer: int
    experts_per_token: int | None
    shared_experts: int
    hidden_size: int | None
    expert_intermediate_size: int | None
    expert_format: ExpertFormat
    expert_tensors: list[str]  # templates with {L}/{E}, companions included
    router_tensors: list[str]
    layer_bytes: dict[int, int]
    layer_expert_bytes: dict[int, int]
    total_bytes: int
    warnings: list[str] = field(default_factory=list)
    naming: LayerNaming | None = None  # where each layer (MTP included) lives; main prefix only if None
    zero_experts: int = 0  # LongCat's zero-compute experts (no weights on the Hub)
    zero_rows: int = 0  # their rows after the routed experts in the fused gate_up stacks read (5.24's)
    # routed experts of each MoE layer (stacks may differ: Qwen3-Omni's thinker and talker)
    layer_experts: dict[int, int] = field(default_factory=dict)
    # every stack of layers (zoo.families.Stack), the main one first, with its own config's sizes;
    # experts_per_layer, hidden_size and expert_intermediate_size above are the main stack's
    stacks: list[StackFacts] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.naming is None:
            self.naming = LayerNaming(self.layer_prefix)

    def experts_in(self, layer: int) -> int:
        """Routed experts of MoE layer `layer` (its stack's count where stacks differ)."""
        return self.layer_experts.get(layer, self.experts_per_layer)

    @property
    def expert_bytes(self) -> int:
        return sum(self.layer_expert_bytes.values())


def detect(ck: Checkpoint) -> Detection:
    if ck.config is None:
        raise MoeportError(f"{ck.root}: no config.json (moeport needs it to tell the model family)")
    cfg = ModelConfig(ck.config)
    family, model_type = _family(cfg, ck)
    cfg = cfg.at(family.config) if family.config else cfg  # the main stack's text config
    match = _match_experts(ck, family, cfg.first_int(family.fields.hidden_size))
    num_layers = cfg.first_int(family.fields.num_layers)
    naming = _naming(ck, family, match, num_layers)
    match.layers.update(_mtp_experts(ck, family, match, naming))
    naming, stacked, stack_cfgs = find_stacks(ck, family, naming, match.layout, num_layers)
    match.layers.update(stacked)
    layers = match.layers
    first = min(layers)
    inter = configured_intermediate(cfg, family)
    zero = (cfg.first_int(family.fields.zero_experts) or 0) if family.fields.zero_experts else 0
    routed = configured_experts(cfg, family)
    warnings = drop_zero_experts(match, routed, zero, ck.root)
    counts = {L: _expert_count(ck, match, L, inter) for L in layers}
    zero_rows = stack_zero_rows(counts, routed, zero, match.layout.kind)
    counts = {L: c - zero_rows for L, c in counts.items()}
    ref_expert = 0 if match.layout.kind == "per-expert" else -1
    roles = match.layout.roles if match.layout.kind == "per-expert" else match.layout.fused_roles
    proj = match.layout.projs[roles[0]]
    ref_parts = layers[first].parts.get((ref_expert, proj))
    if ref_parts is None:
        raise MoeportError(
            f"{ck.root}: layer {first} has expert tensors but no '{proj}' for expert {ref_expert}"
        )

    quant = cfg.quantization_config
    fmt = _format_of(ck, ref_parts, quant)
    _check_complete(ck, match, ref_parts, counts, fmt, quant, len(family.fused.groups) or 1)

    experts = counts[first]
    main_counts = {n for L, n in counts.items() if naming.stack_of(L) == 0}
    if len(main_counts) > 1:
        warnings.append(f"expert count differs between layers: {sorted(main_counts)}")
    n_cfg = configured_experts(cfg, family)
    if n_cfg is not None and n_cfg != experts:
        raise MoeportError(
            f"{ck.root}: config.json says {n_cfg} experts per layer ({family.fields.num_experts[0]}), "
            f"the tensors of layer {first} hold {experts}"
        )

    layer_bytes = _bytes_per_layer(ck, naming)
    in_main = [L for L in layer_bytes if naming.stack_of(L) == 0]
    limit = num_layers if num_layers is not None else naming.mtp_first if naming.mtp else max(in_main) + 1
    mtp = sorted(L for L in in_main if L >= limit)
    moe = sorted(L for L in layers if L not in mtp)
    dense = sorted(L for L in layer_bytes if L not in mtp and L not in layers)
    first_dense = cfg.first_int(family.fields.first_dense) if family.fields.first_dense else None
    main_dense = [L for L in dense if naming.stack_of(L) == 0]
    if first_dense is not None and main_dense[:first_dense] != list(range(first_dense)):
        warnings.append(
            f"config says the first {first_dense} layers are dense; dense layers found: {main_dense}"
        )

    by_stack = [[L for L in moe if naming.stack_of(L) == i] for i in range(len(naming.stacks) + 1)]
    check_required(ck, family, match.layout, naming, (*by_stack, [L for L in mtp if L in layers]))
    facts = stack_facts(family, naming, stack_cfgs, layer_bytes, counts)
    warnings += check_stack_counts(ck, family, facts, counts)
    if family.generic:
        warnings.append(f"generic family: {family.generic}; no transformers class to check logits against")
    return Detection(
        family=family,
        model_type=model_type,
        layout=match.layout,
        layer_prefix=match.layer_prefix,
        num_layers=num_layers,
        moe_layers=moe,
        dense_layers=dense,
        mtp_layers=mtp,
        experts_per_layer=experts,
        experts_per_token=cfg.first_int(family.fields.experts_per_token),
        shared_experts=_shared_experts(ck, family, cfg, match, first),
        hidden_size=cfg.first_int(family.fields.hidden_size),
        expert_intermediate_size=configured_intermediate(cfg, family),
        expert_format=fmt,
        expert_tensors=_templates(match, first),
        router_tensors=_routers(ck, family, match.layer_prefix, match.layout, first),
        layer_bytes=layer_bytes,
        layer_expert_bytes={L: sum(ck.info(k).nbytes for k in layers[L].keys) for L in layers},
        total_bytes=ck.total_bytes,
        warnings=warnings,
        naming=naming,
        zero_experts=zero,
        zero_rows=zero_rows,
        layer_experts={L: counts[L] for L in moe + mtp if L in counts},
        stacks=facts,
    )


def _routers(
    ck: Checkpoint, family: Family, layer_prefix: str, layout: ExpertLayout, first: int
) -> list[str]:
    """The router tensors of the first MoE layer, under the layout's block or, for a router
    transformers converts on load (carried as the Hub stores it), another layout's block."""
    blocks = dict.fromkeys([layout.block_prefix, *(other.block_prefix for other in family.layouts)])
    names = [f"{layer_prefix}{b}{r}" for r in family.router + family.router_bias for b in blocks]
    return list(dict.fromkeys(n for n in names if n.replace("{L}", str(first)) in ck))


def _bytes_per_layer(ck: Checkpoint, naming: LayerNaming) -> dict[int, int]:
    """Bytes of all tensors (experts or not) under each layer index, MTP layers included."""
    out: dict[int, int] = {}
    for key in ck.keys():
        layer = naming.layer_of(key)
        if layer is not None:
            out[layer] = out.get(layer, 0) + ck.info(key).nbytes
    return out


def _naming(ck: Checkpoint, family: Family, match: LayoutMatch, num_layers: int | None) -> LayerNaming:
    return find_naming(ck.keys(), match.layer_prefix, family.mtp_prefixes, num_layers)


def _mtp_experts(
    ck: Checkpoint, family: Family, match: LayoutMatch, naming: LayerNaming
) -> dict[int, LayerExperts]:
    """Routed experts of MTP layers stored apart: the main layers' layout, or refused."""
    if naming.mtp is None:
        return {}
    refuse_other_layout(
        ck, family, match.layout, naming.mtp, f"MTP experts under '{naming.mtp}'", "the other layers'"
    )
    return {L: le for L, le in naming.expert_layers(ck.keys(), match.layout).items() if L >= naming.mtp_first}


def _family(cfg: ModelConfig, ck: Checkpoint) -> tuple[Family, str]:
    """The zoo's family of the wrapper or its text model, else one derived from transformers."""
    try:
        return lookup_family(cfg.model_types)
    except NotDerivable as e:
        found = "/".join(cfg.model_types) or "none"
        family, tried = generic_family(list(cfg.model_types), ck.keys())
        if family is not None:
            return family, family.model_types[0]
        raise MoeportError(
            f"{ck.root / 'config.json'}: unknown model family (model_type {found}, architectures "
            f"{cfg.raw.get('architectures')}; {e}; {tried}); the zoo's model_type values: "
            f"{', '.join(known_model_types())}; `moeport inspect --families` lists what transformers adds"
        ) from e


def _shapes_fit(ck: Checkpoint, match: LayoutMatch, hidden: int | None) -> bool:
    """Whether a fused match's gate_up stack has the hidden dim where its layout puts it."""
    if match.layout.kind != "fused" or hidden is None:
        return True
    parts = next(iter(match.layers.values())).parts.get(
        (-1, match.layout.projs[match.layout.fused_roles[0]]), {}
    )
    if "weight" not in parts:
        return True
    shape = ck.info(parts["weight"]).shape
    return len(shape) == 3 and (shape[1] == hidden) == match.layout.transposed  # up [E, I, H] alike


def _match_experts(ck: Checkpoint, family: Family, hidden: int | None) -> LayoutMatch:
    keys = ck.keys()
    for prefixes in (family.layer_prefixes, wrapped_prefixes(family.layer_prefixes)):
        matches = [
            m
            for layout in family.layouts
            for prefix in prefixes
            if (m := match_layout(keys, layout, prefix)) is not None
        ]
        if matches:
            break
    if len(matches) > 1:  # the same names in two layouts (Qwen3-VL-MoE's hub and fused stacks): by shape
        matches = [m for m in matches if _shapes_fit(ck, m, hidden)] or matches
    if not matches:
        expected = " or ".join(
            f"'{t}'" for layout in family.layouts for t in layout.templates(family.layer_prefixes[0])[:1]
        )
        sample = [k for k in keys if "expert" in k][:3] or keys[:3]
        raise MoeportError(
            f"{ck.root}: no routed-expert tensors of {family.title}: expected keys like "
            f"{expected}; found e.g. {sample}"
        )
    if len(matches) > 1:
        kinds = [f"{m.layout.kind} under '{m.layer_prefix}'" for m in matches]
        raise MoeportError(f"{ck.root}: expert tensors in more than one layout ({'; '.join(kinds)})")
    return matches[0]


def _parts(ck: Checkpoint, parts: dict[str, str]) -> dict[str, Part]:
    return {suffix: Part(ck.info(key).dtype, ck.info(key).shape) for suffix, key in parts.items()}


def _format_of(ck: Checkpoint, parts: dict[str, str], quant: dict) -> ExpertFormat:
    any_key = next(iter(parts.values()))
    where = any_key.rsplit(".", 1)[0] if "." in any_key else any_key
    return classify(_parts(ck, parts), quant, where)


def _expert_count(ck: Checkpoint, match: LayoutMatch, layer: int, inter: int | None = None) -> int:
    found = match.layers[layer]
    if match.layout.kind == "per-expert":
        n = max(found.experts) + 1
        missing = sorted(set(range(n)) - found.experts)
        if missing:
            raise MoeportError(
                f"{ck.root}: layer {layer} lacks experts {missing[:5]} (has {len(found.experts)} of {n})"
            )
        return n
    proj = match.layout.projs[match.layout.fused_roles[0]]
    stacks = [found.parts.get((g, proj)) for g in fused_keys(match.layout)]
    for g, stack in enumerate(stacks):
        if not stack:  # an expert group's stacks missing (ERNIE-4.5-VL's vision_moe)
            where = f" of expert group '{match.layout.groups[g]}'" if match.layout.groups else ""
            raise MoeportError(f"{ck.root}: layer {layer} has no '{proj}'{where}")
    if match.layout.flat:  # DBRX's [E * I, H]: the config's expert intermediate size tells E
        key = next(iter(stacks[0].values()))
        return flat_experts(key, ck.info(key).shape, inter)
    return sum(ck.info(next(iter(stack.values()))).shape[0] for stack in stacks)


def flat_experts(key: str, shape: tuple[int, ...], inter: int | None) -> int:
    """Experts in a flat stack [E * I, H] of experts with `inter` rows each."""
    if not inter:
        why = "config.json does not say the experts' intermediate size"
        raise MoeportError(f"{key}: a flat expert stack {list(shape)}; {why}")
    if len(shape) != 2 or shape[0] % inter:
        why = f"expected [E * {inter}, H] (experts of {inter} rows)"
        raise MoeportError(f"{key}: shape {list(shape)}, {why}")
    return shape[0] // inter


def _check_complete(
    ck: Checkpoint,
    match: LayoutMatch,
    ref: dict[str, str],
    counts: dict[int, int],
    fmt: ExpertFormat,
    quant: dict,
    groups: int = 1,
) -> None:
    """Every layer/expert/projection carries the same parts, in the same format, as the reference
    (shapes as the first expert of its group: ERNIE-4.5-VL's vision experts are narrower)."""
    wanted = set(ref)
    projs = list(match.layout.projs.values())
    for layer, found in match.layers.items():
        per_expert = match.layout.kind == "per-expert"
        experts = range(counts[layer]) if per_expert else fused_keys(match.layout)
        per_group = max(1, counts[layer] // groups)
        for e in experts:
            for proj in projs:
                have = found.parts.get((e, proj), {})
                if set(have) != wanted:
                    what = f"expert {e} {proj}" if e >= 0 else proj
                    lack = sorted(wanted - set(have)) or sorted(set(have) - wanted)
                    verb = "lacks" if wanted - set(have) else "has unexpected"
                    raise MoeportError(f"{ck.root}: layer {layer} {what} {verb} companion tensor(s) {lack}")
                _check_same_shapes(ck, have, found.parts[(e - e % per_group if per_expert else e, proj)])
        for proj in projs:  # one format check per layer and projection is enough
            other = _format_of(ck, found.parts[(experts[0], proj)], quant)
            if other.name != fmt.name:
                raise MoeportError(
                    f"{ck.root}: layer {layer} {proj} is stored as {other.name}, other experts as {fmt.name}"
                )


def _check_same_shapes(ck: Checkpoint, parts: dict[str, str], ref: dict[str, str]) -> None:
    """An expert's tensors have the shapes of the layer's first expert (a transposed or cut
    expert is refused here, whatever the target, not only where a re-layout trips on it)."""
    for part, key in parts.items():
        got, want = ck.info(key).shape, ck.info(ref[part]).shape
        if got != want:
            raise MoeportError(f"{key}: shape {list(got)}, but '{ref[part]}' is {list(want)}")


def _templates(match: LayoutMatch, layer: int) -> list[str]:
    """Expert tensor names with {L}/{E} placeholders, one per (projection, part), gate/up/down order."""
    found: LayerExperts = match.layers[layer]
    concrete_prefix = match.layer_prefix.replace("{L}", str(layer))
    proj_order = {p: i for i, p in enumerate(match.layout.projs.values())}
    out = []
    for (expert, proj), parts in sorted(found.parts.items(), key=lambda kv: proj_order[kv[0][1]]):
        if expert > 0:
            continue
        for key in sorted(parts.values()):
            name = match.layer_prefix + key[len(concrete_prefix) :]
            index = match.layout.index_prefix  # `experts.expert_0.` (Switch, NLLB-MoE)
            out.append(name.replace(f".{index}0.{proj}.", f".{index}{{E}}.{proj}."))
    return out


def _shared_experts(ck: Checkpoint, family: Family, cfg: ModelConfig, match: LayoutMatch, layer: int) -> int:
    if family.shared_expert is None:
        return 0
    at = match.layer_prefix.replace("{L}", str(layer))
    prefix = f"{at}{match.layout.block_prefix}{family.shared_expert}."
    # `shared_expert` is named in the fused layout's block; a hub that keeps it elsewhere (Step-3.5's
    # `share_expert.` beside its `moe.` block) has the name the family's renames give back
    hub = Rename(family.fused_renames).inverse()(f"{at}{family.fused.block_prefix}{family.shared_expert}.")
    if not any(k.startswith((prefix, hub)) for k in ck.keys()):
        return 0
    value = cfg.first_int(family.fields.shared_experts) if family.fields.shared_experts else None
    if value is None or family.fields.shared_experts == ("shared_expert_intermediate_size",):
        return 1  # Qwen: one shared expert, sized by shared_expert_intermediate_size
    return max(value, 1)  # its tensors are there, whatever a default of 0 says
