"""The layer walk: calibrate layer L from its input states, GPTQ its targeted weights, propagate
the QUANTIZED layer's outputs to L + 1.

Plan ops (recipes/gptq.py `GptqEncode`) ask `Calibrator.parts(layer, name)` for their encoded
parts; the first ask for a layer runs that layer (and any before it not yet run), under a lock,
so the executor's threads, read-ahead and journal work as for RTN. Memory: one decoder layer in
float32, the calibration states (samples x seq_len x hidden x 4 B, in and out), the layer's
Hessians and the encoded parts of one layer. The states at each layer boundary are saved in the
staging folder (`gptq-states/`, the last few kept), so a resumed run starts from the newest one
at or before its first unfinished layer instead of from the embeddings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeport.calibrate.family import FamilyModel
from moeport.calibrate.hessians import LayerHessians, expert_count
from moeport.calibrate.kernel import gptq_codes
from moeport.codecs.compressed_tensors import PackQuantizedCodec
from moeport.codecs.int_rtn import rtn_codes, rtn_dequantize, rtn_params
from moeport.codecs.packing import pack_int32
from moeport.convert.encode import check_finite_weight
from moeport.detect.detection import Detection
from moeport.sources.checkpoint import Checkpoint

STATES_DIR = "gptq-states"
KEEP_BOUNDARIES = 3  # newest boundary files kept (the rest deleted as the walk goes on)
CHUNK_TOKENS = 8192  # tokens per forward call (bounds the activations of one call)
HESSIAN_BYTES = 2 * 2**30  # Hessians held at once: a layer's experts are calibrated in chunks within it


@dataclass(frozen=True)
class GptqSettings:
    bits: int
    group_size: int | None
    dampening: float = 0.01
    act_order: bool = False
    all_experts: bool = False
    min_tokens: int = 16  # experts that saw fewer calibration tokens get RTN


@dataclass
class Calibrator:
    ck: Checkpoint
    det: Detection
    settings: GptqSettings
    codec: PackQuantizedCodec
    ids: torch.Tensor  # [samples, seq_len]
    wanted: dict[int, set[str]]  # layer -> targeted output weight names
    staging: Path | None = None
    device: str = "cpu"
    threads: int = 1
    allow_nonfinite: bool = False
    notes: list[str] = field(default_factory=list)  # the plan's: which weights fell back to RTN
    fallback: list[str] = field(default_factory=list)  # weights that got RTN, and why
    layers_run: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._model: FamilyModel | None = None
        self._next = -1  # the layer whose input states `_states` holds
        self._states: torch.Tensor | None = None
        # layer -> weight -> encoded parts, waiting for their op (kept for the layer before the
        # newest too: the executor's threads may still ask for them while the next layer runs)
        self._results: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def parts(self, layer: int, name: str) -> dict[str, torch.Tensor]:
        """The encoded parts of weight `name` of `layer` (runs the walk up to that layer)."""
        with self._lock:
            if name not in self._results.get(layer, {}):
                self._walk_to(layer)
            return self._results[layer].pop(name)

    @property
    def model(self) -> FamilyModel:
        if self._model is None:
            self._model = FamilyModel(self.ck, self.det, self.device)
        return self._model

    def _walk_to(self, layer: int) -> None:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the executor runs torch on one thread per worker
        try:
            if self._states is None or self._next > layer:
                self._next, self._states = self._restart(layer)
            for old in [L for L in self._results if L < layer - 1]:  # their units were skipped (kept)
                del self._results[old]
            while self._next <= layer:
                self._run(self._next)
        finally:
            torch.set_num_threads(before)

    def _restart(self, layer: int) -> tuple[int, torch.Tensor]:
        """The newest saved states at or before `layer`, else the embeddings of the samples."""
        saved = sorted(self._boundaries(), reverse=True)
        for b in saved:
            if b <= layer:
                self.notes.append(f"gptq: resumed from the hidden states saved before layer {b}")
                return b, torch.load(self._boundary_path(b), map_location=self.device, weights_only=True)
        return 0, self.model.embed(self.ids).float()

    def _run(self, layer: int) -> None:
        model, states = self.model, self._states
        assert states is not None
        module = model.load_layer(layer)
        wanted = self.wanted.get(layer, set())
        chunk = max(1, CHUNK_TOKENS // states.shape[1])
        before = len(self.fallback)
        quantized = {}  # name -> (slot, codes, scale): set into the module once every pass is done
        for experts in self._expert_chunks(module):
            hs = LayerHessians(
                module,
                self.det.naming.prefix(layer),
                self.det.family.per_expert,
                wanted,
                self.settings.all_experts,
                experts,
                linears=experts is None or experts.start == 0,
            )
            with hs.attached():
                for _ in model.forward(module, states, chunk):
                    pass
            for name in sorted(hs.covered):
                parts, codes, scale = self._quantize(name, hs)
                self._results.setdefault(layer, {})[name] = parts
                quantized[name] = (hs.slots[name], codes, scale)
            del hs
        for slot, codes, scale in quantized.values():  # the next layer sees the quantized weights
            slot.set(rtn_dequantize(codes, scale, None))
        if len(self.fallback) > before:
            fell = self.fallback[before:]
            shown = ", ".join(fell[:30]) + (f", ... ({len(fell) - 30} more)" if len(fell) > 30 else "")
            self.notes.append(
                f"gptq: layer {layer}: {len(fell)} weight(s) fell back to RTN (fewer than "
                f"{self.settings.min_tokens} calibration tokens, or no usable Hessian): {shown}"
            )
        out = torch.cat(list(model.forward(module, states, chunk)))  # the quantized layer's outputs
        model.unload(layer)
        del module, quantized
        _give_back_freed_memory()
        self._states, self._next = out, layer + 1
        self.layers_run.append(layer)
        self._save_boundary(layer + 1, out)

    def _expert_chunks(self, module) -> list[range | None]:
        """The experts calibrated per pass over the states, so that the Hessians held at once stay
        under HESSIAN_BYTES (gate/up H x H and down I x I per expert; with all-experts the gate/up
        one is shared); [None] for a dense layer."""
        experts, hidden, inter = expert_count(module)
        if not experts:
            return [None]
        shared = 4 * hidden * hidden if self.settings.all_experts else 0
        per_expert = 4 * inter * inter + (0 if self.settings.all_experts else 4 * hidden * hidden)
        size = max(1, min(experts, (HESSIAN_BYTES - shared) // per_expert))
        return [range(s, min(s + size, experts)) for s in range(0, experts, size)]

    def _quantize(self, name: str, hs: LayerHessians):
        """(encoded parts, codes, scale) of one weight: GPTQ with its Hessian, else RTN."""
        s, slot = self.settings, hs.slots[name]
        w = slot.get().float()
        if not self.allow_nonfinite:
            check_finite_weight(self.codec, w, [name], stacked=False)
        scale, _ = rtn_params(w, s.bits, s.group_size, True, self.codec.scale_dtype)
        h, tokens = hs.hessian_of(name)
        codes = None
        if h is not None and tokens >= s.min_tokens:
            codes = gptq_codes(w, h, scale, s.bits, s.dampening, s.act_order)
            if codes is None:
                self.fallback.append(f"{name} (Hessian not positive definite)")
        else:
            self.fallback.append(f"{name} ({tokens} calibration tokens)")
        if codes is None:
            codes = rtn_codes(w, s.bits, scale, None)
        packed = pack_int32(codes.to(torch.int32) + 2 ** (s.bits - 1), s.bits)
        n, k = w.shape
        parts = {p: t.cpu() for p, t in self.codec.assemble(n, k, packed, scale, None).items()}
        return parts, codes, scale

    def _boundary_path(self, b: int) -> Path:
        assert self.staging is not None
        return self.staging / STATES_DIR / f"layer-{b:05d}.pt"

    def _boundaries(self) -> list[int]:
        if self.staging is None or not (self.staging / STATES_DIR).is_dir():
            return []
        return [int(p.stem.split("-")[1]) for p in (self.staging / STATES_DIR).glob("layer-*.pt")]

    def _save_boundary(self, b: int, states: torch.Tensor) -> None:
        """Atomically (temporary name, rename); older boundaries beyond the newest few deleted."""
        if self.staging is None or not self.staging.is_dir() or b >= self.model.num_layers:
            return
        path = self._boundary_path(b)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(states.cpu(), tmp)
        tmp.replace(path)
        for old in sorted(self._boundaries())[:-KEEP_BOUNDARIES]:
            self._boundary_path(old).unlink(missing_ok=True)


def _give_back_freed_memory() -> None:
    """Return the heap pages freed by the layer to the OS (glibc `malloc_trim`). Without it glibc
    keeps a layer's temporaries (states, activations: a few MB each, under its dynamic mmap
    threshold) in a fragmented heap, and the peak RSS grows with the number of layers (measured,
    bench/RESULTS.md "GPTQ"); with it the peak stays one layer's whatever the depth."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
