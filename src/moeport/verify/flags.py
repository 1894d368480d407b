"""Which compared tensors are wrong, and why, in words a person can act on.

A tensor is flagged when:
- shapes differ (set by compare.measure);
- it should be bit-exact and is not: the whole conversion is lossless (recipe or --lossless), or
  both sides store it alike (same name, float dtype and shape, no quantization companions), or
  most of its peers (the same tensor in the other layers and experts) are bit-exact and the
  output does not say how it was made;
- its relative L2 error exceeds `max_rel_error`;
- it is an outlier among the quantized tensors (> `outlier_factor` x their median error): a flipped
  scale or a swapped expert hides below any absolute bound for INT4 but stands out against peers;
- one block of it (a row's 32 columns, as fine as common quantization groups) has an error far
  above the tensor's median block: one bad group scale barely moves the tensor's error.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moeport.verify.compare import Report, TensorResult

BLOCK_OUTLIER = 8.0  # a block this many times the tensor's median block error is a bad group
# Errors at rounding level in every block are a rounding difference, not a bad scale: no outlier
# rule applies. Float32's level: an NVFP4 global scale stored as its reciprocal by the other flavour;
# the output dtype's own (TensorResult.rounding): an FP8 checkpoint dequantized to BF16, where blocks
# whose scale is a power of two come out exact and drag the median block to nothing.
ROUNDING = 1e-6
_INDEX = re.compile(r"\.(?:expert_)?\d+(?=\.)")  # `experts.expert_7.` too (Switch, NLLB-MoE)


def role(name: str) -> str:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> 'model.layers.*.mlp.experts.*.up_proj.weight'."""
    return _INDEX.sub(".*", name)


def flag(report: Report, max_rel_error: float, outlier_factor: float) -> None:
    lossy = [t.rel_l2 for t in report.tensors if not t.exact and not t.problem and len(t.shape) >= 2]
    median = statistics.median(lossy) if len(lossy) >= 8 else None
    peers: dict[str, list[TensorResult]] = defaultdict(list)
    for t in report.tensors:
        if not t.problem:
            peers[role(t.name)].append(t)
    for t in report.tensors:
        if not t.problem and not t.exact:
            t.problem = _problem(t, report, peers[role(t.name)], median, max_rel_error, outlier_factor)


def _problem(
    t: TensorResult,
    report: Report,
    peers: list[TensorResult],
    median: float | None,
    max_rel_error: float,
    outlier_factor: float,
) -> str:
    inexact = f"not bit-exact (max abs error {t.max_abs:.3g})"
    if report.lossless:
        return f"{inexact} in a lossless conversion"
    if t.expect_exact:
        return f"{inexact} although both sides store it alike"
    others = [p for p in peers if p is not t]
    exact_peers = sum(p.exact for p in others)
    if report.peers_decide and len(others) >= 2 and exact_peers * 2 > len(others):
        return f"{inexact} while {exact_peers} of its {len(others)} peers ({role(t.name)}) are"
    if t.rel_l2 > max_rel_error:
        return f"relative error {t.rel_l2:.3g} > {max_rel_error}"
    if t.worst_block_rel <= max(ROUNDING, t.rounding):
        return ""
    if median and t.rel_l2 > outlier_factor * median:
        return f"relative error {t.rel_l2:.3g} is {t.rel_l2 / median:.1f}× the median {median:.3g}"
    if t.block_ratio > BLOCK_OUTLIER:
        return (
            f"{t.worst_block}: relative error {t.worst_block_rel:.3g}, {t.block_ratio:.1f}× the "
            "tensor's median block (a bad scale?)"
        )
    return ""
