"""A conversion plan: ordered units of ops, and the exact output tensors they will write.

The plan is computed by applying every op to `meta` stand-ins of the source tensors, so names,
shapes and dtypes of the whole output are known (and every alignment or naming error is raised)
before a byte is written. Tiny tensors (0-d scales) are read for real, so disagreeing scales are
refused at planning time too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from moeport.dtypes import safetensors_name_of, torch_dtype_of
from moeport.mappings.ops import Op
from moeport.mappings.values import Lazy, Value, realize
from moeport.sinks.safetensors_file import TensorSpec
from moeport.sources.checkpoint import Checkpoint

TINY_ELEMENTS = 64  # read for real while planning (0-d / per-expert scalar scales)
# ModelOpt's statement of how the weights are quantized, which vLLM/SGLang/TensorRT-LLM read
# before config.json: an output that re-quantizes or dequantizes must not carry the source's.
HF_QUANT_CONFIG = "hf_quant_config.json"


@dataclass
class Unit:
    layer: int | None  # None: outside the layers (embeddings, final norm, lm_head)
    op: Op


@dataclass
class Plan:
    units: list[Unit]
    config: dict[str, Any] | None
    specs: list[TensorSpec] = field(default_factory=list)
    layer_of_output: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # said before any work, also with --quiet (e.g. this CPU cannot run what is written: recipes.kt_cpu)
    warnings: list[str] = field(default_factory=list)
    title: str = ""  # one line saying what this plan makes (dry run, summary)
    # JSON files written beside config.json (hf_quant_config.json...); None: one the source has is dropped
    side_files: dict[str, Any] = field(default_factory=dict)

    def layer_stats(self, ck: Checkpoint) -> dict[int | None, dict[str, int]]:
        """Per layer: tensors and bytes in and out."""
        stats: dict[int | None, dict[str, int]] = defaultdict(
            lambda: {"in": 0, "in_bytes": 0, "out": 0, "out_bytes": 0}
        )
        for unit in self.units:
            s = stats[unit.layer]
            for name in unit.op.inputs:
                s["in"] += 1
                s["in_bytes"] += ck.info(name).nbytes
        for spec in self.specs:
            s = stats[self.layer_of_output[spec.name]]
            s["out"] += 1
            s["out_bytes"] += spec.nbytes
        return dict(stats)

    def peak_estimate(self, ck: Checkpoint) -> int:
        """Bytes held at once: the largest output tensor, the source tensors of one unit, a float32 temp."""
        biggest_out = max((s.nbytes for s in self.specs), default=0)
        unit_in = max((sum(ck.info(n).nbytes for n in u.op.inputs) for u in self.units), default=0)
        per_weight = max((_fp32_bytes_per_expert(s) for s in self.specs), default=0)
        return biggest_out + unit_in + 2 * per_weight


def _fp32_bytes_per_expert(spec: TensorSpec) -> int:
    n = 1
    for d in spec.shape[-2:]:
        n *= d
    return 4 * n


def source_value(
    ck: Checkpoint, name: str, meta: bool, fetch: Callable[[str], Tensor] | None = None
) -> Value:
    info = ck.info(name)
    numel = 1
    for d in info.shape:
        numel *= d
    if meta and numel > TINY_ELEMENTS:
        return Lazy(info.shape, torch_dtype_of(info.dtype), meta=True)
    read = fetch or ck.read
    dtype = torch_dtype_of(info.dtype)

    def select(i: int) -> Lazy:
        return Lazy(info.shape[1:], dtype, produce=lambda: ck.read_item(name, i))

    return Lazy(info.shape, dtype, produce=lambda: read(name), select=select if info.shape else None)


def finalize(plan: Plan, ck: Checkpoint) -> Plan:
    """Run every unit on meta stand-ins: output specs in write order (and early errors)."""
    seen: set[str] = set()
    for unit in plan.units:
        outs = unit.op.apply({n: source_value(ck, n, meta=True) for n in unit.op.inputs})
        for name, v in outs.items():
            if name in seen:
                raise ValueError(f"plan writes '{name}' twice")
            seen.add(name)
            plan.specs.append(TensorSpec(name, _dtype_name(v), tuple(v.shape)))
            plan.layer_of_output[name] = unit.layer
    return plan


def _dtype_name(v: Value) -> str:
    return safetensors_name_of(v.dtype)


def apply_unit(unit: Unit, ck: Checkpoint, fetch: Callable[[str], Tensor] | None = None) -> dict[str, Value]:
    """The lazy outputs of one unit (nothing is read or computed yet)."""
    return unit.op.apply({n: source_value(ck, n, meta=False, fetch=fetch) for n in unit.op.inputs})


def realize_outputs(outs: dict[str, Value]):
    """Yield (name, tensor) for each lazy output, computed one at a time, in order."""
    for name in list(outs):
        value = outs.pop(name)
        yield name, realize(value)
        del value


def run_unit(unit: Unit, ck: Checkpoint, fetch: Callable[[str], Tensor] | None = None):
    """Yield (name, tensor) for each output of one unit, computed one at a time."""
    yield from realize_outputs(apply_unit(unit, ck, fetch))
