"""The (hidden, intermediate) size of a layer's experts, from headers, every projection checked.

kt-kernel's loader trusts shapes; a transposed fused gate_up [E, H, 2I] would load as garbage
(kt's own script converts it silently), so every expert and projection is checked here first.
"""

from __future__ import annotations

from moeport.convert.dequantize import decoded_shape
from moeport.detect.detection import Detection
from moeport.detect.formats import ExpertFormat
from moeport.errors import MoeportError
from moeport.sources.checkpoint import Checkpoint

Groups = dict[tuple[int, str], dict[str, str]]


def expert_shape(
    ck: Checkpoint, layer: int, groups: Groups, experts: int, fmt: ExpertFormat, fused: bool, zero: int = 0
) -> tuple[int, int]:
    """(H, I) of one layer's experts; `zero`: LongCat's zero-compute experts, whose rows a fused
    gate_up holds after the routed ones ([E + Z, 2I, H] beside down_proj [E, H, I])."""

    def shape(role: tuple[int, str]) -> tuple[int, ...]:
        group = groups.get(role)
        if group is None:
            raise MoeportError(f"{ck.root}: layer {layer} has no {role[1]} experts tensor")
        where = next(iter(group.values()))
        return decoded_shape(fmt, {p: ck.info(n).shape for p, n in group.items()}, where)

    if fused:
        gu, down = shape((-1, "gate_up")), shape((-1, "down"))
        gu_key = next(iter(groups[(-1, "gate_up")].values()))
        if len(gu) != 3 or len(down) != 3:
            raise MoeportError(f"{gu_key}: fused experts must be 3-D [E, 2I, H] / [E, H, I]")
        e, h, i = down
        if tuple(gu) != (e + zero, 2 * i, h):
            zeros = f" + {zero} zero-compute experts" if zero else ""
            raise MoeportError(
                f"{gu_key}: shape {list(gu)}, expected [E{' + Z' * bool(zero)}, 2I, H] = "
                f"{[e + zero, 2 * i, h]} (from down_proj {list(down)}{zeros}); gate rows first, then up"
            )
        return h, i
    i, h = shape((0, "gate"))
    for e in range(experts):
        for role, want in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            got = shape((e, role))
            if tuple(got) != want:
                key = next(iter(groups[(e, role)].values()))
                raise MoeportError(f"{key}: shape {list(got)}, expected {list(want)} (gate is {[i, h]})")
    return h, i


def one_size(det: Detection, sizes: dict[int, tuple[int, int, int]]) -> tuple[list[int], str | None]:
    """The MoE layers kt converts, and a note where it leaves some out. kt's layout has one
    (hidden, intermediate, experts) for all its layers: where further expert stacks (Qwen3-Omni's
    talker, H=1024 beside the thinker's 2048) have other sizes than the main stack, the main
    stack's layers are converted and the other stacks' experts stay as they are stored (the GPU
    side runs them); a main stack whose own layers differ is refused by the caller's checks."""
    main = [L for L in sizes if det.naming.stack_of(L) == 0]
    if not main or len({sizes[L] for L in sizes}) == 1:
        return sorted(sizes), None
    size = sizes[main[0]]
    kept = sorted(L for L in sizes if det.naming.stack_of(L) == 0 or sizes[L] == size)
    left = sorted({det.naming.stacks[det.naming.stack_of(L) - 1][0] for L in sizes if L not in kept})
    h, i, e = size
    return kept, (
        f"kt: converted the experts of {len(kept)} layers (H={h}, I={i}, {e} experts: '{det.naming.main}'); "
        f"those under {', '.join(repr(p) for p in left)} have other sizes and stay as stored (kt's layout "
        "has one expert size)"
    )
