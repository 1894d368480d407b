"""Renames of tensor keys as data: pairs of dotted name fragments, applied on whole segments.

Substring replacement is not invertible in general ('.attn.' -> '.self_attn.' eats the dot that
'.attn.norm.' needs), so keys are split on dots and every pair matches whole segments, longest
fragment first, in one simultaneous pass. The inverse swaps the pairs; `check` proves on the
actual keys that the rename is one-to-one and that the inverse gives every key back.
A fragment starting with '^' only matches at the start of a key (e.g. '^head' -> 'lm_head').
A segment '*' matches any index ('blocks.*.norm1' -> 'layers.*.layer_norm1'), and the indices it
matched fill the other side's '*' in order: a rename that holds for every layer of a stack.
'*+k' / '*-k' is an index shifted by k (Inkling-2 stores layer L's attention query as
`attn_queries.{L-1}`: 'attn_queries.*' -> 'layers.*+1.attention_input.query'); the inverse swaps
the sides, so '*+1' matches index 1 and up and gives back the index before the shift.
`aliases` are pairs applied first, forward only: other spellings of the same tensor that sources
use (DeepSeek-V4's public `attn.kv_norm` for transformers' `attn.norm`); the inverse gives the
spelling the aliases lead to, and `check` proves the round trip to that spelling.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from moeport.errors import MoeportError


@dataclass(frozen=True)
class Rename:
    pairs: tuple[tuple[str, str], ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for rules in (self.pairs, self.aliases):
            sources = [a for a, _ in rules]
            if len(set(sources)) != len(sources):
                raise ValueError(f"rename has a fragment twice: {sources}")
            for a, b in rules:
                if _indices(a) != _indices(b):
                    raise ValueError(f"rename '{a}' -> '{b}' has a different number of '*' on each side")

    def inverse(self) -> Rename:
        return Rename(tuple((b, a) for a, b in self.pairs))

    def __call__(self, key: str) -> str:
        return _apply(self.pairs, _apply(self.aliases, key))

    def check(self, keys: Iterable[str], where: str) -> None:
        """Refuse a rename that merges two keys or does not invert on these keys."""
        inverse = self.inverse()
        seen: dict[str, str] = {}
        for key in keys:
            new = self(key)
            if new in seen and seen[new] != key:
                raise MoeportError(f"{where}: renaming maps both '{seen[new]}' and '{key}' to '{new}'")
            seen[new] = key
            back = inverse(new)
            if back != _apply(self.aliases, key):
                raise MoeportError(f"{where}: renaming '{key}' -> '{new}' does not invert (gives '{back}')")


def _apply(pairs: tuple[tuple[str, str], ...], key: str) -> str:
    if not pairs:
        return key
    segments = key.split(".")
    rules = sorted(
        ((_segments(a), _segments(b), a.startswith("^") or b.startswith("^")) for a, b in pairs),
        key=lambda r: -len(r[0]),
    )
    out: list[str] = []
    i = 0
    while i < len(segments):
        for src, dst, anchored in rules:
            if anchored and i != 0:
                continue
            found = _match(src, segments[i : i + len(src)])
            if found is not None:
                indices = iter(found)
                out.extend(str(next(indices) + _shift(d)) if _is_index(d) else d for d in dst)
                i += len(src)
                break
        else:
            out.append(segments[i])
            i += 1
    return ".".join(out)


def _match(src: list[str], segments: list[str]) -> list[int] | None:
    """The indices '*' matched (before their shift), or None where `src` does not match."""
    if not any(map(_is_index, src)):  # the common case, compared at C speed
        return [] if segments == src else None
    if len(segments) != len(src):
        return None
    found = []
    for want, got in zip(src, segments, strict=True):
        if _is_index(want) and got.isdigit() and int(got) >= _shift(want):
            found.append(int(got) - _shift(want))
        elif want != got:
            return None
    return found


def _is_index(segment: str) -> bool:
    """'*', or an index shifted by a constant: '*+1', '*-2'."""
    return segment == "*" or (segment[:2] in ("*+", "*-") and segment[2:].isdigit())


def _shift(segment: str) -> int:
    return int(segment[1:]) if segment != "*" else 0


def _indices(fragment: str) -> int:
    return sum(map(_is_index, _segments(fragment)))


def _segments(fragment: str) -> list[str]:
    return fragment.removeprefix("^").split(".")


IDENTITY = Rename(())
