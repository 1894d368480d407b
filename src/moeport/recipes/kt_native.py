"""Targets for kt-kernel's native methods, whose loaders read a Hugging Face folder directly.

`kt-rawint4` (kt-kernel's RAWINT4, `CompressedSafeTensorLoader`): routed experts as
compressed-tensors pack-quantized INT4, symmetric, group 32, BF16 scales, under
`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight_{packed,scale,shape}`; everything else
as the source holds it, so the GPU side (SGLang with kt-kernel) loads the non-expert weights from
the same folder. It is the w4a16 recipe with the group size kt's kernel is built for, plus a check
of the names kt's loader looks for; a source already in that scheme (Kimi-K2-Thinking, K2.5) is
carried bit-exact (recipes.gpu.carries_experts).
"""

from __future__ import annotations

from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.recipes.base import Options, Target
from moeport.recipes.gpu import Recipe, plan_gpu
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint

RAWINT4_GROUP = 32  # kt-kernel's RAWINT4 kernels take group-32 scales only
_LOADER_PREFIXES = ("model.layers.{L}.", "language_model.model.layers.{L}.")


def _check_loader_names(det: Detection, method: str) -> None:
    """kt-kernel's compressed loader looks for `{prefix}mlp.experts.{E}.{gate,up,down}_proj` only."""
    hub = det.family.hub
    projs = (hub.projs.get("gate"), hub.projs.get("up"), hub.projs.get("down"))
    if (
        hub.block != "mlp"
        or projs != ("gate_proj", "up_proj", "down_proj")
        or det.layer_prefix not in _LOADER_PREFIXES
    ):
        found = f"{det.layer_prefix}{hub.block}.experts.{{E}}.{'/'.join(p or '?' for p in projs)}"
        raise MoeportError(
            f"--to kt-{method.lower()}: kt-kernel's {method} loader reads experts named "
            f"'model.layers.{{L}}.mlp.experts.{{E}}.gate_proj/up_proj/down_proj'; {det.family.title} "
            f"names them '{found}' (use --to kt-int4 for an AMX layout instead)"
        )


def _build_rawint4(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
    _check_loader_names(det, "RAWINT4")
    recipe = Recipe("w4a16", RAWINT4_GROUP, "experts", (), opts.allow_nonfinite)
    plan = plan_gpu(ck, det, recipe, opts.device)
    plan.title = f"{det.family.title}: {det.expert_format.name} -> kt-kernel RAWINT4 (INT4, group 32)"
    return plan, HfSink(opts.max_shard_bytes, metadata)


TARGETS = [
    Target(
        "kt-rawint4",
        "kt-kernel RAWINT4: a Hugging Face folder with INT4 group-32 experts, read by kt's native "
        "loader (Kimi-K2 INT4 carried bit-exact)",
        _build_rawint4,
        fields=lambda o: (
            {"method": "RAWINT4", "group_size": RAWINT4_GROUP}
            | ({"allow_nonfinite": True} if o.allow_nonfinite else {})
        ),
        takes=frozenset({"max_shard_bytes", "allow_nonfinite"}),
    ),
]
