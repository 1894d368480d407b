"""Open both checkpoints, map them to canonical form, compare; decide lossless from the recipe."""

from __future__ import annotations

import json
from pathlib import Path

from moeport.detect import detect
from moeport.sources import open_checkpoint
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import CanonicalLayer, hf_layers
from moeport.verify.compare import Report, compare


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
) -> Report:
    from moeport.verify import kt_canonical

    kt = kt_canonical.kt_description(Path(out))
    with open_checkpoint(src) as s:
        if kt is not None and not any(Path(out).glob("*.safetensors")):  # kt's folder form
            det = detect(s)
            names = set()
            for layer in kt.layers:
                names.update(kt_canonical.expert_names(kt, layer, det.family, det.layer_prefix).values())
            source = (
                CanonicalLayer(c.layer, {k: v for k, v in c.tensors.items() if k in names})
                for c in hf_layers(s)
            )
            output = kt_canonical.folder_layers(Path(out), kt, det.family, det.layer_prefix)
            expect_exact = False if lossless is None else lossless
            return compare(source, output, expect_exact, max_rel_error, outlier_factor)
        with open_checkpoint(out) as o:
            expect_exact = is_lossless(recipe_of(o)) if lossless is None else lossless
            alike = stored_alike(s, o) if lossless is None else set()
            output = kt_canonical.merged_layers(o, kt) if kt is not None else hf_layers(o)
            return compare(hf_layers(s), output, expect_exact, max_rel_error, outlier_factor, alike)
