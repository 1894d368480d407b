"""Compare two canonical checkpoints tensor by tensor; findings a person (and CI) can act on.

Per tensor: max abs error, relative L2 error, cosine, bit-exactness, and the worst block of 32
columns of a row against the median block (one bad group scale). Which tensors are flagged, and
why: verify.flags.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from moeport.verify.canonical import CanonicalLayer
from moeport.verify.flags import flag

BLOCK = 32  # columns per block of the per-block comparison (divides the usual group sizes)


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
    expect_exact: bool = False  # both sides store it alike, so it must come out bit-exact
    worst_block: str = ""  # where the worst block is: "row 5, columns 64-95"
    worst_block_rel: float = 0.0
    block_ratio: float = 0.0  # worst block's relative error / the median block's


@dataclass
class Report:
    lossless: bool
    tensors: list[TensorResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the source, not in the output
    extra: list[str] = field(default_factory=list)  # in the output, not in the source
    # a tensor whose peers are mostly bit-exact must be too; off when the output's recipe says
    # what was kept (an --ignore can leave most peers exact and the rest quantized)
    peers_decide: bool = True

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
    result = TensorResult(name, layer, list(out.shape), exact, max_abs, rel, cosine)
    if not exact and len(src.shape) >= 2:
        _worst_block(result, a, diff, tuple(src.shape))
    return result


def _worst_block(r: TensorResult, a: torch.Tensor, diff: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Relative L2 error per block of BLOCK columns of each row; the worst against the median of
    the blocks that hold anything (zero blocks quantize exactly and would drag the median to 0)."""
    k = shape[-1]
    width = BLOCK if k % BLOCK == 0 else k
    if k == 0:
        return
    a2 = a.view(-1, k // width, width).square().sum(-1)
    d2 = diff.view(-1, k // width, width).square().sum(-1)
    held = a2 > 0
    if int(held.sum()) < 16:
        return
    rel = torch.where(held, d2 / a2.clamp_min(1e-300), torch.zeros_like(a2)).sqrt()
    median = rel[held].median().item()
    worst = int(rel.argmax())
    row, block = divmod(worst, k // width)
    worst_rel = rel.flatten()[worst].item()
    index = list(torch.unravel_index(torch.tensor(row), shape[:-1])) if len(shape) > 2 else [row]
    where = f"row {row}" if len(shape) == 2 else f"index {[int(i) for i in index]}"
    r.worst_block = f"{where}, columns {block * width}-{block * width + width - 1}"
    r.worst_block_rel = worst_rel
    r.block_ratio = worst_rel / median if median > 0 else (float("inf") if worst_rel > 0 else 0.0)


def compare(
    source: Iterable[CanonicalLayer],
    output: Iterable[CanonicalLayer],
    lossless: bool,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
    exact_names: Collection[str] = (),
    peers_decide: bool = True,
) -> Report:
    """Walk both checkpoints layer by layer (memory: one layer of each side). `exact_names`: tensors
    expected bit-exact whatever the conversion (stored alike on both sides)."""
    report = Report(lossless, peers_decide=peers_decide)
    pending_out: dict[int | None, CanonicalLayer] = {}
    out_iter: Iterator[CanonicalLayer] = iter(output)
    for src_layer in source:
        out_layer = _take(src_layer.layer, pending_out, out_iter)
        got = out_layer.tensors if out_layer else {}
        for name, s in src_layer.tensors.items():
            if name not in got:
                report.missing.append(name)
                continue
            result = measure(name, src_layer.layer, s, got.pop(name))
            result.expect_exact = name in exact_names
            report.tensors.append(result)
        report.extra.extend(got)
    for rest in [*pending_out.values(), *out_iter]:
        report.extra.extend(rest.tensors)
    flag(report, max_rel_error, outlier_factor)
    return report


def _take(layer: int | None, pending: dict, it: Iterator[CanonicalLayer]) -> CanonicalLayer | None:
    if layer in pending:
        return pending.pop(layer)
    for candidate in it:
        if candidate.layer == layer:
            return candidate
        pending[candidate.layer] = candidate
    return None
