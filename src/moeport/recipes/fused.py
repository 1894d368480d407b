"""What a GPU recipe asks of the source's weights beyond "quantize this one": which targeted weights
servers fuse (they must share one global scale), and whether the source's experts already hold
the target's codes and scales in another form (then they move without requantizing)."""

from __future__ import annotations

from moeport.codecs.base import Codec
from moeport.codecs.registry import codec_for
from moeport.detect.detection import Detection
from moeport.errors import MoeportError

# Sibling projections that servers fuse into one matrix (vLLM/SGLang MergedColumnParallelLinear,
# QKVParallelLinear, fused MoE w13): with a per-tensor global scale they must share it.
FUSED_PROJS = (("gate_proj", "up_proj"), ("w1", "w3"), ("q_proj", "k_proj", "v_proj"))


def fused_sets(names: list[str], det: Detection) -> list[tuple[str, ...]]:
    """`names` (targeted `.weight`s, in plan order) grouped into fused sets; the others alone."""
    hub = det.family.per_expert.projs
    sets = [*FUSED_PROJS, (hub.get("gate", "gate_proj"), hub.get("up", "up_proj"))]
    role = {proj: (k, tuple(s)) for k, s in enumerate(sets) for proj in s}
    groups: dict[tuple[str, int], list[str]] = {}
    out: list[list[str]] = []
    for name in names:
        module, _, proj = name.removesuffix(".weight").rpartition(".")
        if proj in role:
            key = (module, role[proj][0])
            if key not in groups:
                groups[key] = []
                out.append(groups[key])
            groups[key].append(name)
        else:
            out.append([name])
    return [tuple(g) for g in out]


def same_kind_source(codec: Codec, det: Detection, ignore: tuple[str, ...]) -> Codec | None:
    """The codec of the source's experts when it stores the same codes and scales as `codec` in
    another form (codecs declaring one `kind`), so they move without requantizing; not with --ignore."""
    kind = getattr(codec, "kind", None)
    if kind is None or ignore:
        return None
    try:
        src = codec_for(det.expert_format)
    except MoeportError:
        return None
    return src if getattr(src, "kind", None) == kind else None
