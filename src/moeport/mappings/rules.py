"""How each companion tensor of a weight follows a split or merge of the weight's output rows.

A weight [.., N, K] may be stored as several parts (FP8 codes + block scales, GPTQ qweight/qzeros/
scales, ...). When gate and up are concatenated along N (or split back), every part must be cut
along *its* axis that indexes N, in *its* units: block scales hold one row per `block` rows of the
weight, AWQ/GPTQ zero points pack 8 columns of N into one int32, a 0-d scale holds no N axis at all
(it is duplicated on split and must agree on merge). RowRule lives in codecs.format.
"""

from __future__ import annotations

from moeport.codecs.format import REPLICATED, ROWS, VECTOR, ExpertFormat, RowRule
from moeport.errors import MoeportError

__all__ = ["REPLICATED", "ROWS", "VECTOR", "RowRule", "row_rules"]


# Parts whose shape never depends on N.
_REPLICATED_PARTS = {"input_scale", "activation_scale", "input_global_scale", "weight_scale_2", "g_idx"}


def row_rules(fmt: ExpertFormat, shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, RowRule]:
    """The RowRule of every part of one weight stored as `fmt` (shapes: part -> per-weight shape)."""
    rules: dict[str, RowRule] = {}
    for part, shape in shapes.items():
        rules[part] = _rule(fmt, part, shape, where)
    return rules


def _rule(fmt: ExpertFormat, part: str, shape: tuple[int, ...], where: str) -> RowRule:
    if part in _REPLICATED_PARTS or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
        return REPLICATED
    if part in ("bias", "_bias"):
        return VECTOR
    name = fmt.name
    if name in ("gptq", "awq"):
        # qweight/scales are [K/g, N] (N last); AWQ packs N by 8 in qweight/qzeros, GPTQ in qzeros only.
        packs_n = part == "qzeros" or (name == "awq" and part == "qweight")
        return RowRule(-1, 8 if packs_n else 1)
    if name == "fp8-block" and part == fmt.params.get("scale"):
        return RowRule(-2, int(fmt.params["block"][0]))
    if name == "mxfp4" and part == "_blocks":
        return RowRule(-3)  # GPT-OSS blocks [.., N, K/32, 16]
    if name == "ct-pack-quantized" and part == "weight_zero_point":
        return RowRule(-2, 8 if int(fmt.params.get("num_bits", 4)) == 4 else 1)
    if part == "weight_shape":
        raise MoeportError(f"{where}: '{part}' records the unfused shape; re-laying it out is not supported")
    if len(shape) == 1:
        return VECTOR
    return ROWS
