"""E2M1 (FP4) weights: MXFP4 (GPT-OSS `_blocks`/`_scales`, DeepSeek-V4 I8 + E8M0 `scale`) and NVFP4
(ModelOpt: E4M3 scale per 16 times a per-tensor `weight_scale_2`).

Two codes per byte, element 2j in the low nibble (every HF-side producer agrees). RTN onto the
E2M1 grid is round-half-to-even with saturation at ±6; negative values that round to zero keep
the sign bit (code 8), equal in value to +0. Codes are RNE_E2M1(x / divisor) with one float32
divisor per group (IEEE division), through fp4_kernels on the CPU and torch elsewhere: same bytes.

Scale choices (each that of the producer it must match byte for byte, tests):
  * MXFP4, OCP (gguf, GPT-OSS, DeepSeek-V4): X = floor(log2(amax)) - 2, byte X + 127;
    compressed-tensors: X + 1 when amax's mantissa is >= 1.75 (`mx_exponent(ct=True)`).
  * NVFP4, ModelOpt 0.47 `NVFP4QTensor` (`nvfp4_scales_modelopt`): multiplier ws2 = amax/2688;
    compressed-tensors/llmcompressor (`nvfp4_scales_ct`): divisor global = 2688/amax, in the
    weight's dtype as it computes it. Weights a server fuses pass one `global_amax` (their max).

Formats: mxfp4 (variant gpt-oss, recognised first of all by its `_blocks`; variant deepseek-v4, an
I8/U8 `weight` with E8M0 `scale`) and nvfp4 (a U8 `weight` with `weight_scale` + `weight_scale_2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs import fp4_kernels
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


def group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    """max |x| of each run of `group` along K, float32 [..., K/group] (one pass, in x's own dtype:
    min and max are exact in any float dtype). NaN propagates."""
    if fp4_kernels.supported(x, group):
        return fp4_kernels.group_amax(x, group)
    src = x if x.is_floating_point() else x.float()
    lo, hi = torch.aminmax(src.reshape(*x.shape[:-1], x.shape[-1] // group, group), dim=-1)
    return torch.maximum(-lo.float(), hi.float())


def e2m1_pack(x: torch.Tensor, divisor: torch.Tensor, group: int) -> torch.Tensor:
    """Packed codes RNE_E2M1(x / divisor) of [..., K] with float32 divisors [..., K/group]: the numba
    kernel on the CPU, torch elsewhere; the same bytes either way."""
    if fp4_kernels.supported(x, group):
        return fp4_kernels.e2m1_pack(x, divisor, group)
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    return pack_nibbles(e2m1_encode(g / divisor.unsqueeze(-1)).flatten(-2))


def _refuse_nonfinite(amax: torch.Tensor, what: str) -> None:
    """E8M0-scaled codes cannot carry NaN/Inf: refuse them, naming the first row."""
    bad = ~torch.isfinite(amax)
    if bool(bad.any()):
        rows = bad.reshape(-1, bad.shape[-1]).any(-1)
        raise MoeportError(
            f"NaN/Inf in {int(rows.sum())} row(s), first in row {int(rows.nonzero()[0])}; "
            f"{what} cannot hold them"
        )


def mx_exponent(amax: torch.Tensor, ct: bool = False) -> torch.Tensor:
    """Shared exponent X of each group, int32; amax 0 -> -127.

    OCP MX rule (gguf, GPT-OSS): floor(log2(amax)) - 2 (2 = E2M1's max exponent). compressed-tensors
    first rounds amax to a power of two, up when its mantissa is >= 1.75 (`generate_mx_scales`), so
    it picks X + 1 there (ct=True)."""
    m, e = torch.frexp(amax)
    x = e - 1 - 2
    if ct:
        x = x + (m >= 0.875).to(x.dtype)
    x = x.clamp(-127, 127)
    return torch.where(amax > 0, x, torch.full_like(x, -127))


def mx_encode(x: torch.Tensor, group: int = 32, ct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (packed codes [..., K/2] uint8, scale bytes [..., K/group] uint8)."""
    amax = group_amax(x, group)
    _refuse_nonfinite(amax, "MXFP4 (E8M0 scales)")
    exp = mx_exponent(amax, ct)
    # an all-zero group's divisor (2^-127) is subnormal: a process running with flush-to-zero (kt-kernel
    # sets it when imported) would divide by 0. Its codes are +-0 for any divisor, so use 1.
    one = torch.ones_like(amax)
    divisor = torch.where(amax > 0, torch.ldexp(one, exp), one)
    return e2m1_pack(x, divisor, group), (exp + 127).to(torch.uint8)


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
        return self.join(packed, scales, None)

    kind: ClassVar[str] = "mxfp4"  # lossless moves between codecs of one kind: split -> join

    def split(self, parts: Parts) -> Canonical:
        blocks = parts["_blocks"]
        return blocks.reshape(*blocks.shape[:-2], -1), parts["_scales"].view(torch.uint8), None

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
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
        return self.join(packed, scales, None)

    kind: ClassVar[str] = "mxfp4"

    def split(self, parts: Parts) -> Canonical:
        return parts["weight"].view(torch.uint8), parts["scale"].view(torch.uint8), None

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        return {"weight": packed.view(torch.int8), "scale": scales.view(torch.float8_e8m0fnu)}


# What split() gives and join() takes: packed codes [.., N, K/2] uint8, the per-group scales as
# stored, and the per-tensor multiplier (float32 0-d) or None.
Canonical = tuple[torch.Tensor, torch.Tensor, Any]
E2M1_MAX = 6.0
NV_GROUP = 16


def nvfp4_scales_modelopt(bamax: torch.Tensor, gamax: torch.Tensor):
    """ModelOpt 0.47 `NVFP4QTensor` RTN: ws2 = amax/(6*448) (1 for an all-zero weight); block scale
    amax_b/(6*ws2), zero -> 1, clamped to [2^-9, 448], E4M3 (RNE). -> (E4M3 scales, ws2 [], divisors)."""
    ws2 = divide(gamax, E2M1_MAX * FP8_MAX) if gamax != 0 else torch.ones((), device=gamax.device)
    bs = bamax / (E2M1_MAX * ws2)
    bs = torch.where(bs == 0, torch.ones_like(bs), bs).clamp(2**-9, FP8_MAX).to(torch.float8_e4m3fn)
    return bs, ws2.reshape(()).float(), bs.float() * ws2


def nvfp4_scales_ct(bamax: torch.Tensor, gamax: torch.Tensor, dtype: torch.dtype = torch.float32):
    """compressed-tensors / llmcompressor RTN, step for step in the weight's `dtype` as it runs them
    (`generate_gparam`, `calculate_qparams`): global = reciprocal(amax) * 2688 (Python's `2688 / t`
    is `t.reciprocal() * 2688` in torch), 1 for an all-zero weight; block scale global * (amax_b / 6),
    clamped to ±448, E4M3 (RNE), zero -> E4M3 eps 0.125; codes of x / (scale / global).
    -> (E4M3 scales, global [1] float32, divisors)."""
    gs = ct_global_scale(gamax, dtype)
    per_block = bamax.to(dtype) / torch.tensor(E2M1_MAX, dtype=dtype, device=bamax.device)
    s = (gs * per_block.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s = torch.where(s.float() == 0, torch.full_like(s, 0.125), s)
    return s, gs, s.float() / gs


def ct_global_scale(amax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scale (a divisor) of a tensor whose max |x| is `amax`, as
    `generate_gparam` computes it in `dtype`: 2688 / amax, 1 for amax 0. float32 [1]; for weights
    and for the static activation scale (`input_global_scale`) alike."""
    tiny = torch.finfo(dtype).tiny
    gs = (amax.to(dtype).clamp(min=tiny).reciprocal() * (E2M1_MAX * FP8_MAX)).float()
    return torch.where(torch.isinf(gs), torch.ones_like(gs), gs).reshape(1)  # CT: amax 0 -> 1


def modelopt_input_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's NVFP4 static activation scale (a multiplier, `input_scale` F32 []): amax / (6*448)
    in float32, as `NVFP4QTensor.get_activation_scaling_factor` exports it."""
    return divide(amax.float(), E2M1_MAX * FP8_MAX).reshape(())


def nvfp4_encode(x: torch.Tensor, flavor: str, global_amax: torch.Tensor | None = None):
    """[..., N, K] -> (packed [..., N, K/2], E4M3 block scales [..., N, K/16], global scale), the
    global one from `global_amax` when given (weights a server fuses share it), else from x."""
    bamax = group_amax(x, NV_GROUP)
    gamax = bamax.amax() if global_amax is None else global_amax.to(bamax.device).float()
    if flavor == "compressed-tensors":
        bs, glob, divisor = nvfp4_scales_ct(bamax, gamax, x.dtype if x.is_floating_point() else torch.float32)
    else:
        bs, glob, divisor = nvfp4_scales_modelopt(bamax, gamax)
    if not bool(torch.isfinite(gamax)):  # NaN/Inf weight: a NaN global scale, which Encode refuses
        glob = torch.full_like(glob, float("nan"))
    return e2m1_pack(x, divisor, NV_GROUP), bs, glob


def nvfp4_decode(packed: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """E2M1 codes times each group's float32 scale (block scale with the global one applied)."""
    values = e2m1_decode(unpack_nibbles(packed))
    g = values.reshape(*values.shape[:-1], -1, NV_GROUP)
    return (g * block.unsqueeze(-1)).reshape(values.shape)


@dataclass(frozen=True)
class Nvfp4Codec:
    """ModelOpt NVFP4: `weight` U8 [N, K/2], `weight_scale` E4M3 [N, K/16], `weight_scale_2` F32 []."""

    name: str = "nvfp4"
    required: tuple[str, ...] = ("weight", "weight_scale", "weight_scale_2")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False
    shares_global_scale: ClassVar[bool] = True  # encode takes global_amax

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w, s, s2 = parts["weight"], parts["weight_scale"], parts["weight_scale_2"]
        check_dtype(w, (torch.uint8,), where, "weight")
        check_dtype(s, (torch.float8_e4m3fn,), where, "weight_scale")
        check_shape(s, (*w.shape[:-1], w.shape[-1] * 2 // 16), where, "weight_scale")
        block = check_finite(s, where, "weight_scale") * check_finite(s2, where, "weight_scale_2").reshape(())
        return nvfp4_decode(w, block)

    def encode(
        self, weight: torch.Tensor, global_amax: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        packed, bs, ws2 = nvfp4_encode(weight, "modelopt", global_amax)
        return {"weight": packed, "weight_scale": bs, "weight_scale_2": ws2}

    kind: ClassVar[str] = "nvfp4"

    def split(self, parts: Parts) -> Canonical:
        return parts["weight"], parts["weight_scale"], parts["weight_scale_2"].float().reshape(())

    def join(self, packed: torch.Tensor, scales: torch.Tensor, multiplier: Any) -> dict[str, torch.Tensor]:
        return {"weight": packed, "weight_scale": scales, "weight_scale_2": multiplier.reshape(())}


def reciprocal(x: torch.Tensor) -> torch.Tensor:
    """1/x correctly rounded to float32 (computed in float64): the global-scale conventions of
    ModelOpt (multiplier) and compressed-tensors (divisor), converted as exactly as float32 allows."""
    return (1.0 / x.double()).float()


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
