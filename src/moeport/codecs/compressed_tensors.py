"""compressed-tensors checkpoints as vLLM/SGLang load them: `pack-quantized` int weights (W4A16/W8A16)
and `float-quantized` FP8.

pack-quantized: `weight_packed` I32 [N, ceil(K*b/32)] holding q + 2^(b-1) densely LSB-first along K,
`weight_scale` [N, G] (G = 1 for channel), asymmetric adds `weight_zero_point` I32
[ceil(N*b/32), G] (signed zero + 2^(b-1), packed along N), and `weight_shape` I64 [2] = [N, K].
Quantization math: int_rtn (compressed-tensors conventions). Scale dtype = the source dtype.

nvfp4-pack-quantized: `weight_packed` U8 [N, K/2] (E2M1 pairs, element 2j low), `weight_scale` E4M3
[N, K/16], `weight_global_scale` F32 [1]; W = code * (weight_scale / weight_global_scale), so the
global scale is the reciprocal of ModelOpt's `weight_scale_2`. mxfp4-pack-quantized: `weight_packed`
as above, `weight_scale` U8 [N, K/32] (E8M0 biased exponents). Quantization math: codecs.fp4 (the
compressed-tensors / llmcompressor RTN conventions).

Formats: a `weight_packed` group is ct-pack-quantized (I32), or ct-nvfp4 / ct-mxfp4 (U8).
compressed-tensors FP8 (`float-quantized`) is an fp8 format (codecs.fp8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs import cpu_kernels, rtn_kernels
from moeport.codecs.base import Parts, check_dtype, check_finite, check_shape, need
from moeport.codecs.format import SHAPE, ExpertFormat, Params, Part, RowRule, Shape, StorageFormat
from moeport.codecs.fp4 import Canonical, mx_decode, mx_encode, nvfp4_decode, nvfp4_encode, reciprocal
from moeport.codecs.fp8 import Fp8ScaledCodec
from moeport.codecs.int_rtn import group_size_of, rtn_codes, rtn_dequantize, rtn_params
from moeport.codecs.packing import pack_int32, unpack_int32
from moeport.errors import MoeportError


@dataclass(frozen=True)
class PackQuantizedCodec:
    bits: int = 4
    group_size: int | None = 128  # None = per channel
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16
    name: str = "ct-pack-quantized"
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = True

    @property
    def required(self) -> tuple[str, ...]:
        base = ("weight_packed", "weight_scale", "weight_shape")
        return base if self.symmetric else (*base, "weight_zero_point")

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        packed, scale, shape = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
        check_dtype(packed, (torch.int32,), where, "weight_packed")
        if shape.numel() != 2:
            raise MoeportError(f"{where}.weight_shape: expected [N, K], got {shape.tolist()}")
        n, k = (int(v) for v in shape.tolist())
        check_shape(packed, (n, -(-k * self.bits // 32)), where, "weight_packed")
        groups = scale.shape[-1]
        check_shape(scale, (n, groups), where, "weight_scale")
        offset = 2 ** (self.bits - 1)
        codes = unpack_int32(packed, self.bits, k) - offset
        zero = None
        if not self.symmetric:
            zp = parts["weight_zero_point"]
            check_shape(zp, (-(-n * self.bits // 32), groups), where, "weight_zero_point")
            zero = unpack_int32(zp, self.bits, n, dim=0) - offset
        check_finite(scale, where, "weight_scale")
        return rtn_dequantize(codes, scale, zero)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """[N, K] -> parts; [B, N, K] (a batch of same-shape weights) -> the parts stacked."""
        n, k = weight.shape[-2:]
        offset = 2 ** (self.bits - 1)
        group = group_size_of(k, self.group_size)
        if rtn_kernels.bf16_to_int_supported(weight, self.bits, group, self.scale_dtype):
            fused = rtn_kernels.bf16_to_int(weight, self.bits, group, self.symmetric, self.scale_dtype)
            if fused is not None:  # one pass, no float32 copy of the weight (same bytes)
                return self.assemble(n, k, *fused)
        scale, zero = rtn_params(weight, self.bits, self.group_size, self.symmetric, self.scale_dtype)
        if cpu_kernels.quantize_pack_supported(weight, self.bits, group):
            packed = cpu_kernels.quantize_pack(weight, scale, zero, self.bits, group)
        else:
            packed = pack_int32(rtn_codes(weight, self.bits, scale, zero).to(torch.int32) + offset, self.bits)
        return self.assemble(n, k, packed, scale, zero)

    def code_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-group scales [N, G] (scale_dtype) of `weight` [N, K] as `encode` chooses them."""
        if not self.symmetric:
            raise MoeportError("GPTQ codes are written to symmetric pack-quantized storage only")
        return rtn_params(weight, self.bits, self.group_size, True, self.scale_dtype)[0]

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of signed codes [N, K] (-2^(b-1)..2^(b-1)-1) with `scale` [N, G], zero point 0."""
        n, k = codes.shape
        packed = pack_int32(codes.to(torch.int32) + 2 ** (self.bits - 1), self.bits)
        return self.assemble(n, k, packed, scale, None)

    def assemble(
        self, n: int, k: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The compressed-tensors parts from packed codes, stored scales and (float) zero points."""
        shape = torch.tensor([n, k]).expand(*packed.shape[:-2], 2).contiguous()
        out = {"weight_packed": packed, "weight_scale": scale, "weight_shape": shape}
        if zero is not None:
            offset = 2 ** (self.bits - 1)
            out["weight_zero_point"] = pack_int32(zero.to(torch.int32) + offset, self.bits, dim=-2)
        return out


