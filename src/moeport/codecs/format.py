"""What a storage format is: the types every codec module uses to declare its format(s).

A weight is a group of tensors sharing a prefix ("parts": `weight` alone, `weight` +
`weight_scale_inv`, `qweight`/`scales`/`qzeros`, ...). A `StorageFormat` says, from the parts'
headers alone, whether a group is stored in it (`recognize`), its logical [.., N, K] shape
(`decoded_shape`), how each companion part follows a split/merge of the rows N (`row_rule`) and which
codec decodes it (`codec`). Each codec module declares its formats next to its codec; codecs.registry
lists them in recognition order. This module imports no codec module, so detect/ and mappings/ can
use these types without pulling in the registry. Facts: each codec module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moeport.codecs.base import Codec

Shape = tuple[int, ...]
Params = dict[str, Any]

# Companions that travel with a weight but do not decide its format.
PASSIVE_PARTS = frozenset({"bias", "_bias", "input_scale", "input_global_scale", "activation_scale"})


@dataclass(frozen=True)
class Part:
    """One tensor of a weight as its header describes it (safetensors dtype name, shape)."""

    dtype: str
    shape: Shape


@dataclass(frozen=True)
class ExpertFormat:
    """A detected format: its name and the parameters read from the parts and the config."""

    name: str  # "bf16", "fp8-block", "mxfp4", "gptq", ...
    params: Params = field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name} ({extra})" if extra else self.name


@dataclass(frozen=True)
class RowRule:
    """`axis` (negative, from the end) is the part's N axis, one stored index per `per` rows of N.

    axis None: the part does not depend on N (0-d scale, g_idx): replicated, must agree on merge.
    shape: the part records the weight's logical shape [.., N, K] (compressed-tensors'
    `weight_shape`): merged, it says the summed rows; split, each piece's rows; K must agree.
    """

    axis: int | None
    per: int = 1
    shape: bool = False


REPLICATED = RowRule(None)
ROWS = RowRule(-2)
VECTOR = RowRule(-1)  # a 1-D per-row part such as a bias or a per-channel scale [N]
SHAPE = RowRule(None, shape=True)  # the weight's shape [N, K] as data (see RowRule)

# recognize(active parts, quantization_config, quant_method lowercased, where) -> the format, or
# None when the group is not stored in it; a group that is but is malformed raises MoeportError.
Recognizer = Callable[[dict[str, Part], dict[str, Any], str, str], ExpertFormat | None]
# decoded_shape(part shapes, params) -> [.., N, K]; a missing part raises KeyError (named by the caller).
ShapeOf = Callable[[dict[str, Shape], Params], Shape]
# row_rule(part, params) -> the part's RowRule, or None where the generic rules (registry) apply.
PartRule = Callable[[str, Params], RowRule | None]


def generic_rules(part: str, params: Params) -> RowRule | None:
    """No format-specific rule: every part follows the generic ones."""
    return None


@dataclass(frozen=True)
class StorageFormat:
    """Everything moeport knows about one storage format, declared next to its codec."""

    name: str  # ExpertFormat.name of the weights it recognises
    recognize: Recognizer
    decoded_shape: ShapeOf | None = None  # None: weights in it cannot be dequantized
    codec: Callable[[Params], Codec] | None = None  # None: recognised, no decoder yet
    row_rule: PartRule = generic_rules
    # A part only this format's weights carry: `recognize` is asked only when it is present, and its
    # presence marks a group as quantized (dequantize.weight_format). None: known by `weight`'s dtype.
    marker: str | None = None
    # Formats sharing a name (mxfp4) differ by params["variant"]; None: any variant.
    variant: str | None = None
    is_float: bool = False  # a plain float weight: nothing to dequantize
    # Per-expert names of parts that fused names spell otherwise: transformers' fused suffix
    # `_scale` reads back as `weight_scale`, which DeepSeek-V4's FP4 experts call `scale`.
    hub_parts: tuple[tuple[str, str], ...] = ()

    def matches(self, fmt: ExpertFormat) -> bool:
        """Whether this declaration describes the detected `fmt` (name, then variant)."""
        return self.name == fmt.name and self.variant in (None, fmt.params.get("variant"))
