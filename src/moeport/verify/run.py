"""Open both checkpoints, map them to canonical form, compare; decide lossless from the recipe."""

from __future__ import annotations

import json
from pathlib import Path

from moeport.sources import open_checkpoint
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import hf_layers
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
    """Re-layouts that keep the storage format are lossless; everything else is not."""
    return recipe.get("to") == "hf" and recipe.get("dtype") == "keep"


def verify(
    src: str | Path,
    out: str | Path,
    lossless: bool | None = None,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
) -> Report:
    with open_checkpoint(src) as s, open_checkpoint(out) as o:
        expect_exact = is_lossless(recipe_of(o)) if lossless is None else lossless
        return compare(hf_layers(s), _layers(o), expect_exact, max_rel_error, outlier_factor)


def _layers(ck: Checkpoint):
    from moeport.verify import kt_canonical

    if kt_canonical.is_kt(ck):
        return kt_canonical.kt_layers(ck)
    return hf_layers(ck)
