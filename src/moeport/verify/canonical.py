"""Any checkpoint as its canonical form: float32 tensors under hub-layout names, layer by layer.

Two checkpoints correspond when their canonical forms share names: the hf recipe (hub layout,
decoded to float32) maps transformers-fused, FP8, MXFP4, GPTQ and compressed-tensors checkpoints
onto the same names as their source, so `verify` compares like with like without per-format code.
kt-kernel CPU outputs are mapped by `verify.kt` (if present) through the same interface.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moeport.convert.plan import Plan, run_unit
from moeport.detect import detect
from moeport.recipes.hf import plan_hf
from moeport.sources.checkpoint import Checkpoint


@dataclass
class CanonicalLayer:
    layer: int | None  # None: tensors outside the layers
    tensors: dict[str, torch.Tensor]  # float32 (or the stored dtype for non-float tensors)


def canonical_plan(ck: Checkpoint) -> Plan:
    """The plan giving every tensor of an HF checkpoint in float32 under canonical names: the
    family's per-expert names (GPT-OSS's linear experts), hub aliases applied."""
    return plan_hf(ck, detect(ck), "linear", torch.float32, canonical=True)


def hf_layers(ck: Checkpoint) -> Iterator[CanonicalLayer]:
    """Decode every tensor of an HF checkpoint to float32 under canonical names, one layer at a time."""
    plan = canonical_plan(ck)
    current: CanonicalLayer | None = None
    for unit in plan.units:
        if current is None or unit.layer != current.layer:
            if current is not None:
                yield current
            current = CanonicalLayer(unit.layer, {})
        for name, tensor in run_unit(unit, ck):
            current.tensors[name] = tensor.float() if tensor.is_floating_point() else tensor
    if current is not None:
        yield current
