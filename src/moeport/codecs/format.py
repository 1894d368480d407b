"""What a storage format is: the types shared by codecs, detect/ and mappings/.

A weight is a group of tensors sharing a prefix ("parts": `weight` alone, `weight` +
`weight_scale_inv`, `qweight`/`scales`/`qzeros`, ...); `ExpertFormat` names how it is stored and
`RowRule` says how each part follows a split/merge of the weight's rows N. They live with the codecs
so that codecs never import detect/ or mappings/. Facts: ../shared/specs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    """

    axis: int | None
    per: int = 1


REPLICATED = RowRule(None)
ROWS = RowRule(-2)
VECTOR = RowRule(-1)  # a 1-D per-row part such as a bias or a per-channel scale [N]