@dataclass(frozen=True)
class CtNvfp4Codec:
    """compressed-tensors NVFP4: `weight_packed` U8, `weight_scale` E4M3 per 16, `weight_global_scale` [1]."""

    name: str = "ct-nvfp4"
    required: tuple[str, ...] = ("weight_packed", "weight_scale", "weight_global_scale")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False
    shares_global_scale: ClassVar[bool] = True  # encode takes global_amax

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w, s, gs = parts["weight_packed"], parts["weight_scale"], parts["weight_global_scale"]
        check_dtype(w, (torch.uint8,), where, "weight_packed")
        check_dtype(s, (torch.float8_e4m3fn,), where, "weight_scale")
        check_shape(s, (*w.shape[:-1], w.shape[-1] * 2 // 16), where, "weight_scale")
        glob = check_finite(gs, where, "weight_global_scale").reshape(())
        return nvfp4_decode(w, check_finite(s, where, "weight_scale") / glob)

    def encode(
        self, weight: torch.Tensor, global_amax: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        packed, scale, glob = nvfp4_encode(weight, "compressed-tensors", global_amax)
        return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": glob}

    kind: ClassVar[str] = "nvfp4"  # lossless moves between codecs of one kind: split -> join

    def split(self, parts: Parts) -> Canonical:
        glob = parts["weight_global_scale"]
        return parts["weight_packed"], parts["weight_scale"], reciprocal(glob).reshape(())

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        glob = reciprocal(multiplier).reshape(1)
        return {"weight_packed": packed, "weight_scale": scales, "weight_global_scale": glob}


@dataclass(frozen=True)
class CtMxfp4Codec:
    """compressed-tensors MXFP4: `weight_packed` U8 [N, K/2], `weight_scale` U8 (E8M0) [N, K/32]."""

    name: str = "ct-mxfp4"
    required: tuple[str, ...] = ("weight_packed", "weight_scale")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = True

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w, s = parts["weight_packed"], parts["weight_scale"]
        check_dtype(w, (torch.uint8,), where, "weight_packed")
        check_dtype(s, (torch.uint8,), where, "weight_scale")
        check_shape(s, (*w.shape[:-1], w.shape[-1] * 2 // 32), where, "weight_scale")
        if bool((s == 255).any()):
            raise MoeportError(f"{where}.weight_scale: E8M0 NaN byte 255")
        return mx_decode(w, s)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scale = mx_encode(weight, 32, ct=True)
        return {"weight_packed": packed, "weight_scale": scale}

    kind: ClassVar[str] = "mxfp4"

    def split(self, parts: Parts) -> Canonical:
        return parts["weight_packed"], parts["weight_scale"].view(torch.uint8), None

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        return {"weight_packed": packed, "weight_scale": scales}


def float_quantized_codec(
    strategy: str = "channel", scale_dtype: torch.dtype = torch.bfloat16
) -> Fp8ScaledCodec:
    """compressed-tensors FP8 (`float-quantized`): E4M3 `weight` + `weight_scale` [N, 1] or [1]."""
    return Fp8ScaledCodec(strategy=strategy, scale_dtype=scale_dtype, name="ct-float-quantized")


# --- the formats -------------------------------------------------------------------------------


def _params(quant: dict[str, Any]) -> Params:
    """The weights args of the first config group (enough to describe the expert format)."""
    weights: dict[str, Any] = {}
    for group in (quant.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            weights = group["weights"]
            break
    return {k: weights[k] for k in ("num_bits", "group_size", "symmetric", "strategy") if k in weights}


def _recognize_nvfp4(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    if active["weight_packed"].dtype != "U8" or "weight_global_scale" not in active:
        return None
    return ExpertFormat("ct-nvfp4", _params(quant))


def _recognize_mxfp4(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    return ExpertFormat("ct-mxfp4", _params(quant)) if active["weight_packed"].dtype == "U8" else None


def _recognize_pack_quantized(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    """Last of the `weight_packed` formats: any dtype but I32 (or U8, taken above) is refused."""
    packed = active["weight_packed"]
    if packed.dtype != "I32":
        raise MoeportError(f"{where}: 'weight_packed' has dtype {packed.dtype}, expected I32 or U8")
    return ExpertFormat("ct-pack-quantized", _params(quant))


def _packed_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    p = shapes["weight_packed"]
    return (*p[:-1], p[-1] * 32 // int(params.get("num_bits", 4)))


def _fp4_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    p = shapes["weight_packed"]
    return (*p[:-1], p[-1] * 2)


def _zero_point_rows(part: str, params: Params) -> RowRule | None:
    """Asymmetric zero points are packed along N (`weight_zero_point` [N*b/32, G]); `weight_shape`
    [N, K] follows the rows as data (fused: `gate_up_proj_shape` [E, 2] = [2I, K] per expert)."""
    if part == "weight_shape":
        return SHAPE
    if part != "weight_zero_point":
        return None
    return RowRule(-2, 32 // int(params.get("num_bits", 4)))  # rows of N per packed int32


CT_NVFP4 = StorageFormat(
    "ct-nvfp4", _recognize_nvfp4, _fp4_shape, lambda p: CtNvfp4Codec(), marker="weight_packed"
)
CT_MXFP4 = StorageFormat(
    "ct-mxfp4", _recognize_mxfp4, _fp4_shape, lambda p: CtMxfp4Codec(), marker="weight_packed"
)
CT_PACK_QUANTIZED = StorageFormat(
    "ct-pack-quantized",
    _recognize_pack_quantized,
    _packed_shape,
    lambda p: PackQuantizedCodec(
        bits=int(p.get("num_bits", 4)),
        group_size=p.get("group_size"),
        symmetric=bool(p.get("symmetric", True)),
    ),
    row_rule=_zero_point_rows,
    marker="weight_packed",
)
FORMATS = (CT_NVFP4, CT_MXFP4, CT_PACK_QUANTIZED)  # in recognition order
