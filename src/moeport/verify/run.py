"""Open both checkpoints, map them to canonical form, compare; decide lossless from the recipe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from moeport.convert.plan import Plan
from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.parallel import Workers, available_cores, working
from moeport.sizes import format_size
from moeport.sources import open_checkpoint
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import canonical_plan
from moeport.verify.compare import Report, compare
from moeport.verify.stream import LayerSide, PlanSide, largest_float32, memory_bound, plan_items


def recipe_of(ck: Checkpoint) -> dict:
    """The recipe moeport recorded in the output's safetensors metadata ({} if none)."""
    for meta in ck.metadata.values():
        if "moeport" in meta:
            try:
                return json.loads(meta["moeport"])
            except json.JSONDecodeError:
                return {}
    return {}


def is_lossless(recipe: dict) -> bool:
    """Whether the recorded recipe's target promises bit-exact tensors (a re-layout that keeps the
    storage format); unknown recipes are treated as lossy."""
    from moeport.recipes import TARGETS

    target = TARGETS.get(str(recipe.get("to")))
    return target is not None and target.lossless(recipe)


FLOATS = {"BF16", "F16", "F32", "F64"}


def stored_alike(src: Checkpoint, out: Checkpoint) -> set[str]:
    """Tensors both sides store under the same name, float dtype and shape, with no quantization
    companion (`<name>_scale`, `<name>_packed`...): a converter may only copy those, so they must
    be bit-exact whether or not the output says how it was made."""
    names = set(src.keys()) & set(out.keys())
    with_companions = {_companion_of(k) for ck in (src, out) for k in ck.keys()}
    return {
        n
        for n in names
        if n not in with_companions
        and src.info(n).dtype in FLOATS
        and src.info(n).dtype == out.info(n).dtype
        and src.info(n).shape == out.info(n).shape
    }


# config.json fields that name a model's shape: two checkpoints that differ in one are not a
# conversion of each other, and a tensor-by-tensor listing of the difference helps nobody
MODEL_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "vocab_size",
)


def check_same_model(src: Checkpoint, out: Checkpoint | None, out_config: dict | None = None) -> None:
    a = _text_config(src.config)
    b = _text_config(out.config if out is not None else out_config)
    differ = [f"{k} {a[k]} vs {b[k]}" for k in MODEL_FIELDS if k in a and k in b and a[k] != b[k]]
    if differ:
        raise MoeportError(
            f"the two checkpoints are different models (config.json: {', '.join(differ)}); "
            "verify compares a conversion with its own source"
        )


def _text_config(config: dict | None) -> dict:
    config = config or {}
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _companion_of(key: str) -> str:
    """'m.weight_scale_inv' -> 'm.weight': the tensor a quantization companion belongs to."""
    module, _, last = key.rpartition(".")
    return f"{module}.{last.split('_', 1)[0]}" if "_" in last else ""


def verify(
    src: str | Path,
    out: str | Path,
    lossless: bool | None = None,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
    on_layer: Callable[[int | None], None] | None = None,
    max_memory: int | None = None,
    threads: int | None = None,
) -> Report:
    """`_verify`, its decodes spread over `threads` CPU threads (default: every core this process
    may use): the kernels are serial, so a weight's rows are cut into jobs (moeport.parallel)."""
    with working(Workers(threads or available_cores())):
        return _verify(src, out, lossless, max_rel_error, outlier_factor, on_layer, max_memory)


def _verify(
    src: str | Path,
    out: str | Path,
    lossless: bool | None = None,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
    on_layer: Callable[[int | None], None] | None = None,
    max_memory: int | None = None,
) -> Report:
    """Compare `out` with its source `src`; `on_layer(L)` is told each source layer as it starts.
    The memory it will hold (Report.memory_bound) is known before any tensor is read; above
    `max_memory` it refuses."""
    from moeport.verify import kt_canonical

    kt = kt_canonical.kt_description(Path(out))
    with open_checkpoint(src) as s:
        source_plan = canonical_plan(s)
        if kt is not None and not any(Path(out).glob("*.safetensors")):  # kt's folder form
            det = detect(s)
            names = set()
            for layer in kt.layers:
                names.update(kt_canonical.expert_names(kt, layer, det.family, det.naming).values())
            config = Path(out) / "config.json"
            check_same_model(s, None, json.loads(config.read_text()) if config.is_file() else None)
            bound = _budget(source_plan, None, kt, max_memory)
            source = (item for item in plan_items(s, source_plan) if item[1] in names)
            output = LayerSide(kt_canonical.folder_layers(Path(out), kt, det.family, det.naming))
            expect_exact = False if lossless is None else lossless
            report = compare(source, output, expect_exact, max_rel_error, outlier_factor, on_layer=on_layer)
            report.memory_bound = bound
            return report
        with open_checkpoint(out) as o:
            check_same_model(s, o)
            recipe = recipe_of(o)
            expect_exact = is_lossless(recipe) if lossless is None else lossless
            alike = stored_alike(s, o) if lossless is None else set()
            out_plan = canonical_plan(o) if kt is None else None
            bound = _budget(source_plan, out_plan, kt, max_memory)
            output = PlanSide(o, out_plan) if out_plan else LayerSide(kt_canonical.merged_layers(o, kt))
            report = compare(
                plan_items(s, source_plan),
                output,
                expect_exact,
                max_rel_error,
                outlier_factor,
                alike,
                peers_decide=not recipe,
                on_layer=on_layer,
            )
            report.memory_bound = bound
            return report


def _budget(source: Plan, output: Plan | None, kt, max_memory: int | None) -> int:
    """Bytes verify holds at most beyond the interpreter: the largest tensor of either side twice
    in float32 plus the comparison's chunk (verify.stream), and one layer of a kt output."""
    largest = max(largest_float32(source), largest_float32(output) if output is not None else 0)
    layer = 4 * 3 * kt.experts * kt.hidden * kt.inter if kt is not None else 0
    bound = memory_bound(largest, layer)
    if max_memory is not None and bound > max_memory:
        raise MoeportError(
            f"verify holds up to {format_size(bound)} (the largest tensor, {format_size(largest)} in "
            f"float32, on each side{' and one kt layer' if layer else ''}); --max-memory "
            f"{format_size(max_memory)} is below it"
        )
    return bound
