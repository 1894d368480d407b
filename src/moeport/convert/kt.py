"""Recipe `--to kt-int4|kt-int8`: kt-kernel CPU expert weights (AMXINT4 / AMXINT8).

Every routed expert of every MoE layer is decoded from its stored format (any codec, per-expert or
transformers-fused layout) to float32, rounded to bf16 (kt quantizes from bf16), cut into T
tensor-parallel slices of the intermediate dim and quantized with `codecs.kt_amx` (byte-exact vs
kt-kernel). Output forms:

* merged: one safetensors shard per MoE layer, keys `blk.{L}.ffn_{gate|up|down}_exps.{E}.numa.{t}.
  {weight|scale}`; the other tensors copied unchanged into `model-base-*.safetensors`; the index
  `model.safetensors.index.json` (true total_size) is written last and marks completion.
* folders: kt's `--no-merge-safetensor` form, `_layer_{L}/_numa_{t}/*.kt`; `moeport-kt.json` is
  written last and marks completion (no .safetensors in DST: kt would switch to the merged loader).

Work is streamed one expert at a time (the float32 temporary is one expert; fused sources are read
one expert slice at a time). Each layer is written under a temporary name and renamed; a journal in
DST (see convert.journal) records the recipe and every finished step with the sha256 of its files,
so a re-run of the same command continues where the last one stopped and ends byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeport.codecs import kt_amx as K
from moeport.codecs.registry import codec_for
from moeport.convert.batching import items_per_batch
from moeport.convert.dequantize import active_parts, decode_stacked, decoded_shape
from moeport.convert.execute import BATCHED_PREFETCH_BYTES, copy_side_files
from moeport.convert.journal import Journal, recipe_diff
from moeport.detect.detection import Detection
from moeport.detect.layout import match_layout
from moeport.device import stack_to, to_device, to_host
from moeport.errors import MoeportError
from moeport.sinks.safetensors_file import PARTIAL_SUFFIX, PartialFile, TensorSpec, build_header
from moeport.sinks.sharded import INDEX_NAME, plan_shards, write_json_atomic
from moeport.sinks.write_behind import WriteBehind
from moeport.sources.checkpoint import Checkpoint
from moeport.sources.prefetch import DEFAULT_BUDGET, Prefetcher

TARGETS = {"kt-int4": 4, "kt-int8": 8}
KT_LAYOUTS = ("merged", "folders")
LAYOUT_VERSION = 1
JOURNAL_NAME = "moeport-kt-journal.json"
MANIFEST_NAME = "moeport-kt.json"
BASE_STEP = "base"
BASE_SHARD_BYTES = 5 * 10**9
_BASE_OVERHEAD = 600 * 2**20  # interpreter + torch + numba, for the memory estimate

ProgressFn = Callable[[str, int], None]  # (label, source bytes done in this step)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerSource:
    layer: int
    fused: bool
    # per-expert: (e, 'gate'|'up'|'down') -> {part: key}; fused: (-1, 'gate_up'|'down') -> {part: key}
    groups: dict[tuple[int, str], dict[str, str]]
    experts: int
    in_bytes: int


@dataclass
class KtPlan:
    ck: Checkpoint
    det: Detection
    to: str
    bits: int
    tp: int
    kt_layout: str
    hidden: int
    inter: int
    layers: list[LayerSource]
    base_shards: list[list[TensorSpec]]
    base_in_bytes: int
    recipe: dict[str, Any]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"  # where decode + quantize run (moeport.device); bytes are the same
    # experts decoded and quantized together: 0 = one at a time on the CPU, a batch on a GPU
    batch_experts: int = 0

    def experts_per_batch(self) -> int:
        if self.batch_experts:
            return self.batch_experts
        return 1 if self.device == "cpu" else items_per_batch(3 * self.inter * self.hidden)

    @property
    def method(self) -> str:
        return K.method_name(self.bits)

    def mats(self) -> list[tuple[str, int, int]]:
        """(proj, n, k) of one expert's TP slice."""
        part = self.inter // self.tp
        return [("gate", part, self.hidden), ("up", part, self.hidden), ("down", self.hidden, part)]

    def layer_specs(self, layer: LayerSource) -> list[TensorSpec]:
        specs = []
        for e in range(layer.experts):
            for t in range(self.tp):
                for proj, n, k in self.mats():
                    specs.append(
                        TensorSpec(
                            K.merged_key(layer.layer, proj, e, t, "weight"), "I8", (n * k * self.bits // 8,)
                        )
                    )
                    specs.append(TensorSpec(K.merged_key(layer.layer, proj, e, t, "scale"), "F32", (n,)))
        return specs

    def layer_out_bytes(self, layer: LayerSource) -> int:
        per_expert = sum(n * k * self.bits // 8 + 4 * n for _, n, k in self.mats()) * self.tp
        return per_expert * layer.experts

    def layer_file(self, layer: int) -> str:
        return f"model-kt-layer-{layer:05d}.safetensors" if self.kt_layout == "merged" else f"_layer_{layer}"

    def base_names(self) -> list[str]:
        n = len(self.base_shards)
        return [f"model-base-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def steps(self) -> list[str]:
        return ([BASE_STEP] if self.base_shards else []) + [f"layer.{s.layer}" for s in self.layers]

    def out_bytes(self, step: str) -> int:
        if step == BASE_STEP:
            return sum(s.nbytes for shard in self.base_shards for s in shard) + 4096 * len(self.base_shards)
        layer = self._layer(step)
        return self.layer_out_bytes(layer) + (64 * len(self.layer_specs(layer)) + 4096)

    def in_bytes(self, step: str) -> int:
        return self.base_in_bytes if step == BASE_STEP else self._layer(step).in_bytes

    def _layer(self, step: str) -> LayerSource:
        number = int(step.split(".", 1)[1])
        return next(s for s in self.layers if s.layer == number)

    def peak_estimate(self) -> int:
        """One expert decoded: float32 + bf16 + its slices + codes, tile images and scales."""
        elems = 3 * self.hidden * self.inter
        return _BASE_OVERHEAD + elems * (4 + 2 + 2 + 2 * self.bits // 8) + 16 * 2**20


def plan_kt(ck: Checkpoint, det: Detection, to: str, tp: int, kt_layout: str, src_label: str) -> KtPlan:
    """Check everything that can be checked from headers (layout, shapes, alignment) and plan."""
    if to not in TARGETS:
        raise MoeportError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    if kt_layout not in KT_LAYOUTS:
        raise MoeportError(f"--kt-layout {kt_layout}: expected one of {', '.join(KT_LAYOUTS)}")
    if tp < 1:
        raise MoeportError(f"--numa {tp}: expected a positive number of NUMA slices (kt's threadpool_count)")
    bits = TARGETS[to]
    layout = det.layout
    if layout.transposed or layout.gate_up_interleaved:
        raise MoeportError(
            f"{ck.root}: {det.family.title} experts (interleaved/transposed gate_up with biases) "
            "have no kt-kernel AMX equivalent"
        )
    match = match_layout(ck.keys(), layout, det.layer_prefix)
    if match is None:
        raise MoeportError(f"{ck.root}: no routed-expert tensors found")
    role_of = {proj: role for role, proj in layout.projs.items()}
    fmt = det.expert_format
    sources: list[LayerSource] = []
    converted: set[str] = set()
    shapes: dict[int, tuple[int, int]] = {}
    # MTP layers (DeepSeek's layer 61) carry routed experts too; kt's own converter includes them
    for number in sorted(set(det.moe_layers) | {L for L in det.mtp_layers if L in match.layers}):
        found = match.layers[number]
        groups: dict[tuple[int, str], dict[str, str]] = {}
        for (e, proj), group in found.parts.items():
            bias = sorted(p for p in group if "bias" in p)
            if bias:
                raise MoeportError(f"{group[bias[0]]}: kt-kernel AMX experts have no bias term")
            groups[(e, role_of[proj])] = active_parts(group)
        experts = det.experts_per_layer if layout.kind == "per-expert" else _fused_experts(ck, groups)
        src = LayerSource(
            number, layout.kind == "fused", groups, experts, sum(ck.info(k).nbytes for k in found.keys)
        )
        shapes[number] = _layer_shape(ck, src, fmt, det)
        sources.append(src)
        converted.update(found.keys)
    if not sources:
        raise MoeportError(f"{ck.root}: no MoE layers to convert")
    hidden, inter = shapes[sources[0].layer]
    for number, hi in shapes.items():
        if hi != (hidden, inter):
            raise MoeportError(
                f"{ck.root}: layer {number} experts are hidden {hi[0]} x intermediate {hi[1]}, layer "
                f"{sources[0].layer} {hidden} x {inter}; kt needs one size for all MoE layers"
            )
    if det.hidden_size is not None and det.hidden_size != hidden:
        raise MoeportError(
            f"{ck.root}: expert tensors have hidden size {hidden}, config.json says {det.hidden_size}"
        )
    K.check_alignment(hidden, inter, tp, bits, where=f"{ck.root} experts [I={inter}, H={hidden}]")

    others = [k for k in ck.keys() if k not in converted]
    base_specs = [TensorSpec(k, ck.info(k).dtype, ck.info(k).shape) for k in others]
    base_shards = plan_shards(base_specs, BASE_SHARD_BYTES) if (base_specs and kt_layout == "merged") else []
    recipe = {
        "to": to,
        "method": K.method_name(bits),
        "threadpool_count": tp,
        "kt_layout": kt_layout,
        "layout_version": LAYOUT_VERSION,
        "source": src_label,
        "source_family": det.family.name,
        "source_files": [[f.name, f.stat().st_size] for f in sorted(ck.files)],
    }
    metadata = {
        "format": "pt",
        "kt_method": K.method_name(bits),
        "kt_threadpool_count": str(tp),
        "kt_layout_version": str(LAYOUT_VERSION),
        "kt_hidden_size": str(hidden),
        "kt_intermediate_size": str(inter),
        "source": src_label,
        "source_family": det.family.name,
        "source_format": fmt.name,
    }
    plan = KtPlan(
        ck, det, to, bits, tp, kt_layout, hidden, inter, sources, base_shards,
        sum(s.nbytes for s in base_specs), recipe, metadata,
    )  # fmt: skip
    if base_specs and kt_layout == "folders":
        plan.notes.append(
            f"{len(base_specs)} non-expert tensors not copied: kt's folder form holds experts only"
        )
    return plan


def _fused_experts(ck: Checkpoint, groups: dict[tuple[int, str], dict[str, str]]) -> int:
    gate_up = groups.get((-1, "gate_up"))
    if not gate_up:
        raise MoeportError(f"{ck.root}: fused experts without a gate_up tensor")
    return ck.info(gate_up.get("weight") or next(iter(gate_up.values()))).shape[0]


def _layer_shape(ck: Checkpoint, src: LayerSource, fmt, det: Detection) -> tuple[int, int]:
    """(H, I) of a layer's experts from headers, with every projection's shape checked."""

    def shape(role: tuple[int, str]) -> tuple[int, ...]:
        group = src.groups.get(role)
        if group is None:
            raise MoeportError(f"{ck.root}: layer {src.layer} has no {role[1]} experts tensor")
        where = next(iter(group.values()))
        return decoded_shape(fmt, {p: ck.info(n).shape for p, n in group.items()}, where)

    if src.fused:
        gu, down = shape((-1, "gate_up")), shape((-1, "down"))
        gu_key = next(iter(src.groups[(-1, "gate_up")].values()))
        if len(gu) != 3 or len(down) != 3:
            raise MoeportError(f"{gu_key}: fused experts must be 3-D [E, 2I, H] / [E, H, I]")
        e, h, i = down
        if tuple(gu) != (e, 2 * i, h):
            raise MoeportError(
                f"{gu_key}: shape {list(gu)}, expected [E, 2I, H] = {[e, 2 * i, h]} (from down_proj "
                f"{list(down)}); gate rows first, then up"
            )
        return h, i
    i, h = shape((0, "gate"))
    for e in range(src.experts):
        for role, want in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            got = shape((e, role))
            if tuple(got) != want:
                key = next(iter(src.groups[(e, role)].values()))
                raise MoeportError(f"{key}: shape {list(got)}, expected {list(want)} (gate is {[i, h]})")
    return h, i


# --------------------------------------------------------------------------- reading experts


class _Reader:
    """Reads source tensors (read ahead on background threads, in the order given), or one expert
    slice of a stacked tensor (from a memory map)."""

    def __init__(self, ck: Checkpoint, ahead: list[str] | None = None, budget: int = DEFAULT_BUDGET):
        self.ck = ck
        self._handles: dict[Path, Any] = {}
        self._prefetch = Prefetcher(ck, ahead, budget) if ahead else None

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
        self.release()

    def read(self, key: str, expert: int | None = None) -> torch.Tensor:
        if expert is None:
            return self._prefetch.get(key) if self._prefetch is not None else self.ck.read(key)
        info = self.ck.info(key)
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt")
            except Exception as exc:  # the Rust reader raises its own exception types
                raise MoeportError(f"{info.file}: cannot open ({exc})") from None
            self._handles[info.file] = handle
        return handle.get_slice(key)[expert : expert + 1][0]

    def release(self) -> None:
        self._handles.clear()


def _read_parts(reader: _Reader, group: dict[str, str], expert: int | None, experts: int) -> dict:
    """The host tensors of one weight (expert `expert` of a stacked source, or a whole tensor)."""
    parts = {}
    for part, key in group.items():
        shape = reader.ck.info(key).shape
        stacked = expert is not None and len(shape) >= 2 and shape[0] == experts
        parts[part] = reader.read(key, expert if stacked else None)
    return parts


def _decode(
    reader: _Reader,
    codec,
    group: dict[str, str],
    expert: int | None,
    experts: int,
    where: str,
    device: str = "cpu",
):
    parts = {p: to_device(t, device) for p, t in _read_parts(reader, group, expert, experts).items()}
    w = parts.get("weight")
    if codec.name == "bf16" and w is not None and w.dtype == torch.bfloat16:
        return w  # decode (exact, to float32) then rounding to bf16 would give back these very values
    return codec.decode(parts, where).to(torch.bfloat16)


def _decode_stack(
    reader: _Reader,
    codec,
    groups: list[tuple[dict[str, str], int | None]],
    experts: int,
    where: list[str],
    device: str,
) -> torch.Tensor:
    """bf16 [B, n, k] on `device` of several same-shape weights: their parts stacked on the host,
    one copy each to the device, one decode (per weight for codecs that take no stack)."""
    reads = [_read_parts(reader, group, e, experts) for group, e in groups]
    stacked = {p: stack_to(device, [r[p] for r in reads]) for p in reads[0]}
    w = stacked.get("weight")
    if codec.name == "bf16" and w is not None and w.dtype == torch.bfloat16:
        return w
    return decode_stacked(codec, stacked, where).to(torch.bfloat16)


def expert_matrices(
    plan: KtPlan, reader: _Reader, src: LayerSource, e: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 gate [I, H], up [I, H], down [H, I] of expert e (decoded -> float32 -> bf16)."""
    codec = codec_for(plan.det.expert_format)
    where = f"layer {src.layer} expert {e}"
    if src.fused:
        gu = _decode(
            reader, codec, src.groups[(-1, "gate_up")], e, src.experts, f"{where} gate_up", plan.device
        )
        down = _decode(reader, codec, src.groups[(-1, "down")], e, src.experts, f"{where} down", plan.device)
        gate, up = _split_gate_up(plan, gu, where)
    else:
        gate, up, down = (
            _decode(reader, codec, src.groups[(e, role)], None, src.experts, f"{where} {role}", plan.device)
            for role in ("gate", "up", "down")
        )
    _check_matrices(plan, gate, up, down, where)
    return gate, up, down


def _split_gate_up(plan: KtPlan, gu: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    i, h = plan.inter, plan.hidden
    if tuple(gu.shape[-2:]) != (2 * i, h):
        raise MoeportError(f"{where}: gate_up decoded to {list(gu.shape[-2:])}, expected {[2 * i, h]}")
    return gu[..., :i, :], gu[..., i:, :]


def _check_matrices(plan: KtPlan, gate, up, down, where: str) -> None:
    i, h = plan.inter, plan.hidden
    for name, m, want in (("gate", gate, (i, h)), ("up", up, (i, h)), ("down", down, (h, i))):
        if tuple(m.shape[-2:]) != want:
            raise MoeportError(f"{where} {name}: decoded to {list(m.shape[-2:])}, expected {list(want)}")


def expert_outputs(plan: KtPlan, mats, layer: int, e: int):
    """(t, proj, n, k, weight image, scale) of one expert, in output order."""
    gate, up, down = mats
    where = f"blk.{layer} expert {e}"
    for t, slices in enumerate(K.tp_slices(gate, up, down, plan.tp, where)):
        for (proj, n, k), m in zip(plan.mats(), slices, strict=True):
            q, s = K.kt_quantize(m, plan.bits, where=f"{where} {proj} numa {t}")
            yield t, proj, n, k, q.cpu(), s.cpu()


def read_order(plan: KtPlan, src: LayerSource) -> list[str]:
    """Whole source tensors of a layer in the order `layer_outputs` reads them (for read-ahead;
    a stacked source is read one expert slice at a time instead)."""
    if src.fused:
        return []
    step = plan.experts_per_batch()
    names: list[str] = []
    for first in range(0, src.experts, step):
        chunk = range(first, min(first + step, src.experts))
        if step == 1:
            order = [(e, role) for e in chunk for role in ("gate", "up", "down")]
        else:
            order = [(e, role) for role in ("gate", "up", "down") for e in chunk]
        for key in order:
            names += src.groups[key].values()
    return names


def layer_outputs(plan: KtPlan, reader: _Reader, src: LayerSource):
    """(e, [(t, proj, n, k, image, scale), ...]) for each expert of a layer, in output order.

    On the CPU one expert at a time; on a GPU a chunk of experts at once (one transfer per part,
    one decode, one quantize per projection and slice, one copy back), as convert.batching does.
    """
    step = plan.experts_per_batch()
    if step == 1:
        for e in range(src.experts):
            yield e, list(expert_outputs(plan, expert_matrices(plan, reader, src, e), src.layer, e))
        return
    for first in range(0, src.experts, step):
        chunk = range(first, min(first + step, src.experts))
        gate, up, down = _chunk_matrices(plan, reader, src, chunk)
        s = plan.inter // plan.tp
        results = []
        for t in range(plan.tp):
            rows = slice(t * s, (t + 1) * s)
            slices = (gate[:, rows], up[:, rows], down[:, :, rows])
            for (proj, n, k), m in zip(plan.mats(), slices, strict=True):
                try:
                    images, scales = K.kt_quantize_many(m, plan.bits)
                except MoeportError:  # quantized one by one, so the error names the expert at fault
                    for i, e in enumerate(chunk):
                        K.kt_quantize(m[i], plan.bits, where=f"blk.{src.layer} expert {e} {proj} numa {t}")
                    raise
                results.append((t, proj, n, k, to_host(images), to_host(scales)))
        for i, e in enumerate(chunk):
            yield e, [(t, proj, n, k, q[i], sc[i]) for t, proj, n, k, q, sc in results]


def _chunk_matrices(plan: KtPlan, reader: _Reader, src: LayerSource, chunk: range):
    codec = codec_for(plan.det.expert_format)
    where = f"layer {src.layer} experts {chunk.start}-{chunk.stop - 1}"
    if src.fused:
        gu, down = (
            _decode_stack(
                reader,
                codec,
                [(src.groups[(-1, role)], e) for e in chunk],
                src.experts,
                [f"layer {src.layer} expert {e} {role}" for e in chunk],
                plan.device,
            )
            for role in ("gate_up", "down")
        )
        gate, up = _split_gate_up(plan, gu, where)
    else:
        gate, up, down = (
            _decode_stack(
                reader,
                codec,
                [(src.groups[(e, role)], None) for e in chunk],
                src.experts,
                [f"layer {src.layer} expert {e} {role}" for e in chunk],
                plan.device,
            )
            for role in ("gate", "up", "down")
        )
    _check_matrices(plan, gate, up, down, where)
    return gate, up, down


# --------------------------------------------------------------------------- writing


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class _SeqFile:
    """A PartialFile written front to back and hashed as written; close() publishes it.

    With `behind`, writing and hashing run on that background thread (in order)."""

    def __init__(self, path: Path, behind: WriteBehind | None = None):
        self.path = path
        self.sha = hashlib.sha256()
        self.size = 0
        self._file = PartialFile(path)
        self._behind = behind

    def write(self, data: memoryview) -> None:
        offset = self.size
        self.size += len(data)
        if self._behind is None:
            self._write_at(data, offset)
        else:
            self._behind.submit(len(data), self._write_at, data, offset)

    def _write_at(self, data: memoryview, offset: int) -> None:
        self._file.pwrite_all(data, offset)
        self.sha.update(data)

    def close(self, fsync: bool = True) -> str:
        if self._behind is not None:
            self._behind.drain()
        self._file.publish(fsync)
        return self.sha.hexdigest()

    def abort(self) -> None:
        if self._behind is not None:
            self._behind.abort()
        self._file.abort()


class _SeqSafetensors:
    """A safetensors file whose tensors arrive in planned order: written and hashed sequentially."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]):
        header, _ = build_header(specs, metadata)
        self._specs = specs
        self._next = 0
        self._behind = WriteBehind(name="moeport-kt-write")
        self.file = _SeqFile(path, self._behind)
        try:
            self.file.write(memoryview(header))
        except BaseException:
            self.file.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._specs[self._next] if self._next < len(self._specs) else None
        got = TensorSpec.of(name, tensor)
        if got != spec:
            raise ValueError(f"{self.file.path.name}: got {got}, planned {spec}")
        if tensor.numel():
            self.file.write(_bytes_of(tensor))
        self._next += 1

    def close(self) -> str:
        if self._next != len(self._specs):
            raise ValueError(
                f"{self.file.path.name}: {len(self._specs) - self._next} planned tensors missing"
            )
        try:
            return self.file.close()
        finally:
            self._behind.close()

    def abort(self) -> None:
        self.file.abort()


def _write_base(plan: KtPlan, out: Path, reader: _Reader, progress: ProgressFn) -> dict[str, Any]:
    files: dict[str, str] = {}
    for name, shard in zip(plan.base_names(), plan.base_shards, strict=True):
        w = _SeqSafetensors(out / name, shard, plan.metadata | {"kt_part": "non-expert tensors"})
        try:
            for spec in shard:
                t = reader.read(spec.name)
                w.write(spec.name, t)
                progress("non-expert tensors", spec.nbytes)
                del t
            files[name] = w.close()
        except BaseException:
            w.abort()
            raise
        reader.release()
    return {"files": files}


def _write_layer_merged(
    plan: KtPlan, src: LayerSource, out: Path, reader: _Reader, progress: ProgressFn
) -> dict[str, Any]:
    name = plan.layer_file(src.layer)
    w = _SeqSafetensors(out / name, plan.layer_specs(src), plan.metadata | {"kt_layer": str(src.layer)})
    per_expert = src.in_bytes // max(src.experts, 1)
    try:
        for e, outputs in layer_outputs(plan, reader, src):
            for t, proj, _n, _k, q, s in outputs:
                w.write(K.merged_key(src.layer, proj, e, t, "weight"), q)
                w.write(K.merged_key(src.layer, proj, e, t, "scale"), s)
            del outputs
            progress(f"layer {src.layer}", per_expert)
        digest = w.close()
    except BaseException:
        w.abort()
        raise
    return {"files": {name: digest}}


def _write_layer_folders(
    plan: KtPlan, src: LayerSource, out: Path, reader: _Reader, progress: ProgressFn
) -> dict[str, Any]:
    """`_layer_{L}.partial/_numa_{t}/*.kt`, then one rename to `_layer_{L}`."""
    final = out / plan.layer_file(src.layer)
    tmp = out / (final.name + PARTIAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    listing = hashlib.sha256()
    count = 0
    per_expert = src.in_bytes // max(src.experts, 1)
    try:
        for t in range(plan.tp):
            (tmp / f"_numa_{t}").mkdir(parents=True)
        for e, outputs in layer_outputs(plan, reader, src):
            for t, proj, n, k, q, s in outputs:
                for rel, data in zip(
                    K.folder_paths(src.layer, proj, e, t, n, k, plan.bits), (q, s), strict=True
                ):
                    rel = rel.split("/", 1)[1]  # inside _layer_{L}
                    f = _SeqFile(tmp / rel)
                    try:
                        f.write(_bytes_of(data))
                        digest = f.close(fsync=False)
                    except BaseException:
                        f.abort()
                        raise
                    listing.update(f"{rel} {digest}\n".encode())
                    count += 1
            del outputs
            progress(f"layer {src.layer}", per_expert)
        os.sync()  # one flush for the whole layer (an fsync per small file is much slower)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoeportError(f"{tmp}: {exc.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"files": count, "sha256_of_listing": listing.hexdigest()}


# --------------------------------------------------------------------------- run


@dataclass
class KtResult:
    out_dir: Path
    layers_done: int
    layers_skipped: int
    bytes_in: int
    seconds: float
    already_complete: bool = False


def _marker(plan: KtPlan, dst: Path) -> Path:
    return dst / (INDEX_NAME if plan.kt_layout == "merged" else MANIFEST_NAME)


def _existing_journal(plan: KtPlan, dst: Path, overwrite: bool) -> Journal | None:
    """The journal of DST when it continues this recipe; raises when DST cannot be used (no writes)."""
    if dst.exists() and not dst.is_dir():
        raise MoeportError(f"{dst}: exists and is not a folder")
    root, out = plan.ck.root.resolve(), dst.resolve()
    if root == out or out in root.parents:
        raise MoeportError(
            f"{dst}: is (or contains) the source checkpoint {plan.ck.root}; choose another DST"
        )
    if overwrite:  # start over (open_destination empties DST)
        return None
    old = Journal.load(dst / JOURNAL_NAME) if dst.exists() else None
    if old is not None and old.recipe != plan.recipe:
        raise MoeportError(
            f"{dst}: holds a kt conversion with a different recipe "
            f"({recipe_diff(old.recipe, plan.recipe)}); use another DST, or --overwrite to start over"
        )
    if old is None and dst.exists() and any(dst.iterdir()):
        raise MoeportError(f"{dst}: already exists and is not empty (use --overwrite to replace it)")
    return old


def is_complete(plan: KtPlan, dst: Path, journal: Journal | None) -> bool:
    return journal is not None and journal.complete and _marker(plan, dst).exists()


def open_destination(plan: KtPlan, dst: Path, overwrite: bool) -> Journal | None:
    """The journal to continue (new or resumed), or None when DST already holds this output."""
    old = _existing_journal(plan, dst, overwrite)
    if is_complete(plan, dst, old):
        return None
    if old is None and overwrite and dst.exists():
        shutil.rmtree(dst)
    if old is not None:
        _clean_partials(dst)
        _forget_missing(plan, dst, old)
        old.complete = False
        return old
    dst.mkdir(parents=True, exist_ok=True)
    journal = Journal(dst / JOURNAL_NAME, plan.recipe)
    journal.save()
    return journal


def _clean_partials(dst: Path) -> None:
    for p in dst.glob(f"*{PARTIAL_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _forget_missing(plan: KtPlan, dst: Path, journal: Journal) -> None:
    """Steps whose files are gone or have the wrong size are redone."""
    for step in list(journal.steps):
        ok = step in plan.steps()
        if ok and step == BASE_STEP:
            ok = all((dst / n).is_file() for n in plan.base_names())
        elif ok:
            layer = plan._layer(step)
            path = dst / plan.layer_file(layer.layer)
            if plan.kt_layout == "merged":
                ok = path.is_file() and path.stat().st_size == _merged_file_size(plan, layer)
            else:
                ok = path.is_dir() and sum(1 for _ in path.rglob("*.kt")) == journal.steps[step].get("files")
        if not ok:
            del journal.steps[step]


def _merged_file_size(plan: KtPlan, layer: LayerSource) -> int:
    header, _ = build_header(plan.layer_specs(layer), plan.metadata | {"kt_layer": str(layer.layer)})
    return len(header) + plan.layer_out_bytes(layer)


def _free_space(path: Path) -> tuple[int, Path]:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free, p


def preflight(plan: KtPlan, dst: Path, journal: Journal | None, max_memory: int | None) -> None:
    """Disk space for what remains, and the memory estimate against --max-memory."""
    todo = [s for s in plan.steps() if journal is None or journal.done(s) is None]
    need = sum(plan.out_bytes(s) for s in todo) + sum(
        f.stat().st_size for f in plan.ck.root.iterdir() if f.is_file() and f.suffix != ".safetensors"
    )
    free, where = _free_space(dst)
    if need > free:
        raise MoeportError(
            f"{dst}: not enough disk space: the output needs {need / 1e9:.2f} GB, {where} has "
            f"{free / 1e9:.2f} GB free"
        )
    if max_memory is not None and plan.peak_estimate() > max_memory:
        raise MoeportError(
            f"--max-memory {max_memory / 1e9:.2f} GB: converting one expert "
            f"[I={plan.inter}, H={plan.hidden}] needs about {plan.peak_estimate() / 1e9:.2f} GB"
        )


def prepare_kt(plan: KtPlan, dst: Path, overwrite: bool = False, max_memory: int | None = None):
    """Checks first (recipe, disk space, memory: nothing written when they fail), then DST's journal.

    Returns the journal to continue, or None when DST already holds this exact output.
    """
    old = _existing_journal(plan, dst, overwrite)
    if is_complete(plan, dst, old):
        return None
    preflight(plan, dst, old, max_memory)
    return open_destination(plan, dst, overwrite)


def convert_kt(
    plan: KtPlan,
    dst: Path,
    overwrite: bool = False,
    max_memory: int | None = None,
    progress: ProgressFn | None = None,
) -> KtResult:
    """Run (or continue) the conversion planned by `plan` into `dst`."""
    start = time.perf_counter()
    journal = prepare_kt(plan, dst, overwrite, max_memory)
    if journal is None:
        return KtResult(dst, 0, len(plan.layers), 0, time.perf_counter() - start, already_complete=True)
    return run_kt(plan, dst, journal, progress)


def run_kt(plan: KtPlan, dst: Path, journal: Journal, progress: ProgressFn | None = None) -> KtResult:
    """Every step the journal lacks, in order; then the completion marker (index or manifest)."""
    start = time.perf_counter()
    report = progress or (lambda _label, _n: None)
    ahead: list[str] = []
    for step in plan.steps():
        if journal.done(step) is None:
            if step == BASE_STEP:
                ahead += [spec.name for shard in plan.base_shards for spec in shard]
            else:
                ahead += read_order(plan, plan._layer(step))
    budget = DEFAULT_BUDGET if plan.experts_per_batch() == 1 else BATCHED_PREFETCH_BYTES
    reader = _Reader(plan.ck, ahead, budget)
    done = skipped = 0
    bytes_in = 0
    order = plan.steps()
    # The quantizer is a parallel numba kernel; torch's OpenMP workers spin-waiting between the small
    # per-expert ops would steal its cores (measured: 3x slower on 2 cores), so torch runs on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _copy_side(plan, dst)
        for step in order:
            if journal.done(step) is not None:
                skipped += step != BASE_STEP
                report(f"{step} (done)", plan.in_bytes(step))
                continue
            if step == BASE_STEP:
                info = _write_base(plan, dst, reader, report)
            else:
                layer = plan._layer(step)
                write = _write_layer_merged if plan.kt_layout == "merged" else _write_layer_folders
                info = write(plan, layer, dst, reader, report)
                done += 1
            reader.release()
            bytes_in += plan.in_bytes(step)
            journal.steps[step] = info
            journal.steps = {s: journal.steps[s] for s in order if s in journal.steps}
            journal.save()
        _write_marker(plan, dst)
        journal.finish()
    except OSError as exc:
        where = exc.filename or dst
        raise MoeportError(f"{where}: {exc.strerror or exc}") from None
    finally:
        torch.set_num_threads(threads)
        reader.close()
    return KtResult(dst, done, skipped, bytes_in, time.perf_counter() - start)


def _copy_side(plan: KtPlan, dst: Path) -> None:
    """config.json unchanged, tokenizer/generation config/custom code (written each run: idempotent)."""
    tmp = dst / f"side{PARTIAL_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        copy_side_files(plan.ck.root, tmp)
        cfg = plan.ck.root / "config.json"
        if cfg.is_file():
            shutil.copy2(cfg, tmp / "config.json")
        for f in sorted(tmp.iterdir()):
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(plan: KtPlan, dst: Path) -> None:
    if plan.kt_layout == "merged":
        weight_map: dict[str, str] = {}
        total = 0
        for name, shard in zip(plan.base_names(), plan.base_shards, strict=True):
            for s in shard:
                weight_map[s.name] = name
                total += s.nbytes
        for layer in plan.layers:
            name = plan.layer_file(layer.layer)
            for s in plan.layer_specs(layer):
                weight_map[s.name] = name
                total += s.nbytes
        doc = {"metadata": {"total_size": total, **plan.metadata}, "weight_map": weight_map}
        write_json_atomic(dst / INDEX_NAME, doc)
        return
    doc = {
        "recipe": plan.recipe,
        "metadata": plan.metadata,
        "layers": [s.layer for s in plan.layers],
        "experts_per_layer": plan.layers[0].experts,
    }
    write_json_atomic(dst / MANIFEST_NAME, doc)


def source_label(src: Path) -> str:
    return str(src.resolve())


def summary(plan: KtPlan) -> str:
    total_out = sum(plan.out_bytes(s) for s in plan.steps())
    return (
        f"{plan.det.family.title} ({plan.det.expert_format.name}, {plan.det.layout.kind}) -> {plan.method} "
        f"T={plan.tp} {plan.kt_layout}: {len(plan.layers)} MoE layers x {plan.layers[0].experts} experts, "
        f"H={plan.hidden} I={plan.inter}; about {total_out / 1e9:.3f} GB out"
    )


def describe(plan: KtPlan) -> str:
    return json.dumps(plan.recipe, indent=2)
