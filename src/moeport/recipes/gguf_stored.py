"""Weights `--to gguf` takes as the source stores them: the same numbers, no dequantize/requantize.

Two cases: routed experts in MXFP4 (compressed-tensors `mxfp4-pack-quantized`, GPT-OSS
`_blocks`/`_scales`, DeepSeek-V4) into `--gguf-type mxfp4`, their E2M1 codes and E8M0 scales
re-packed into GGML's MXFP4 blocks (codecs.ggml.GgmlMxfp4Codec); and a GGUF source's block-quantized
tensors already of the GGML type this target gives them (Q8_0 -> q8_0, MXFP4 -> mxfp4...), their rows
copied byte for byte. Both are `Recode` ops (convert/encode.py), lossless and invertible, in the
plan like any other op. Float tensors need no such care: BF16/F16 -> float32 -> BF16/F16 is exact.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from moeport.codecs.base import Codec
from moeport.codecs.ggml import MARKER, GgmlCodec, GgmlMxfp4Codec, block_geometry, quant_type
from moeport.convert.dequantize import Decode
from moeport.convert.encode import Recode, recode_specs
from moeport.convert.plan import Plan, Unit
from moeport.detect.detection import Detection
from moeport.dtypes import torch_dtype_of
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Copy
from moeport.recipes.fused import same_kind_source
from moeport.recipes.gpu import expert_regex
from moeport.sinks.safetensors_file import TensorSpec
from moeport.sources.checkpoint import Checkpoint
from moeport.zoo.gguf_arch import GgufArch

_KEEP_F32 = ("ffn_gate_inp", "exp_probs_b")  # llama.cpp's converter keeps routers in F32
_EXPERT_TYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "mxfp4": "MXFP4"}  # what --gguf-type gives experts


def tensor_type(name: str, shape: tuple[int, ...], stacked: bool, gguf_type: str) -> Any:
    """The GGML type llama.cpp's converter (or llama-quantize, for mxfp4) gives this tensor."""
    if len(shape) - stacked <= 1 or any(k in name for k in _KEEP_F32):
        return quant_type("F32")
    if gguf_type in ("bf16", "f16"):
        return quant_type(gguf_type)
    wanted = gguf_type if gguf_type != "mxfp4" or stacked else "q8_0"
    qtype = quant_type(wanted)
    return qtype if shape[-1] % block_geometry(qtype)[0] == 0 else quant_type("F16")


def stored_experts(ck: Checkpoint, det: Detection, gguf_type: str) -> Codec | None:
    """The codec of the source's routed experts when all of them go in as stored, else None."""
    if det.expert_format.name == "gguf":
        want = _EXPERT_TYPE.get(gguf_type)
        layers = det.naming.expert_layers(ck.keys(), det.layout)
        markers = [k for le in layers.values() for k in le.keys if k.endswith(f".{MARKER}")]
        types = {int(ck.read(k).reshape(-1)[0]) for k in markers}
        return GgmlCodec() if want and types == {int(quant_type(want))} else None
    if gguf_type == "mxfp4":
        return same_kind_source(GgmlMxfp4Codec(), det, ())
    return None


class Stored:
    """Which outputs of the hf plan are parts of a weight kept as stored, and the ops moving them."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, str]] = {}  # weight -> codec part -> output name
        self.codec: dict[str, Codec] = {}
        self.part_of: dict[str, str] = {}  # output name -> its weight

    def add(self, weight: str, parts: dict[str, str], codec: Codec) -> None:
        self.parts.setdefault(weight, {}).update(parts)
        self.codec[weight] = codec
        self.part_of.update({n: weight for n in parts.values()})

    def experts(self, plan: Plan, det: Detection, codec: Codec) -> None:
        """Routed experts the hf plan kept in their stored format (`keep_experts`); biases are floats."""
        expert_part = expert_regex(det, part=r"\w+")
        for unit in plan.units:
            for out in unit.op.outputs:
                prefix, _, part = out.rpartition(".")
                if part == "bias" or not expert_part.match(out):
                    continue
                if f"_{part}" in codec.required:  # per-expert names drop the '_' of `_blocks`
                    part = f"_{part}"
                self.add(f"{prefix}.weight", {part: out}, codec)

    def gguf_units(self, plan: Plan, ck: Checkpoint, arch: GgufArch, gguf_type: str) -> Plan:
        """A GGUF source's non-expert block-quantized weights already of their target type: the hf
        plan decodes them; they are read as stored instead."""
        units, copied = [], 0
        for unit in plan.units:
            op = unit.op
            if isinstance(op, Decode) and op.fmt.name == "gguf":
                parts = dict(op.parts)
                stored = quant_type(int(ck.read(parts[MARKER]).reshape(-1)[0]))
                name, _ = arch.gguf_name(op.target)
                if tensor_type(name, op.shape, False, gguf_type) == stored:
                    self.add(op.target, parts, GgmlCodec())
                    unit = Unit(unit.layer, Chain(tuple(Copy(n, n) for n in parts.values())))
                    copied += 1
            units.append(unit)
        notes = []
        for note in plan.notes:  # hf's count of dequantized weights, less the ones now copied
            m = re.match(r"dequantized (\d+) weight\(s\)", note)
            if m and copied:
                left = int(m[1]) - copied
                note = f"dequantized {left} weight(s)" if left else ""
            notes += [note] if note else []
        return Plan(units, plan.config, notes=notes)

    def shape(self, weight: str, spec: dict[str, TensorSpec]) -> tuple[int, ...]:
        """The weight's logical (decoded) shape, from its parts' specs."""
        parts = self.parts[weight]
        if isinstance(self.codec[weight], GgmlCodec):
            block, size = spec[parts[MARKER]].shape
            *rows, row_bytes = spec[parts["weight"]].shape
            return (*rows, row_bytes // size * block)
        packed, _, _ = self.codec[weight].split(_meta(parts, spec))  # type: ignore[attr-defined]
        return (*packed.shape[:-1], packed.shape[-1] * 2)

    def move(self, weight: str, dst: str, qtype: Any, spec: dict[str, TensorSpec], rope: Any) -> list:
        """Ops giving GGUF piece `dst` (rows of `qtype`) from the stored parts; `rope(src, out)` is
        the q/k row permutation op or None."""
        codec, parts = self.codec[weight], dict(self.parts[weight])
        if isinstance(codec, GgmlCodec):
            target: Codec = GgmlCodec(qtype)
        elif qtype.name == "MXFP4":
            target = GgmlMxfp4Codec()
        else:
            raise MoeportError(f"{weight}: stored as {codec.name}, cannot be copied as GGML {qtype.name}")
        shapes = {p: (spec[n].shape, torch_dtype_of(spec[n].dtype)) for p, n in parts.items()}
        ops = []
        permuted = (
            rope(parts["weight"], f"{weight.removesuffix('.weight')}#rope.weight")
            if "weight" in parts
            else None
        )
        if permuted is not None:  # rows of blocks permute as the float rows would
            ops.append(permuted)
            parts["weight"] = permuted.target
        specs = recode_specs(codec, target, shapes)
        return [*ops, Recode(tuple(parts.items()), dst.removesuffix("weight"), codec, target, specs)]


def _meta(parts: dict[str, str], spec: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    return {
        p: torch.empty(spec[n].shape, dtype=torch_dtype_of(spec[n].dtype), device="meta")
        for p, n in parts.items()
    }
