"""The hub <-> fused renames of a derived family's non-expert tensors, read off transformers.

moeport renames by pairs of dotted fragments matched on whole segments (mappings.rename), so that
the same data covers every layer of a real checkpoint, not only the tiny model's. transformers
states its renames as regexes, some with look-aheads or groups; instead of translating those, we
take the names on both sides of transformers' own save and find the smallest segment pairs that
give every one of them and invert: each differing stretch of a name is one pair, grown by whole
segments of context (never a layer or expert index) only where a shorter pair would also fire on a
name it must leave alone.

A tensor transformers converts on load (a conv1d stack, a qkv split, a padded vocabulary) is not
a rename: moeport carries it as the Hub stores it, under the name transformers' renames give it
before its converter runs, which is where transformers' loader still applies that converter (so a
fused output loads as transformers' own model does; the tests compare logits).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher
from typing import NamedTuple

from moeport.errors import MoeportError
from moeport.mappings.rename import Rename

# (columns of context before, after) a differing stretch, tried in this order; the widest ones tell
# a wrapper's text layers from its vision tower's (Mistral-Large-4: `transformer.layers.*.attention.wo`)
_CONTEXTS = (
    *((0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0), (1, 2), (2, 1), (2, 2)),
    *((3, 0), (3, 1), (3, 2), (4, 0), (4, 1)),
)


def transformers_name(model) -> Callable[[str], str]:
    """The name transformers' renames give a hub key of `model` on load (its converters aside)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, [])[0]


def carried_names(model, state: dict, hub_state: dict, skip: set[str]) -> dict[str, str]:
    """Each non-expert hub key (not in `skip`) -> its name in the fused layout: the in-memory key
    where transformers only renames it (the same tensor object on both sides), else the name its
    renames give before a converter, checked to reach the same converter and target on load."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_id = {id(v): k for k, v in state.items()}
    out: dict[str, str] = {}
    for hub_key, value in hub_state.items():
        if hub_key in skip:
            continue
        if id(value) in by_id:
            out[hub_key] = by_id[id(value)]
            continue
        target, pattern = rename_source_key(hub_key, renamings, converters)
        carried, _ = rename_source_key(hub_key, renamings, [])
        if pattern is None or rename_source_key(carried, renamings, converters) != (target, pattern):
            raise MoeportError(f"transformers converts '{hub_key}' on load, under no name it still converts")
        out[hub_key] = carried
    return out


def converted_sources(model, state: dict, hub_state: dict) -> dict[str, list[str]]:
    """Each in-memory key that transformers builds on load by converting hub tensors (not a plain
    rename: Ergo's router `feed_forward.gate_kernel` [H, E], transposed into `mlp.gate.linear.weight`)
    -> those hub keys, so the hub names of a router or bias are known where no rename gives them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    held = {id(v) for v in state.values()}
    out: dict[str, list[str]] = {}
    for hub_key, value in hub_state.items():
        if id(value) in held:  # the same tensor on both sides: renamed, not converted
            continue
        target, pattern = rename_source_key(hub_key, renamings, converters)
        if pattern is not None and target in state:
            out.setdefault(target, []).append(hub_key)
    return out


class _Region(NamedTuple):
    """One differing stretch of a renamed key, column `at` of the key's aligned columns: each
    column is (hub segments, fused segments), one segment each where the two names agree."""

    columns: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]
    at: int

    @property
    def names(self) -> tuple[str, str]:
        return tuple(".".join(s for col in self.columns for s in col[side]) for side in (0, 1))

    def pair(self, context: tuple[int, int]) -> tuple[str, str] | None:
        """The rename pair with `context` columns around the stretch (an index there becomes '*',
        another differing stretch there joins the pair); None where that runs off the key or
        leaves a side empty."""
        start, end = self.at - context[0], self.at + 1 + context[1]
        if start < 0 or end > len(self.columns):
            return None
        sides: tuple[list[str], list[str]] = ([], [])
        for n in range(start, end):
            hub, fused = self.columns[n]
            if n != self.at and hub == fused and hub[0].isdigit():
                hub = fused = ("*",)
            sides[0].extend(hub)
            sides[1].extend(fused)
        if not sides[0] or not sides[1]:
            return None
        anchor = "^" if not any(col[0] for col in self.columns[:start]) else ""
        return anchor + ".".join(sides[0]), ".".join(sides[1])


def _regions(hub: str, fused: str) -> list[_Region]:
    """The differing stretches of two names, on whole segments; stretches one non-index segment
    apart are one (a swap such as `language_model.model` -> `model.language_model`)."""
    a, b = hub.split("."), fused.split(".")
    columns: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            columns += [((s,), (s,)) for s in a[i1:i2]]
        elif len(columns) >= 2 and columns[-2][0] != columns[-2][1] and not columns[-1][0][0].isdigit():
            (h, f), (same, _) = columns[-2], columns[-1]
            columns[-2:] = [(h + same + tuple(a[i1:i2]), f + same + tuple(b[j1:j2]))]
        else:
            columns.append((tuple(a[i1:i2]), tuple(b[j1:j2])))
    frozen = tuple(columns)
    return [_Region(frozen, n) for n, (h, f) in enumerate(frozen) if h != f]


