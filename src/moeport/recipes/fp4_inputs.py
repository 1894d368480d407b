"""`--to nvfp4 --input-scales FILE`: W4A4 NVFP4, with the static activation scale of every quantized
linear taken from a calibration file of activation maxima.

The file (JSON, or safetensors) maps module names to the largest |x| seen at that module's input
during a calibration run: `{"model.layers.0.mlp.experts.3.gate_proj": 12.5, ...}` (safetensors: one
one-element float tensor per name). A key may name a parent module (`model.layers.0.mlp.experts`:
every expert of the layer, as a hook on a fused experts module sees them); the most specific key
wins. Every quantized linear must be covered; a key that covers none is a mistake (a typo), refused.

Written as the servers read it: compressed-tensors `input_global_scale` F32 [1] (a divisor, 2688/amax,
`codecs.fp4.ct_global_scale`) and ModelOpt `input_scale` F32 [] (a multiplier, amax/2688). Linears a
server fuses (gate/up of an expert, q/k/v, w1/w3: they read the same input) get ONE input scale, from
the largest of their maxima, as vLLM and SGLang need for the fused matrix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from moeport.codecs.fp4 import ct_global_scale, modelopt_input_scale
from moeport.convert.plan import Plan, Unit, finalize
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Op
from moeport.mappings.values import Lazy, Value
from moeport.recipes.fused import fused_sets
from moeport.sources.checkpoint import Checkpoint

# the part of each quantized module that marks it (its per-tensor weight global scale), and the
# name of the activation scale written beside it, per flavour
_MARK = {"compressed-tensors": "weight_global_scale", "modelopt": "weight_scale_2"}
PART = {"compressed-tensors": "input_global_scale", "modelopt": "input_scale"}


@dataclass(frozen=True)
class StaticInputScale(Op):
    """A module's static activation scale: a constant from calibration, not derived from any tensor
    of the source (so it has no inverse: verify ignores activation scales)."""

    target: str
    value: float  # float32-exact value of the scale
    shape: tuple[int, ...]

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ()

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.target,)

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        value = lambda: torch.full(self.shape, self.value, dtype=torch.float32)  # noqa: E731
        return {self.target: Lazy(self.shape, torch.float32, produce=value)}

    def inverse(self) -> Op:
        raise MoeportError(f"{self.target}: a calibration constant has no inverse")


def read_maxima(path: str) -> dict[str, float]:
    """The calibration file as {module: input absmax}, each checked (one line per mistake)."""
    file = Path(path)
    if not file.is_file():
        raise MoeportError(f"--input-scales {path}: no such file")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), "pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError) as exc:
            raise MoeportError(f"--input-scales {path}: not a readable safetensors file ({exc})") from None
        maxima: dict[str, object] = {}
        for k, t in raw.items():
            if t.numel() != 1 or not t.is_floating_point():
                raise MoeportError(
                    f"--input-scales {path}: {k} is {t.dtype} {list(t.shape)}; expected one float"
                )
            maxima[k] = float(t.float().reshape(()))
    else:
        try:
            maxima = json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise MoeportError(f"--input-scales {path}: not JSON ({exc})") from None
        if not isinstance(maxima, dict):
            raise MoeportError(f"--input-scales {path}: expected an object {{module: input absmax}}")
    out: dict[str, float] = {}
    for k, v in maxima.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise MoeportError(f"--input-scales {path}: {k}: {v!r} is not a positive finite input absmax")
        out[k.removesuffix(".")] = float(v)
    if not out:
        raise MoeportError(f"--input-scales {path}: empty")
    return out


def file_digest(path: str) -> str:
    """What identifies the calibration data in the recorded recipe (a changed file is a new output)."""
    try:
        return "xxh3-128:" + xxhash.xxh3_128(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise MoeportError(f"--input-scales {path}: cannot read it ({exc.strerror})") from None


def add_input_scales(plan: Plan, ck: Checkpoint, det: Detection, flavor: str, path: str) -> Plan:
    """`plan` (finalized, weight-only NVFP4) with a static input scale beside every quantized module,
    one per fused set, in the unit that writes the module's weights; finalized again."""
    maxima = read_maxima(path)
    mark = f".{_MARK[flavor]}"
    unit_of: dict[str, int] = {}
    for i, unit in enumerate(plan.units):
        for name in unit.op.outputs:
            if name.endswith(mark):
                unit_of[name.removesuffix(mark)] = i
    used: set[str] = set()

    def absmax(module: str) -> float:
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in maxima:
                used.add(key)
                return maxima[key]
        raise MoeportError(
            f"--input-scales {path}: no input absmax for {module} (nor a module above it); "
            f"{len(unit_of)} quantized linears need one"
        )

    extra: dict[int, list[Op]] = {}
    for group in fused_sets([f"{m}.weight" for m in unit_of], det):
        modules = [n.removesuffix(".weight") for n in group]
        amax = torch.tensor(max(absmax(m) for m in modules), dtype=torch.float32)
        if flavor == "modelopt":
            value, shape = float(modelopt_input_scale(amax)), ()
        else:
            value, shape = float(ct_global_scale(amax)[0]), (1,)
        for m in modules:
            extra.setdefault(unit_of[m], []).append(StaticInputScale(f"{m}.{PART[flavor]}", value, shape))
    # keys of modules kept in 16 bits are calibration data this output does not need; a key naming
    # nothing in the checkpoint is a mistake
    names = [s.name for s in plan.specs]
    unknown = sorted(k for k in set(maxima) - used if not any(n.startswith(f"{k}.") for n in names))
    if unknown:
        raise MoeportError(
            f"--input-scales {path}: {unknown[0]} names no module of this checkpoint "
            f"({len(unknown)} such key(s); names look like {next(iter(unit_of), '?')})"
        )
    units = [
        Unit(u.layer, Chain((u.op, *extra[i])) if i in extra else u.op) for i, u in enumerate(plan.units)
    ]
    out = Plan(units, plan.config, notes=plan.notes, title=plan.title, side_files=plan.side_files)
    out.notes.append(
        f"nvfp4: static input scales for {len(unit_of)} quantized linears from {Path(path).name} "
        "(W4A4; fused linears share one)"
    )
    return finalize(out, ck)
