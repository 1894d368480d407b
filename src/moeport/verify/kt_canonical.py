"""kt-kernel outputs (merged safetensors or layer folders) in canonical form.

The output's own layout description (sinks.kt_layout: stored in the index metadata, or in
`moeport-kt.json` for folders) says which slices exist and where; each expert matrix is decoded
slice by slice with `KtAmxCodec` and the TP slices put back together (gate/up: rows, down:
columns) under the hub names of the source family. Non-expert tensors (merged form) are decoded
like any HF tensor. Names are generated from the description, never parsed.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from moeport.codecs.kt_amx import KtAmxCodec
from moeport.convert.plan import Unit, run_unit
from moeport.detect.generic import family_named
from moeport.detect.layout import LayerNaming, find_naming
from moeport.detect.stacks import with_family_stacks
from moeport.errors import MoeportError
from moeport.mappings.rename import IDENTITY, Rename
from moeport.recipes.hf import canonical_other_tensors
from moeport.sinks.kt import MANIFEST_NAME
from moeport.sinks.kt_layout import PROJS, KtLayout, KtSlot
from moeport.sinks.sharded import INDEX_NAME
from moeport.sources.checkpoint import Checkpoint
from moeport.verify.canonical import CanonicalLayer
from moeport.zoo.derived import NotDerivable, lookup_family
from moeport.zoo.families import Family
from moeport.zoo.model_config import ModelConfig

ReadSlot = Callable[[KtSlot, str], torch.Tensor]


def kt_description(out: Path) -> KtLayout | None:
    """The layout description of a kt output folder, or None when `out` is not one."""
    found = kt_metadata(out)
    return None if found is None else KtLayout.from_metadata(found[1], str(found[0]))


def kt_metadata(out: Path) -> tuple[Path, dict[str, str]] | None:
    """(file, metadata) of a kt output folder: the manifest of the folder form, or the index of
    the merged form; None when `out` is not a kt output."""
    for name in (MANIFEST_NAME, INDEX_NAME):
        path = out / name
        if path.is_file():
            try:
                meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
            except (OSError, ValueError, AttributeError):
                return None
            if isinstance(meta, dict) and "kt_method" in meta:
                return path, meta
    return None


def folder_layers(out: Path, kt: KtLayout, family: Family, naming: LayerNaming) -> Iterator[CanonicalLayer]:
    """kt's folder form: experts only (it holds nothing else), named as the source names them."""
    files = {}
    for layer in kt.layers:
        for slot in kt.slots(layer):
            files.update(kt.files(slot))

    def read(slot: KtSlot, part: str) -> torch.Tensor:
        path = out / files[slot.key(part)]
        try:
            data = bytearray(path.read_bytes())
        except OSError as exc:
            raise MoeportError(f"{path}: cannot read ({exc.strerror})") from None
        return torch.frombuffer(data, dtype=torch.int8 if part == "weight" else torch.float32)

    for layer in kt.layers:
        yield CanonicalLayer(layer, _experts(kt, layer, read, family, naming))


def merged_layers(ck: Checkpoint, kt: KtLayout) -> Iterator[CanonicalLayer]:
    family = _family(ck.config, ck.root, kt_metadata(ck.root))
    experts = kt.layer_of_keys()
    others = [k for k in ck.keys() if k not in experts]
    rename = _to_hub_names(family, others)
    cfg = ModelConfig(ck.config or {})
    num_layers = (cfg.at(family.config) if family.config else cfg).first_int(family.fields.num_layers)
    naming = find_naming(others, _layer_prefix(family, others), family.mtp_prefixes, num_layers)
    naming, _ = with_family_stacks(others, family, naming, num_layers, ck.config)  # Qwen3-Omni's talker
    by_layer: dict[int | None, list[str]] = defaultdict(list)
    for key in others:
        by_layer[naming.layer_of(key)].append(key)
    for layer in sorted(set(by_layer) | set(kt.layers), key=lambda L: -1 if L is None else L):
        tensors: dict[str, torch.Tensor] = {}
        for op in canonical_other_tensors(ck, by_layer.get(layer, []), rename):
            for name, t in run_unit(Unit(layer, op), ck):
                tensors[name] = t.float() if t.is_floating_point() else t
        if layer in kt.layers:
            tensors.update(_experts(kt, layer, lambda slot, part: ck.read(slot.key(part)), family, naming))
        yield CanonicalLayer(layer, tensors)


def expert_names(kt: KtLayout, layer: int, family: Family, naming: LayerNaming) -> dict[tuple[int, str], str]:
    base = f"{naming.prefix(layer)}{family.per_expert.base}"
    return {
        (e, proj): f"{base}{e}.{family.per_expert.projs[proj]}.weight"
        for e in range(kt.experts)
        for proj in PROJS
    }


def _experts(
    kt: KtLayout, layer: int, read: ReadSlot, family: Family, naming: LayerNaming
) -> dict[str, torch.Tensor]:
    codec = KtAmxCodec(kt.bits)
    slices: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    names = expert_names(kt, layer, family, naming)
    for slot in kt.slots(layer):
        parts = {p: read(slot, p) for p in ("weight", "scale")}
        slices[(slot.expert, slot.proj)].append(codec.decode(parts, where=slot.key("weight")))
    return {names[key]: torch.cat(s, dim=1 if key[1] == "down" else 0) for key, s in slices.items()}


def _family(config: dict | None, where: Path, meta: tuple[Path, dict[str, str]] | None = None) -> Family:
    cfg = ModelConfig(config or {})
    try:
        return lookup_family(cfg.model_types)[0]
    except NotDerivable as e:
        recorded = (meta[1] if meta else {}).get("source_family", "")  # a generic source family
        if (family := family_named(recorded, cfg.model_types[0] if cfg.model_types else "")) is not None:
            return family
        raise MoeportError(f"{where}: kt output needs the source config.json to name its tensors") from e


def _layer_prefix(family: Family, keys: list[str]) -> str:
    for prefix in family.layer_prefixes:
        pattern = re.compile("^" + re.escape(prefix).replace(re.escape("{L}"), r"\d+"))
        if any(pattern.match(k) for k in keys):
            return prefix
    return family.layer_prefixes[0]


def _to_hub_names(family: Family, keys: list[str]) -> Rename:
    """kt outputs keep the source's non-expert names; bring fused-layout names back to hub names."""
    if not family.fused_renames:
        return IDENTITY
    forward = Rename(family.fused_renames)
    back = forward.inverse()
    fused_named = any(back(k) != k for k in keys) and not any(forward(k) != k for k in keys)
    return back if fused_named else Rename((), family.hub_aliases)
