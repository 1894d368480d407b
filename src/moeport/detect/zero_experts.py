"""LongCat-Flash's zero-compute experts: identity experts, routed like the others, with no weights.

meituan-longcat/LongCat-Flash-Chat stores the E routed experts only (its own modeling code and
vLLM's loader build E weighted experts and return the input for the Z zero-compute ones).
transformers allocates `gate_up_proj` [E + Z, 2I, H] (`down_proj` [E, H, I]), never reads the Z
extra rows (its forward takes the identity for them), and its save writes them as
`experts.{E..E+Z-1}.gate_proj/up_proj`. The rule here: per-expert indices E..E+Z-1 that carry
gate and up only are those never-read weights and are left out, with a warning; a fused stack of
E + Z experts counts E. Any other extra expert is an error.
"""

from __future__ import annotations

from pathlib import Path

from moeport.detect.layout import LayoutMatch
from moeport.errors import MoeportError


def drop_zero_experts(match: LayoutMatch, routed: int | None, zero: int, root: Path) -> list[str]:
    """Take the zero-compute experts' gate/up tensors out of a per-expert `match` (in place);
    the warnings saying so. `routed`: the config's count of weighted experts (E)."""
    if not zero or match.layout.kind != "per-expert":
        return []
    if routed is None:
        raise MoeportError(
            f"{root / 'config.json'}: says {zero} zero-compute experts but not the routed count"
        )
    gate_up = {match.layout.projs[r] for r in ("gate", "up")}
    dropped = 0
    for layer, found in match.layers.items():
        extra = sorted(e for e in found.experts if e >= routed)
        for e in extra:
            projs = {p for (i, p) in found.parts if i == e}
            if e >= routed + zero or projs != gate_up:
                zeros = f"{zero} zero-compute ones (gate/up only, indices {routed}..{routed + zero - 1})"
                raise MoeportError(
                    f"{root}: layer {layer} expert {e} has {sorted(projs)}; the config says {routed} "
                    f"experts and {zeros}"
                )
            for proj in projs:
                keys = set(found.parts.pop((e, proj)).values())
                found.keys = [k for k in found.keys if k not in keys]
                dropped += len(keys)
            found.experts.discard(e)
    if not dropped:
        return []
    return [
        f"{dropped} tensors of zero-compute experts (indices {routed}..{routed + zero - 1}, gate/up only) "
        "left out: identity experts, whose weights transformers allocates but never reads"
    ]


def stack_zero_rows(counts: dict[int, int], routed: int | None, zero: int, layout_kind: str) -> int:
    """The zero-compute experts' rows each fused gate_up stack holds after the routed ones (its
    count less the config's routed experts): Z where every stack holds E + Z (transformers 5.24's
    memory layout), 0 where they hold E (transformers 5.25's, as the Hub)."""
    if not zero or layout_kind != "fused" or not counts:
        return 0
    if routed is None:  # no routed count to tell them by: transformers 5.24's form, as before
        return zero
    return zero if all(c == routed + zero for c in counts.values()) else 0
