"""How each companion tensor of a weight follows a split or merge of the weight's output rows.

A weight [.., N, K] may be stored as several parts (FP8 codes + block scales, GPTQ qweight/qzeros/
scales, ...). When gate and up are concatenated along N (or split back), every part must be cut
along *its* axis that indexes N, in *its* units: block scales hold one row per `block` rows of the
weight, AWQ/GPTQ zero points pack 8 columns of N into one int32, a 0-d scale holds no N axis at all
(it is duplicated on split and must agree on merge). Each format declares its own parts' rules next
to its codec (codecs.registry.row_rule); RowRule itself lives in codecs.format.
"""

from __future__ import annotations

from moeport.codecs.format import REPLICATED, ROWS, VECTOR, ExpertFormat, RowRule
from moeport.codecs.registry import row_rule

__all__ = ["REPLICATED", "ROWS", "VECTOR", "RowRule", "row_rules"]


def row_rules(fmt: ExpertFormat, shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, RowRule]:
    """The RowRule of every part of one weight stored as `fmt` (shapes: part -> per-weight shape)."""
    return {part: row_rule(fmt, part, shape, where) for part, shape in shapes.items()}
