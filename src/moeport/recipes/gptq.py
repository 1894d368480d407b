"""`--to w4a16|w8a16|kt-gptq-int4 --method gptq --calibration FILE`: the RTN recipe's plan, with
every targeted decoder-layer weight encoded by GPTQ instead of round-to-nearest.

Same output format as RTN (compressed-tensors pack-quantized, or kt-gptq-int4's AutoGPTQ v1 storage;
the codec's own min-max scales, same names and shapes); only the codes differ, and
`quantization_config` records the GPTQ settings. The plan is
recipes/gpu.py's: its `Encode` ops of decoder-layer weights become `GptqEncode`, whose parts come
from the layer walk (calibrate/sequential.py). MTP layers, which calibration never reaches, keep
RTN. The sink is the HF one with shards cut at layer boundaries, so the journal resumes per layer.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeport.calibrate.sequential import HESSIAN_BYTES, STATES_DIR, Calibrator, GptqSettings
from moeport.calibrate.tokens import file_digest, load_samples
from moeport.convert.encode import Encode
from moeport.convert.plan import Plan, Unit
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Op
from moeport.mappings.values import Lazy, Value, is_meta
from moeport.parallel import available_cores, once
from moeport.recipes.base import Options, Target
from moeport.recipes.gpu import plan_gpu, recipe_of
from moeport.sinks.pieces import Piece
from moeport.sinks.sharded import HfSink, plan_shards, shard_names
from moeport.sources.checkpoint import Checkpoint

METHODS = ("rtn", "gptq")
GPTQ_OPTIONS = ("calibration", "samples", "seq_len", "dampening", "act_order", "all_experts", "spill_states")
# States in and out held in memory up to this; past it (or with --spill-states) they go to a file
SPILL_BYTES = 2 * 2**30
# One forward call's activations, in copies of its hidden states (residual, norms, attention, the
# experts' inputs and the Hessian hook's act(gate) * up): measured 10-13 on bench/gptq.py's models
ACTIVATION_COPIES = 14


@dataclass(frozen=True)
class GptqEncode(Encode):
    """Encode whose parts are GPTQ's for this weight, given its layer's Hessian (from the walk)."""

    calib: Any = None  # the Calibrator
    layer: int = 0

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        if is_meta(values[self.source]):  # planning: shapes and dtypes as RTN's
            return super().apply(values)
        encoded = once(lambda: self.calib.parts(self.layer, self.source))
        return {
            self.base + part: Lazy(shape, dtype, False, produce=lambda p=part: encoded()[p])
            for part, dtype, shape in self.part_specs
        }


@dataclass(frozen=True)
class FromCalibration(Op):
    """A unit whose every output comes from GptqEncode: its source tensors are never read by the
    plan (the layer walk reads them to build the layer), so they are not read ahead either."""

    op: Op

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.op.inputs

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.op.outputs

    @property
    def sliced_inputs(self) -> tuple[str, ...]:
        return self.op.inputs

    def apply(self, values: dict[str, Value]) -> dict[str, Value]:
        return self.op.apply(values)

    def inverse(self) -> Op:
        return self.op.inverse()


@dataclass
class GptqPlan(Plan):
    calibration_bytes: int = 0  # one float32 layer + the states + the layer's Hessians

    def peak_estimate(self, ck: Checkpoint) -> int:
        return super().peak_estimate(ck) + self.calibration_bytes


@dataclass
class GptqSink(HfSink):
    """HF shards cut by size and at every layer boundary (a piece = a layer or part of one, so the
    journal resumes per layer); the calibration states are removed before the output is whole."""

    layer_of: dict[str, int | None] = dataclasses.field(default_factory=dict)

    def pieces(self, specs) -> list[Piece]:
        groups: list[list] = []
        for spec in specs:
            layer = self.layer_of.get(spec.name)
            if not groups or self.layer_of.get(groups[-1][-1].name) != layer:
                groups.append([])
            groups[-1].append(spec)
        shards = [s for g in groups for s in plan_shards(g, self.max_shard_bytes)]
        meta = {"format": "pt", **self.metadata}
        return [Piece(n, tuple(s), meta) for n, s in zip(shard_names(len(shards)), shards, strict=True)]

    def finish(self, out_dir: Path, pieces: list[Piece]) -> None:
        shutil.rmtree(out_dir / STATES_DIR, ignore_errors=True)
        super().finish(out_dir, pieces)


def build_gptq(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str], recipe: Any):
    """The GPTQ plan of a GPU recipe (recipes/gpu.py's plan_gpu contract) whose codec takes codes
    (codecs/base.py `CodesCodec`): pack-quantized for w4a16/w8a16, GPTQ for kt-gptq-int4."""
    if det.family.generic:  # calibration runs transformers' own decoder layers
        raise MoeportError(
            f"--method gptq: {ck.root}: {det.family.generic}; quantize with RTN (leave out --method)"
        )
    scheme = recipe.scheme
    settings = _settings(opts)
    # the depth under the family's own config name (LongCat-Flash: `num_layers`, DBRX: `n_layers`);
    # `num_hidden_layers` alone found none there, and every layer silently kept RTN
    layers = det.num_layers if det.num_layers is not None else _num_layers(ck)
    vocab = int(_text_config(ck).get("vocab_size", 0)) or 2**62
    ids = load_samples(Path(opts.calibration), ck.root, opts.samples, opts.seq_len, vocab)
    base = plan_gpu(ck, det, recipe, opts.device)
    wanted: dict[int, set[str]] = {}
    for unit in base.units:
        if unit.layer is not None and unit.layer < layers:
            for op in _ops(unit.op):
                if isinstance(op, Encode):
                    wanted.setdefault(unit.layer, set()).add(op.source)
    staging = Path(opts.staging) if opts.staging else None
    hidden = int(_text_config(ck).get("hidden_size", 0))
    states_bytes = 2 * ids.numel() * hidden * 4  # in and out, float32
    spill = opts.spill_states if opts.spill_states is not None else states_bytes > SPILL_BYTES
    calib = Calibrator(
        ck, det, settings, recipe.codec(), ids, wanted, staging, opts.device,
        threads=available_cores(), allow_nonfinite=opts.allow_nonfinite, spill=spill, notes=base.notes,
    )  # fmt: skip
    _ = calib.model  # transformers' classes for the family, on meta: a refusal comes before any work
    units = [Unit(u.layer, _unread(_swap(u.op, calib, u.layer, layers))) for u in base.units]
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(Plan)}
    plan = GptqPlan(**{**fields, "units": units}, calibration_bytes=_bound(ck, det, calib))
    if plan.config is not None:
        plan.config["quantization_config"] = _record(plan.config["quantization_config"], opts, ids)
    n = sum(len(v) for v in wanted.values())
    plan.notes.append(
        f"gptq: {n} weights of {len(wanted)} layers calibrated on {ids.shape[0]} x {ids.shape[1]} tokens "
        f"(dampening {settings.dampening}, act-order {'on' if settings.act_order else 'off'}, "
        f"{'every token to every expert' if settings.all_experts else 'routed tokens per expert'}); "
        f"memory bound: the RTN bound + {plan.calibration_bytes / 2**20:.1f} MiB (one float32 layer, "
        "the states in and out, the layer's Hessians, one forward call's activations)"
    )
    where = "in memory" if not spill else (
        f"spilled to {STATES_DIR}/ in the staging folder (up to 3 x {states_bytes / 2**21:.1f} MiB on disk), "
        f"read {calib.chunk} samples at a time"
    )  # fmt: skip
    plan.notes.append(f"gptq: calibration states ({states_bytes / 2**20:.1f} MiB in and out) {where}")
    plan.title = f"{det.family.title}: {det.expert_format.name} -> {scheme} GPTQ ({opts.targets})"
    return plan, GptqSink(opts.max_shard_bytes, metadata, layer_of=plan.layer_of_output)


def _ops(op: Op) -> list[Op]:
    return [o for sub in op.ops for o in _ops(sub)] if isinstance(op, Chain) else [op]


def _swap(op: Op, calib: Calibrator, layer: int | None, layers: int) -> Op:
    if isinstance(op, Chain):
        return Chain(tuple(_swap(o, calib, layer, layers) for o in op.ops))
    if isinstance(op, Encode) and layer is not None and layer < layers:
        fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(Encode)}
        return GptqEncode(**fields, calib=calib, layer=layer)
    return op


def _unread(op: Op) -> Op:
    encodes = [o for o in _ops(op) if isinstance(o, GptqEncode)]
    by_gptq = {n for o in encodes for n in o.outputs}
    return FromCalibration(op) if encodes and set(op.outputs) <= by_gptq else op


def _text_config(ck: Checkpoint) -> dict[str, Any]:
    cfg = ck.config or {}
    return cfg.get("text_config") or cfg


def _num_layers(ck: Checkpoint) -> int:
    return int(_text_config(ck).get("num_hidden_layers", 0))


def _settings(opts: Options) -> GptqSettings:
    if not opts.calibration:
        raise MoeportError("--method gptq needs --calibration FILE (token ids or text)")
    if opts.samples < 1 or opts.seq_len < 1:
        raise MoeportError(f"--samples {opts.samples} --seq-len {opts.seq_len}: expected positive numbers")
    if not 0 <= opts.dampening < 10:
        raise MoeportError(f"--dampening {opts.dampening}: expected a fraction of mean(diag H), e.g. 0.01")
    return GptqSettings(opts.dampening, opts.act_order, opts.all_experts)


def _bound(ck: Checkpoint, det: Detection, calib: Calibrator) -> int:
    """Bytes the walk holds besides the RTN plan's: one layer in float32, the states in and out
    (spilled: one forward call's tokens of each), the Hessians of one layer (K x K float32 each;
    gate/up share one, all-experts one per layer; at most HESSIAN_BYTES + a shared one, as experts
    are calibrated in chunks) and one forward call's activations."""
    text = _text_config(ck)
    hidden = int(text.get("hidden_size", 0))
    ids, settings = calib.ids, calib.settings
    call = min(ids.shape[0], calib.chunk) * ids.shape[1]  # tokens per forward call
    states = 2 * (ids.numel() if not calib.spill else call) * hidden * 4
    activations = ACTIVATION_COPIES * call * hidden * 4
    per_layer: dict[int, int] = {}
    for key in ck.keys():
        layer = det.naming.layer_of(key)
        if layer is not None:
            info = ck.info(key)
            numel = 1
            for d in info.shape:
                numel *= d
            per_layer[layer] = per_layer.get(layer, 0) + 4 * numel
    experts = int(
        text.get("n_routed_experts") or text.get("num_experts") or text.get("num_local_experts") or 0
    )
    inter = int(text.get("moe_intermediate_size") or text.get("intermediate_size") or 0)
    gate_up = (1 if settings.all_experts else experts) * hidden * hidden
    hessians = min(4 * (gate_up + experts * inter * inter), HESSIAN_BYTES + 4 * hidden * hidden)
    return max(per_layer.values(), default=0) + states + hessians + activations


def _record(quant: dict[str, Any], opts: Options, ids) -> dict[str, Any]:
    """quantization_config as RTN's, with the GPTQ settings: compressed-tensors' `actorder` says
    static order (groups on the original columns, no g_idx), `gptq` the rest (ignored by loaders);
    a GPTQModel config (kt-gptq-int4) also gets its own `damp_percent` field."""
    quant = dict(quant)
    if quant.get("quant_method") == "gptq":
        quant["damp_percent"] = opts.dampening
    if opts.act_order:
        for group in quant.get("config_groups", {}).values():
            group["weights"]["actorder"] = "static"
    quant["gptq"] = {
        "method": "gptq",
        "block_size": 128,
        "dampening_frac": opts.dampening,
        "act_order": opts.act_order,
        "all_experts": opts.all_experts,
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "calibration": Path(opts.calibration).name,
    }
    return quant


def with_method(
    target: Target,
    recipe_for: Callable[[Options], Any] | None = None,
    method_field: str = "method",
    act_order: str = "",
) -> Target:
    """`target` taking --method rtn|gptq and the GPTQ options. `recipe_for`: the GPU recipe of the
    user's options (default: recipes/gpu.py's for the target's scheme); `method_field`: the recorded
    recipe's key for the method (kt-kernel targets record their kt method under "method");
    `act_order`: why --act-order is refused ("" if taken)."""
    scheme = target.name
    recipe_of_opts = recipe_for or (lambda opts: recipe_of(scheme, opts))

    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        if opts.method not in METHODS:
            raise MoeportError(f"--method {opts.method}: expected one of {', '.join(METHODS)}")
        if opts.method == "gptq":
            if opts.act_order and act_order:
                raise MoeportError(f"--act-order: not with --to {scheme} ({act_order})")
            return build_gptq(ck, det, opts, metadata, recipe_of_opts(opts))
        if opts.calibration:
            raise MoeportError("--calibration: only with --method gptq (RTN takes no calibration data)")
        if opts.spill_states is not None:
            raise MoeportError("--spill-states: only with --method gptq (RTN keeps no calibration states)")
        return target.build(ck, det, opts, metadata)

    def fields(opts: Options) -> dict[str, object]:
        out = target.fields(opts)
        if opts.method != "gptq":
            return out
        path = Path(opts.calibration)
        calibration = {"name": path.name, "sha256": file_digest(path)} if path.is_file() else str(path)
        return out | {
            method_field: "gptq", "calibration": calibration, "samples": opts.samples,
            "seq_len": opts.seq_len, "dampening": opts.dampening, "act_order": opts.act_order,
            "all_experts": opts.all_experts,
        }  # fmt: skip

    takes = target.takes | {"method", *GPTQ_OPTIONS}
    return dataclasses.replace(target, build=build, fields=fields, takes=frozenset(takes))
