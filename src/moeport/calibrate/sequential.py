"""The layer walk: calibrate layer L from its input states, GPTQ its targeted weights, propagate
the QUANTIZED layer's outputs to L + 1.

Plan ops (recipes/gptq.py `GptqEncode`) ask `Calibrator.parts(layer, name)` for their encoded
parts; the first ask for a layer runs that layer (and any before it not yet run), under a lock,
so the executor's threads, read-ahead and journal work as for RTN. Memory: one decoder layer in
float32, the calibration states (samples x seq_len x hidden x 4 B, in and out; with `spill`, one
chunk of samples of each, the rest in a file), the layer's Hessians and the encoded parts of one
layer. The states at each layer boundary are saved in the staging folder (`gptq-states/`, the
last few kept), so a resumed run starts from the newest one at or before its first unfinished
layer instead of from the embeddings.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeport.calibrate import states as st
from moeport.calibrate.family import FamilyModel
from moeport.calibrate.heap import fixed_mmap_threshold, give_back_freed_memory
from moeport.calibrate.hessians import LayerHessians, expert_count
from moeport.calibrate.kernel import gptq_codes
from moeport.codecs.base import CodesCodec
from moeport.codecs.int_rtn import rtn_codes, rtn_dequantize
from moeport.convert.encode import check_finite_weight
from moeport.detect.detection import Detection
from moeport.sources.checkpoint import Checkpoint

STATES_DIR = "gptq-states"
KEEP_BOUNDARIES = 3  # newest boundary files kept (the rest deleted as the walk goes on)
CHUNK_TOKENS = 8192  # tokens per forward call (bounds the activations of one call)
HESSIAN_BYTES = 2 * 2**30  # Hessians held at once: a layer's experts are calibrated in chunks within it


@dataclass(frozen=True)
class GptqSettings:
    """The GPTQ run's choices; bits, groups and scales are the codec's (`CodesCodec`)."""

    dampening: float = 0.01
    act_order: bool = False
    all_experts: bool = False
    min_tokens: int = 16  # experts that saw fewer calibration tokens get RTN


@dataclass
class Calibrator:
    ck: Checkpoint
    det: Detection
    settings: GptqSettings
    codec: CodesCodec  # pack-quantized (w4a16/w8a16) or GPTQ (kt-gptq-int4)
    ids: torch.Tensor  # [samples, seq_len]
    wanted: dict[int, set[str]]  # layer -> targeted output weight names
    staging: Path | None = None
    device: str = "cpu"
    threads: int = 1
    allow_nonfinite: bool = False
    spill: bool = False  # states in a file of the staging folder, a chunk of samples in memory
    notes: list[str] = field(default_factory=list)  # the plan's: which weights fell back to RTN
    fallback: list[str] = field(default_factory=list)  # weights that got RTN, and why
    layers_run: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        fixed_mmap_threshold()  # from the plan on: the executor's work before the walk counts too
        self._lock = threading.Lock()
        self._model: FamilyModel | None = None
        self._next = -1  # the layer whose input states `_states` holds
        self._states: st.States | None = None
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

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.ids.shape, int(self.model.config.hidden_size))

    @property
    def chunk(self) -> int:
        """Samples per forward call (and per read of spilled states): bounds one call's activations."""
        return max(1, CHUNK_TOKENS // self.ids.shape[1])

    def _restart(self, layer: int) -> tuple[int, st.States]:
        """The newest saved states at or before `layer`, else the embeddings of the samples."""
        for b in sorted((b for b in self._boundaries() if b <= layer), reverse=True):
            states = st.load(self._boundary_path(b), self.shape, self.device, self.spill)
            if states is not None:
                self.notes.append(f"gptq: resumed from the hidden states saved before layer {b}")
                self._forget_after(b)
                return b, states
        self._forget_after(-1)
        table, ids = self.model.embedding(), self.ids.to(self.device)
        writer = self._writer(0)
        for i in range(0, ids.shape[0], self.chunk):
            writer.write(i, table[ids[i : i + self.chunk]])
        del table
        return 0, writer.finish()

    def _forget_after(self, b: int) -> None:
        """Boundaries past the restart point are rewritten as the walk reaches them (same bytes);
        removed now so that keeping the newest few never drops the one the walk is reading."""
        for later in self._boundaries():
            if later > b:
                self._boundary_path(later).unlink(missing_ok=True)

    def _writer(self, b: int) -> st.StatesWriter:
        """Where the states before layer `b` go: memory, or (spill) that boundary's file."""
        if not self.spill:
            return st.StatesWriter(self.shape, self.device)
        return st.StatesWriter(self.shape, self.device, self._boundary_path(b))

    def _run(self, layer: int) -> None:
        model, states = self.model, self._states
        assert states is not None
        module = model.load_layer(layer)
        wanted = self.wanted.get(layer, set())
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
                for _ in model.forward(module, states.chunks(self.chunk)):
                    pass
            for name in sorted(hs.covered):
                parts, codes, scale = self._quantize(name, hs)
                self._results.setdefault(layer, {})[name] = parts
                quantized[name] = (hs.slots[name], codes, scale)
            hs.release()
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
        out = None
        if layer + 1 < model.num_layers:  # the last layer's outputs reach no calibrated layer
            out = self._propagate(module, states, layer + 1)
        model.unload(layer)
        del module, quantized, states
        self._states, self._next = out, layer + 1  # the input states are freed here
        give_back_freed_memory()
        self.layers_run.append(layer)

    def _propagate(self, module, states: st.States, b: int) -> st.States:
        """The quantized layer's outputs: the states before layer `b`, saved as its boundary."""
        writer, start = self._writer(b), 0
        try:
            for y in self.model.forward(module, states.chunks(self.chunk)):
                writer.write(start, y)
                start += y.shape[0]
        except BaseException:
            writer.abandon()
            raise
        out = writer.finish()
        if not self.spill and self._staging_ready():
            st.save(out.tensor, self._boundary_path(b))  # type: ignore[attr-defined]
        for old in sorted(self._boundaries())[:-KEEP_BOUNDARIES]:
            self._boundary_path(old).unlink(missing_ok=True)
        return out

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
        scale, bits = self.codec.code_scale(w), self.codec.bits  # the format's own min-max rule
        h, tokens = hs.hessian_of(name)
        codes = None
        if h is not None and tokens >= s.min_tokens:
            codes = gptq_codes(w, h, scale, bits, s.dampening, s.act_order)
            if codes is None:
                self.fallback.append(f"{name} (Hessian not positive definite)")
        else:
            self.fallback.append(f"{name} ({tokens} calibration tokens)")
        if codes is None:
            codes = rtn_codes(w, bits, scale, None)
        parts = {p: t.cpu() for p, t in self.codec.from_codes(codes, scale).items()}
        return parts, codes, scale

    def _boundary_path(self, b: int) -> Path:
        return self._states_dir() / f"layer-{b:05d}{st.SUFFIX}"

    def _states_dir(self) -> Path:
        if self.staging is None:  # not run by the executor (no staging folder): a private one
            self.staging = Path(tempfile.mkdtemp(prefix="moeport-gptq-"))
        return self.staging / STATES_DIR

    def _staging_ready(self) -> bool:
        return self.staging is not None and self.staging.is_dir()

    def _boundaries(self) -> list[int]:
        if self.staging is None or not (self.staging / STATES_DIR).is_dir():
            return []
        return [int(p.stem.split("-")[1]) for p in (self.staging / STATES_DIR).glob(f"layer-*{st.SUFFIX}")]
