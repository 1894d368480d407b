"""kt-kernel's CPU expert layout as data: which tensors exist, their names and their files.

One description serves the recipe (what to plan), both sinks (merged safetensors keys
`blk.{L}.ffn_{proj}_exps.{E}.numa.{t}.{weight|scale}`, or kt's `--no-merge-safetensor` folders
`_layer_{L}/_numa_{t}/INT{bits}_{proj}_{E}_{bytes}Byte_{quant|scale}_.kt`) and `verify` (reading
either form back): names are generated from it, never parsed. Facts: codecs/kt_amx.py, docs/DESIGN.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from moeport.errors import MoeportError
from moeport.sinks.safetensors_file import TensorSpec

PROJS = ("gate", "up", "down")
PARTS = ("weight", "scale")
METHODS = {4: "AMXINT4", 8: "AMXINT8"}
LAYOUT_VERSION = 1


def merged_key(layer: int, proj: str, expert: int, t: int, part: str) -> str:
    """Merged-safetensors key, part = 'weight' (int8 1-D) or 'scale' (float32 1-D)."""
    if proj not in PROJS or part not in PARTS:
        raise MoeportError(f"kt key: proj {proj!r} / part {part!r}, expected one of {PROJS} / weight|scale")
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{t}.{part}"


def folder_paths(layer: int, proj: str, expert: int, t: int, n: int, k: int, bits: int) -> tuple[str, str]:
    """Folder-form relative paths (quant, scale) of one [n, k] matrix, as kt-kernel writes them."""
    if bits not in METHODS:
        raise MoeportError(f"kt AMX: bits {bits}, expected 4 (AMXINT4) or 8 (AMXINT8)")
    if proj not in PROJS:
        raise MoeportError(f"kt folder path: proj {proj!r}, expected one of {PROJS}")
    d = f"_layer_{layer}/_numa_{t}"
    stem = f"INT{bits}_{proj}_{expert}"
    return f"{d}/{stem}_{n * k * bits // 8}Byte_quant_.kt", f"{d}/{stem}_{4 * n}Byte_scale_.kt"


@dataclass(frozen=True)
class KtSlot:
    """One TP slice of one projection of one expert: an [n, k] matrix, stored as weight + scale."""

    layer: int
    proj: str
    expert: int
    t: int
    n: int
    k: int

    def key(self, part: str) -> str:
        return merged_key(self.layer, self.proj, self.expert, self.t, part)


@dataclass(frozen=True)
class KtLayout:
    bits: int
    tp: int
    hidden: int
    inter: int
    layers: tuple[int, ...]
    experts: int

    @property
    def method(self) -> str:
        return METHODS[self.bits]

    def mats(self) -> list[tuple[str, int, int]]:
        """(proj, n, k) of one expert's TP slice: gate/up rows and down columns of I/T."""
        part = self.inter // self.tp
        return [("gate", part, self.hidden), ("up", part, self.hidden), ("down", self.hidden, part)]

    def slots(self, layer: int) -> Iterator[KtSlot]:
        """A layer's slices in output order: expert, then TP slice, then gate/up/down."""
        for e in range(self.experts):
            yield from self.expert_slots(layer, e)

    def expert_slots(self, layer: int, expert: int) -> Iterator[KtSlot]:
        """One expert's slices, in output order (a plan asks per expert: not the whole layer's)."""
        for t in range(self.tp):
            for proj, n, k in self.mats():
                yield KtSlot(layer, proj, expert, t, n, k)

    def specs(self, slot: KtSlot) -> tuple[TensorSpec, TensorSpec]:
        weight = TensorSpec(slot.key("weight"), "I8", (slot.n * slot.k * self.bits // 8,))
        return weight, TensorSpec(slot.key("scale"), "F32", (slot.n,))

    def files(self, slot: KtSlot) -> dict[str, str]:
        """Folder form: merged key -> path relative to the output folder."""
        quant, scale = folder_paths(slot.layer, slot.proj, slot.expert, slot.t, slot.n, slot.k, self.bits)
        return {slot.key("weight"): quant, slot.key("scale"): scale}

    def layer_of_keys(self) -> dict[str, int]:
        return {s.name: L for L in self.layers for slot in self.slots(L) for s in self.specs(slot)}

    def metadata(self) -> dict[str, str]:
        """What a reader needs to rebuild this description (stored in every file / the manifest)."""
        return {
            "kt_method": self.method,
            "kt_threadpool_count": str(self.tp),
            "kt_layout_version": str(LAYOUT_VERSION),
            "kt_hidden_size": str(self.hidden),
            "kt_intermediate_size": str(self.inter),
            "kt_experts": str(self.experts),
            "kt_layers": ",".join(map(str, self.layers)),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> KtLayout:
        try:
            bits = next(b for b, m in METHODS.items() if m == meta["kt_method"])
            return cls(
                bits,
                int(meta["kt_threadpool_count"]),
                int(meta["kt_hidden_size"]),
                int(meta["kt_intermediate_size"]),
                tuple(int(x) for x in meta["kt_layers"].split(",") if x),
                int(meta["kt_experts"]),
            )
        except (KeyError, StopIteration, ValueError) as exc:
            raise MoeportError(f"{where}: kt output without a readable layout description ({exc})") from None
