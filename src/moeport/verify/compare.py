"""Compare two canonical checkpoints tensor by tensor; findings a person (and CI) can act on.

Per tensor: max abs error, relative L2 error, cosine, bit-exactness, and the worst block of 32
columns of a row against the median block (one bad group scale). Which tensors are flagged, and
why: verify.flags.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field

import torch

from moeport.verify.flags import flag
from moeport.verify.stream import Item, LayerSide, PlanSide

BLOCK = 32  # columns per block of the per-block comparison (divides the usual group sizes)
CHUNK = 1 << 22  # elements measured at once (float64 temporaries of about 40 bytes each; stream.py)


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
    # the relative error that rounding to the output's float dtype alone may give (bf16: 2^-7), so
    # an FP8 source dequantized to BF16 is not read as bad scales
    rounding: float = 0.0


@dataclass
class Report:
    lossless: bool
    tensors: list[TensorResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the source, not in the output
    extra: list[str] = field(default_factory=list)  # in the output, not in the source
    # a tensor whose peers are mostly bit-exact must be too; off when the output's recipe says
    # what was kept (an --ignore can leave most peers exact and the rest quantized)
    peers_decide: bool = True
    memory_bound: int = 0  # bytes verify holds at most (verify.run: its estimate from both plans)

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
            "memory_bound": self.memory_bound,
            "per_layer": self.per_layer(),
            "tensors": [asdict(t) for t in self.tensors],
        }


def measure(name: str, layer: int | None, src: torch.Tensor, out: torch.Tensor) -> TensorResult:
    """Errors of `out` against `src`, in float64 over chunks of rows (CHUNK elements at a time),
    so a large tensor costs its two float32 copies, not five float64 ones."""
    if src.shape != out.shape:
        return TensorResult(
            name, layer, list(out.shape), False, float("inf"), float("inf"), 0.0,
            f"shape {list(out.shape)}, source has {list(src.shape)}",
        )  # fmt: skip
    shape = tuple(src.shape)
    if torch.equal(src, out):
        return TensorResult(name, layer, list(shape), True, 0.0, 0.0, 1.0)
    k = shape[-1] if shape else 1
    a_rows, b_rows = src.reshape(-1, k), out.reshape(-1, k)
    step = max(1, CHUNK // max(k, 1))
    width = BLOCK if k % BLOCK == 0 else k
    sums = torch.zeros(4, dtype=torch.float64)  # a.a, b.b, a.b, d.d
    max_abs = torch.zeros((), dtype=torch.float64)
    a2: list[torch.Tensor] = []
    d2: list[torch.Tensor] = []
    for r0 in range(0, a_rows.shape[0], step):
        a, b = a_rows[r0 : r0 + step].double(), b_rows[r0 : r0 + step].double()
        d = b - a
        sums += torch.stack(((a * a).sum(), (b * b).sum(), (a * b).sum(), (d * d).sum()))
        max_abs = torch.maximum(max_abs, d.abs().max())
        if len(shape) >= 2 and k:
            a2.append(a.view(-1, k // width, width).square().sum(-1))
            d2.append(d.view(-1, k // width, width).square().sum(-1))
        del a, b, d
    saa, sbb, sab, sdd = sums.tolist()
    norm = saa**0.5
    rel = sdd**0.5 / norm if norm else float("inf")
    denom = norm * sbb**0.5
    cosine = sab / denom if denom else 0.0
    result = TensorResult(name, layer, list(shape), False, max_abs.item(), rel, cosine)
    if a2:
        _worst_block(result, torch.cat(a2), torch.cat(d2), shape, width)
    return result


def _worst_block(
    r: TensorResult, a2: torch.Tensor, d2: torch.Tensor, shape: tuple[int, ...], width: int
) -> None:
    """Relative L2 error per block of BLOCK columns of each row (a2, d2: squared sums per block,
    [rows, blocks]); the worst against the median of the blocks that hold anything (zero blocks
    quantize exactly and would drag the median to 0)."""
    held = a2 > 0
    if int(held.sum()) < 16:
        return
    rel = torch.where(held, d2 / a2.clamp_min(1e-300), torch.zeros_like(a2)).sqrt()
    median = rel[held].median().item()
    worst = int(rel.argmax())
    row, block = divmod(worst, a2.shape[-1])
    worst_rel = rel.flatten()[worst].item()
    index = list(torch.unravel_index(torch.tensor(row), shape[:-1])) if len(shape) > 2 else [row]
    where = f"row {row}" if len(shape) == 2 else f"index {[int(i) for i in index]}"
    r.worst_block = f"{where}, columns {block * width}-{block * width + width - 1}"
    r.worst_block_rel = worst_rel
    r.block_ratio = worst_rel / median if median > 0 else (float("inf") if worst_rel > 0 else 0.0)


def compare(
    source: Iterable[Item],
    output: PlanSide | LayerSide,
    lossless: bool,
    max_rel_error: float = 0.25,
    outlier_factor: float = 4.0,
    exact_names: Collection[str] = (),
    peers_decide: bool = True,
    on_layer: Callable[[int | None], None] | None = None,
) -> Report:
    """Walk the source tensor by tensor, each paired with the output's tensor of that name
    (verify.stream: memory is a tensor of each side, not a layer). `exact_names`: tensors
    expected bit-exact whatever the conversion (stored alike on both sides)."""
    report = Report(lossless, peers_decide=peers_decide)
    started = False
    current: int | None = None
    for layer, name, s in source:
        if not started or layer != current:
            if started:
                report.extra.extend(output.release(current))
            started, current = True, layer
            if on_layer is not None:
                on_layer(layer)
        got = output.take(layer, name)
        if got is None:
            report.missing.append(name)
            continue
        result = measure(name, layer, s, got)
        result.rounding = output.rounding(name)
        del s, got
        result.expect_exact = name in exact_names
        report.tensors.append(result)
    if started:
        report.extra.extend(output.release(current))
    report.extra.extend(output.rest())
    flag(report, max_rel_error, outlier_factor)
    return report