def segment_renames(
    moved: dict[str, str], probe: Callable[[str], str] | None = None
) -> tuple[tuple[str, str], ...]:
    """Segment pairs hub -> fused that give every name of `moved` (hub -> fused, renamed or not)
    and invert on them; MoeportError naming the first name no pairs give. `probe` (transformers'
    name for any hub name) lets an index the tiny model holds once become a shifted '*'."""
    regions = [r for hub, fused in moved.items() if hub != fused for r in _regions(hub, fused)]
    level = [0] * len(regions)
    for _ in range(len(regions) * len(_CONTEXTS) + 1):
        pairs = [_pair(r, level, n) for n, r in enumerate(regions)]
        if any(p is None for p in pairs):
            n = pairs.index(None)
            hub, fused = regions[n].names
            raise MoeportError(f"no segment rename gives '{hub}' -> '{fused}' and leaves the others alone")
        bump = _clashes(pairs) or _misfires(regions, pairs, moved)
        if not bump:
            found = _checked(pairs, moved)
            return _shifted_indices(found, moved, probe) if probe is not None else found
        if all(level[n] >= len(_CONTEXTS) for n in bump):  # none can grow further
            hub, fused = regions[min(bump)].names
            raise MoeportError(f"no segment rename gives '{hub}' -> '{fused}' and leaves the others alone")
        for n in bump:
            level[n] += 1
    raise MoeportError("segment renames do not settle")


def _pair(region: _Region, level: list[int], n: int) -> tuple[str, str] | None:
    """The region's pair at its context level or the next one that exists (advancing `level`);
    past the last, its widest pair: a stretch next to another (Mistral-Large-4's wrapper prefix
    inserted before `layers.*.attention_norm`) may stop growing while the other's pair, grown
    over both, settles the name."""
    while level[n] < len(_CONTEXTS):
        found = region.pair(_CONTEXTS[level[n]])
        if found is not None:
            return found
        level[n] += 1
    return next((p for c in reversed(_CONTEXTS) if (p := region.pair(c)) is not None), None)


def _clashes(pairs: list[tuple[str, str]]) -> set[int]:
    """Regions whose fragment is renamed to two things (or two fragments to one): all but those
    of the most common rename of that fragment grow."""
    bump: set[int] = set()
    for side in (0, 1):
        seen: dict[str, Counter[str]] = {}
        for a_b in pairs:
            seen.setdefault(a_b[side], Counter())[a_b[1 - side]] += 1
        for n, p in enumerate(pairs):
            counts = seen[p[side]]
            if len(counts) > 1:
                (top, most), (_, second) = counts.most_common(2)
                if p[1 - side] != top or most == second:
                    bump.add(n)
    return bump


def _misfires(regions: list[_Region], pairs: list[tuple[str, str]], moved: dict[str, str]) -> set[int]:
    """Regions whose pair fires, forward or back, on a name the whole rename gets wrong: other
    names' pairs first, the name's own where no other fires."""
    rename = Rename(tuple(sorted(set(pairs))))
    back = rename.inverse()
    own: dict[tuple[str, str], set[tuple[str, str]]] = {}
    regions_of: dict[tuple[str, str], list[int]] = {}
    for n, (r, p) in enumerate(zip(regions, pairs, strict=True)):
        own.setdefault(r.names, set()).add(p)
        regions_of.setdefault(p, []).append(n)
    single = {p: (Rename((p,)), Rename(((p[1], p[0]),))) for p in regions_of}
    bump: set[int] = set()
    for hub, fused in moved.items():
        if rename(hub) == fused and back(fused) == hub:
            continue
        firing = {p for p, (fwd, inv) in single.items() if fwd(hub) != hub or inv(fused) != fused}
        foreign = firing - own.get((hub, fused), set())
        bump.update(n for p in foreign or firing for n in regions_of[p])
    return bump


def _checked(pairs: list[tuple[str, str]], moved: dict[str, str]) -> tuple[tuple[str, str], ...]:
    rename = Rename(tuple(sorted(set(pairs))))
    for hub, fused in moved.items():
        if rename(hub) != fused:
            raise MoeportError(f"renames {list(rename.pairs)} give '{rename(hub)}', not '{fused}'")
    rename.check(moved, "derived renames")
    return rename.pairs


def _shifted_indices(
    pairs: tuple[tuple[str, str], ...], moved: dict[str, str], probe: Callable[[str], str]
) -> tuple[tuple[str, str], ...]:
    """Pairs that hold an index literally on both sides, where the tiny model has one instance
    (Inkling-2: 'attn_queries.0' -> 'layers.1.attention_input.query', a per-layer tensor of all
    layers but the first), become '*' and '*+k' when transformers names the same tensor of a
    later layer so too (asked through `probe`); else they stay literal."""
    out = list(pairs)
    for n, (a, b) in enumerate(pairs):
        hub, fused = a.split("."), b.split(".")
        at_hub = [i for i, s in enumerate(hub) if s.isdigit()]
        at_fused = [i for i, s in enumerate(fused) if s.isdigit()]
        if len(at_hub) != 1 or len(at_fused) != 1:
            continue
        shift = int(fused[at_fused[0]]) - int(hub[at_hub[0]])
        later = ".".join(str(int(s) + 3) if i == at_hub[0] else s for i, s in enumerate(hub))
        hub[at_hub[0]], fused[at_fused[0]] = "*", f"*{shift:+d}" if shift else "*"
        trial = out[:n] + [(".".join(hub), ".".join(fused))] + out[n + 1 :]
        rename, to_later = Rename(tuple(trial)), Rename(((a, later),))
        probes = [to_later(h) for h in moved if to_later(h) != h]
        try:
            _checked(trial, moved)
        except MoeportError:
            continue
        if probes and all(rename(p) == probe(p) for p in probes):
            out = trial
    return tuple(sorted(out))
