"""E2M1 (FP4) weights: MXFP4 (GPT-OSS `_blocks`/`_scales`, DeepSeek-V4 I8 + E8M0 `scale`) and NVFP4
(ModelOpt: E4M3 scale per 16 times a per-tensor `weight_scale_2`).

Two codes per byte, element 2j in the low nibble (every HF-side producer agrees). RTN onto the
E2M1 grid is round-half-to-even with saturation at ±6; negative values that round to zero keep
the sign bit (code 8), equal in value to +0.

Formats: mxfp4 (variant gpt-oss, recognised first of all by its `_blocks`; variant deepseek-v4, an
I8/U8 `weight` with E8M0 `scale`) and nvfp4 (a U8 `weight` with `weight_scale` + `weight_scale_2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs.base import Parts, check_dtype, check_finite, check_shape, divide, need
from moeport.codecs.format import ExpertFormat, Params, Part, RowRule, Shape, StorageFormat
from moeport.codecs.fp8 import FP8_MAX
from moeport.errors import MoeportError

E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
# Midpoints between grid values; a tie goes to the even code: down at these...
_TIES_DOWN = torch.tensor([0.25, 1.25, 2.5, 5.0])
# ...and up at these.
_TIES_UP = torch.tensor([0.75, 1.75, 3.5])


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float -> uint8 codes 0..15 (RNE on the E2M1 grid, saturating at ±6)."""
    a = x.abs().unsqueeze(-1)
    magnitude = (a > _TIES_DOWN.to(x.device)).sum(-1) + (a >= _TIES_UP.to(x.device)).sum(-1)
    return (magnitude + 8 * (x < 0)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    return E2M1_VALUES.to(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2j low."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)


def _mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """OCP MX shared exponent floor(log2(amax)) - 2 (2 = E2M1's max exponent); amax 0 -> -127."""
    _, e = torch.frexp(amax)
    x = (e - 1 - 2).clamp(-127, 127)
    return torch.where(amax > 0, x, torch.full_like(x, -127))


def mx_encode(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (packed codes [..., K/2] uint8, scale bytes [..., K/group] uint8)."""
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    exp = _mx_exponent(g.abs().amax(-1))
    codes = e2m1_encode(torch.ldexp(g, -exp.unsqueeze(-1)))
    return pack_nibbles(codes.flatten(-2)), (exp + 127).to(torch.uint8)


def mx_decode(packed: torch.Tensor, scale_bytes: torch.Tensor, group: int = 32) -> torch.Tensor:
    values = e2m1_decode(unpack_nibbles(packed))
    k = values.shape[-1]
    exp = scale_bytes.view(torch.uint8).to(torch.int32) - 127
    g = values.reshape(*values.shape[:-1], k // group, group)
    return torch.ldexp(g, exp.unsqueeze(-1)).reshape(values.shape)


def _check_scale_bytes(s: torch.Tensor, where: str, part: str) -> None:
    check_dtype(s, (torch.uint8, torch.float8_e8m0fnu), where, part)
    if (s.view(torch.uint8) == 255).any():
        check_finite(s.view(torch.float8_e8m0fnu), where, part)  # raises: byte 255 is E8M0's NaN


@dataclass(frozen=True)
class GptOssMxfp4Codec:
    """GPT-OSS experts: `_blocks` U8 [..., N, K/32, 16] + `_scales` U8 [..., N, K/32], [out, in]."""

    name: str = "mxfp4-gpt-oss"
    required: tuple[str, ...] = ("_blocks", "_scales")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        blocks, scales = parts["_blocks"], parts["_scales"]
        check_dtype(blocks, (torch.uint8,), where, "_blocks")
        _check_scale_bytes(scales, where, "_scales")
        check_shape(scales, tuple(blocks.shape[:-1]), where, "_scales")
        packed = blocks.reshape(*blocks.shape[:-2], -1)
        return mx_decode(packed, scales)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scales = mx_encode(weight)
        return {"_blocks": packed.reshape(*scales.shape, 16), "_scales": scales}


@dataclass(frozen=True)
class Dsv4Mxfp4Codec:
    """DeepSeek-V4 experts: `weight` I8 [N, K/2] (raw nibble bytes) + `scale` F8_E8M0 [N, K/32]."""

    name: str = "mxfp4-deepseek-v4"
    required: tuple[str, ...] = ("weight", "scale")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        if "scale" not in parts and "weight_scale" in parts:  # fused `gate_up_proj_scale` reads so
            parts = {**parts, "scale": parts["weight_scale"]}
        need(parts, self.required, where, self.name)
        w, s = parts["weight"], parts["scale"]
        check_dtype(w, (torch.int8, torch.uint8), where, "weight")
        _check_scale_bytes(s, where, "scale")
        check_shape(s, (*w.shape[:-1], w.shape[-1] * 2 // 32), where, "scale")
        return mx_decode(w.view(torch.uint8), s)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scales = mx_encode(weight)
        return {"weight": packed.view(torch.int8), "scale": scales.view(torch.float8_e8m0fnu)}


@dataclass(frozen=True)
class Nvfp4Codec:
    """ModelOpt NVFP4: `weight` U8 [N, K/2], `weight_scale` E4M3 [N, K/16], `weight_scale_2` F32 []."""

    name: str = "nvfp4"
    required: tuple[str, ...] = ("weight", "weight_scale", "weight_scale_2")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w, s, s2 = parts["weight"], parts["weight_scale"], parts["weight_scale_2"]
        check_dtype(w, (torch.uint8,), where, "weight")
        check_dtype(s, (torch.float8_e4m3fn,), where, "weight_scale")
        check_shape(s, (*w.shape[:-1], w.shape[-1] * 2 // 16), where, "weight_scale")
        block = check_finite(s, where, "weight_scale") * check_finite(s2, where, "weight_scale_2").reshape(())
        values = e2m1_decode(unpack_nibbles(w))
        g = values.reshape(*values.shape[:-1], -1, 16)
        return (g * block.unsqueeze(-1)).reshape(values.shape)

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        x = weight.float()
        g = x.reshape(*x.shape[:-1], -1, 16)
        amax = x.abs().amax()
        ws2 = divide(amax, 6 * FP8_MAX) if amax > 0 else torch.ones((), device=x.device)
        bs = g.abs().amax(-1) / (6 * ws2)
        bs = torch.where(bs > 0, bs, torch.ones_like(bs)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
        codes = e2m1_encode(g / (bs.float() * ws2).unsqueeze(-1)).flatten(-2)
        return {"weight": pack_nibbles(codes), "weight_scale": bs, "weight_scale_2": ws2.reshape(()).float()}


# --- the formats -------------------------------------------------------------------------------


def _recognize_gpt_oss(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    if "_scales" not in active:
        return None
    return ExpertFormat("mxfp4", {"variant": "gpt-oss", "group_size": 32})


def _packed_weight(active: dict[str, Part]) -> Part | None:
    weight = active.get("weight")
    return weight if weight is not None and weight.dtype in ("U8", "I8") else None


def _recognize_nvfp4(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    if _packed_weight(active) is None or not {"weight_scale", "weight_scale_2"} <= set(active):
        return None
    return ExpertFormat("nvfp4", {"producer": "modelopt", "group_size": 16})


def _recognize_dsv4(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    """Last of the FP4 formats: a packed I8/U8 weight without a scale it knows fits none of them."""
    weight = _packed_weight(active)
    if weight is None:
        return None
    n, half_k = weight.shape[-2], weight.shape[-1]
    scale = active.get("scale", active.get("weight_scale"))
    if scale is not None and scale.dtype in ("F8_E8M0", "U8") and scale.shape[-1] * 32 == half_k * 2:
        return ExpertFormat("mxfp4", {"variant": "deepseek-v4", "group_size": 32})
    raise MoeportError(
        f"{where}: packed {weight.dtype} weight [{n}, {half_k}] without a recognised FP4 scale "
        "(expected E8M0 'scale' per 32 or NVFP4 'weight_scale'+'weight_scale_2')"
    )


def _blocks_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    b = shapes["_blocks"]
    return (*b[:-2], b[-2] * b[-1] * 2)


def _nibbles_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    w = shapes["weight"]
    return (*w[:-1], w[-1] * 2)


def _blocks_rows(part: str, params: Params) -> RowRule | None:
    return RowRule(-3) if part == "_blocks" else None  # GPT-OSS blocks [.., N, K/32, 16]


MXFP4_GPT_OSS = StorageFormat(
    "mxfp4",
    _recognize_gpt_oss,
    _blocks_shape,
    lambda p: GptOssMxfp4Codec(),
    row_rule=_blocks_rows,
    marker="_blocks",
    variant="gpt-oss",
)
NVFP4 = StorageFormat("nvfp4", _recognize_nvfp4, _nibbles_shape, lambda p: Nvfp4Codec())
# variant None: an mxfp4 of any other variant is DeepSeek-V4's
MXFP4_DSV4 = StorageFormat(
    "mxfp4",
    _recognize_dsv4,
    _nibbles_shape,
    lambda p: Dsv4Mxfp4Codec(),
    row_rule=_blocks_rows,
    hub_parts=(("weight_scale", "scale"),),
)
