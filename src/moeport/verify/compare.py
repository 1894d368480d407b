"""Compare two canonical checkpoints tensor by tensor; findings a person (and CI) can act on.

Per tensor: max abs error, relative L2 error, cosine, bit-exactness. A tensor is flagged when
shapes differ, when a lossless conversion is not exact, when its relative error exceeds
`max_rel_error`, or (lossy conversions) when it is an outlier: more than `outlier_factor` times
the median error of the quantized tensors — a flipped scale or a swapped expert hides below any
absolute bound for INT4 but stands out against its peers.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from moeport.verify.canonical import CanonicalLayer


@dataclass
class TensorResult:
    name: str
    layer: int | None
    shape: list[int]
    exact: bool
    max_abs: float
    rel_l2: float
    cosine: float
    problem: str = ""


@dataclass
class Report:
    lossless: bool
    tensors: list[TensorResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the source, not in the output
    extra: list[str] = field(default_factory=list)  # in the output, not in the source

    @property
    def flagged(self) -> list[TensorResult]:
        return [t for t in self.tensors if t.problem]

    @property
    def ok(self) -> bool:
        return not (self.flagged or self.missing or self.extra)

    def per_layer(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t in self.tensors:
            key = "-" if t.layer is None else str(t.layer)
            s = out.setdefault(key, {"tensors": 0, "max_rel_l2": 0.0, "min_cosine": 1.0, "flagged": 0})
            s["tensors"] += 1
            s["max_rel_l2"] = max(s["max_rel_l2"], t.rel_l2)
            s["min_cosine"] = min(s["min_cosine"], t.cosine)
            s["flagged"] += bool(t.problem)
        return out

    def to_json(self) -> dict:
        return {
            "verdict": "ok" if self.ok else "fail",
            "lossless": self.lossless,
            "missing": self.missing,
            "extra": self.extra,
            "per_layer": self.per_layer(),
            "tensors": [asdict(t) for t in self.tensors],
        }


def measure(name: str, layer: int | None, src: torch.Tensor, out: torch.Tensor) -> TensorResult:
    if src.shape != out.shape:
        return TensorResult(
            name, layer, list(out.shape), False, float("inf"), float("inf"), 0.0,
            f"shape {list(out.shape)}, source has {list(src.shape)}",
        )  # fmt: skip
    exact = torch.equal(src, out)
    a, b = src.double().flatten(), out.double().flatten()
    diff = b - a
    norm = a.norm().item()
    rel = 0.0 if exact else (diff.norm().item() / norm if norm else float("inf"))
    denom = a.norm().item() * b.norm().item()
    cosine = 1.0 if exact else ((a @ b).item() / denom if denom else 0.0)
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    return TensorResult(name, layer, list(out.shape), exact, max_abs, rel, cosine)


def compare(
    source: Iterable[CanonicalLayer],
    output: Iterable[CanonicalLayer],
    lossless: bool,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
) -> Report:
    """Walk both checkpoints layer by layer (memory: one layer of each side)."""
    report = Report(lossless)
    pending_out: dict[int | None, CanonicalLayer] = {}
    out_iter: Iterator[CanonicalLayer] = iter(output)
    for src_layer in source:
        out_layer = _take(src_layer.layer, pending_out, out_iter)
        got = out_layer.tensors if out_layer else {}
        for name, s in src_layer.tensors.items():
            if name not in got:
                report.missing.append(name)
                continue
            report.tensors.append(measure(name, src_layer.layer, s, got.pop(name)))
        report.extra.extend(got)
    for rest in [*pending_out.values(), *out_iter]:
        report.extra.extend(rest.tensors)
    _flag(report, max_rel_error, outlier_factor)
    return report


def _take(layer: int | None, pending: dict, it: Iterator[CanonicalLayer]) -> CanonicalLayer | None:
    if layer in pending:
        return pending.pop(layer)
    for candidate in it:
        if candidate.layer == layer:
            return candidate
        pending[candidate.layer] = candidate
    return None


def _flag(report: Report, max_rel_error: float, outlier_factor: float) -> None:
    lossy = [t.rel_l2 for t in report.tensors if not t.exact and not t.problem and len(t.shape) >= 2]
    median = statistics.median(lossy) if len(lossy) >= 8 else None
    for t in report.tensors:
        if t.problem:
            continue
        if report.lossless and not t.exact:
            t.problem = f"not bit-exact (max abs error {t.max_abs:.3g}) in a lossless conversion"
        elif t.rel_l2 > max_rel_error:
            t.problem = f"relative error {t.rel_l2:.3g} > {max_rel_error}"
        elif median and not t.exact and t.rel_l2 > outlier_factor * median:
            t.problem = f"relative error {t.rel_l2:.3g} is {t.rel_l2 / median:.1f}× the median {median:.3g}"
