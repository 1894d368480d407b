"""The storage formats moeport knows, in recognition order, and the questions asked of them.

Each codec module declares its formats (codecs.format.StorageFormat); this is the one list of them.
A weight's format is the first whose `recognize` accepts its parts, so the order is part of the
behaviour: marker formats first (`_blocks`, then `qweight`, then `weight_packed`, `ggml_type`),
then a `weight` by dtype (float, E4M3, packed FP4). Within a family the last one raises for a
group it cannot place.
"""

from __future__ import annotations

from typing import Any

from moeport.codecs import compressed_tensors, floats, fp4, fp8, ggml, gptq
from moeport.codecs.base import Codec
from moeport.codecs.format import (
    PASSIVE_PARTS,
    REPLICATED,
    ROWS,
    VECTOR,
    ExpertFormat,
    Part,
    RowRule,
    Shape,
    StorageFormat,
)
from moeport.errors import MoeportError

FORMATS: tuple[StorageFormat, ...] = (
    fp4.MXFP4_GPT_OSS,
    *gptq.FORMATS,
    *compressed_tensors.FORMATS,
    ggml.GGUF,
    *floats.FORMATS,
    *fp8.FORMATS,
    fp4.NVFP4,
    fp4.MXFP4_DSV4,
)

FLOAT_FORMATS = frozenset(f.name for f in FORMATS if f.is_float)
# Parts that mean "this group is quantized" (a float `weight` alone is not).
QUANTIZED_MARKERS = tuple(dict.fromkeys(f.marker for f in FORMATS if f.marker))
# Parts whose shape never depends on N, whatever the format.
_REPLICATED_PARTS = {"input_scale", "activation_scale", "input_global_scale", "weight_scale_2", "g_idx"}


def _find(fmt: ExpertFormat) -> StorageFormat | None:
    return next((f for f in FORMATS if f.matches(fmt)), None)


def format_of(fmt: ExpertFormat | str) -> StorageFormat:
    """The declaration of a detected format (or of a format name, for variant-free names)."""
    found = _find(ExpertFormat(fmt) if isinstance(fmt, str) else fmt)
    if found is None:
        name = fmt if isinstance(fmt, str) else fmt.describe()
        raise MoeportError(f"unknown storage format {name}")
    return found


def classify(parts: dict[str, Part], quant: dict[str, Any], where: str) -> ExpertFormat:
    """Format of a weight given its parts (keyed by suffix: 'weight', 'weight_scale_inv', '_blocks'...)."""
    active = {k: v for k, v in parts.items() if k not in PASSIVE_PARTS}
    method = str(quant.get("quant_method", "")).lower()
    for f in FORMATS:
        if f.marker is not None and f.marker not in active:
            continue
        fmt = f.recognize(active, quant, method, where)
        if fmt is not None:
            return fmt
    if "weight" not in active:
        raise MoeportError(
            f"{where}: no weight tensor among parts {sorted(parts)}; "
            "expected 'weight', 'qweight', 'weight_packed' or '_blocks'+'_scales'"
        )
    raise MoeportError(
        f"{where}: unrecognised expert storage: parts "
        f"{ {k: f'{v.dtype}{list(v.shape)}' for k, v in active.items()} }"
    )


def codec_for(fmt: ExpertFormat) -> Codec:
    """The codec that decodes weights stored as `fmt` (parameters taken from the detection)."""
    found = _find(fmt)
    if found is None or found.codec is None:
        raise MoeportError(f"no decoder for expert format {fmt.describe()} yet")
    return found.codec(fmt.params)


def decoded_shape(fmt: ExpertFormat, shapes: dict[str, Shape], where: str) -> Shape:
    """Logical [.., N, K] of a weight stored as `fmt`, from its parts' shapes (no data read)."""
    found = _find(fmt)
    if found is None or found.decoded_shape is None:
        raise MoeportError(f"{where}: cannot dequantize format {fmt.describe()}")
    try:
        return found.decoded_shape(shapes, fmt.params)
    except KeyError as exc:
        raise MoeportError(f"{where}: {fmt.describe()} weight without its '{exc.args[0]}' tensor") from None


def hub_part(fmt: ExpertFormat, part: str) -> str:
    """The per-expert name of a part read from fused names (StorageFormat.hub_parts)."""
    found = _find(fmt)
    return dict(found.hub_parts).get(part, part) if found is not None else part


def row_rule(fmt: ExpertFormat, part: str, shape: Shape, where: str) -> RowRule:
    """How `part` (per-weight `shape`) of a weight stored as `fmt` follows a split/merge of rows N:
    parts that hold no N axis are replicated, then the format's own rule, then rows or a vector."""
    if part in _REPLICATED_PARTS or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
        return REPLICATED
    if part in ("bias", "_bias"):
        return VECTOR
    found = _find(fmt)
    rule = found.row_rule(part, fmt.params) if found is not None else None
    if rule is not None:
        return rule
    if part == "weight_shape":
        raise MoeportError(f"{where}: '{part}' records the unfused shape; re-laying it out is not supported")
    if len(shape) == 1:
        return VECTOR
    return ROWS
