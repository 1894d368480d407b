"""Round-to-nearest integer quantization (INT4/INT8; symmetric or asymmetric; per channel or group).

Conventions follow compressed-tensors, so our codes/scales mean what vLLM kernels expect:
  * codes are signed: int4 in [-8, 7], int8 in [-128, 127];
  * symmetric: scale = max|x| / ((qmax - qmin) / 2)  (= amax/7.5 for int4), zero point 0;
  * asymmetric: min <= 0 <= max is forced, scale = (max - min) / (qmax - qmin),
    zero = round(clamp(qmin - min/scale, qmin, qmax));
  * q = clamp(round_half_even(x / scale + zero), qmin, qmax); all-zero groups get scale = eps.
Math runs in float32 and quantizes with the scale *as stored* (e.g. rounded to bf16), so decode
reproduces exactly what was encoded. Groups run along K (the input dim, last axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeport.codecs.base import divide
from moeport.errors import MoeportError


@dataclass(frozen=True)
class IntQuantized:
    codes: torch.Tensor  # int8 [..., N, K], signed
    scale: torch.Tensor  # [..., N, G] in scale_dtype
    zero: torch.Tensor | None  # int8 [..., N, G] signed, asymmetric only


def int_range(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    k = x.shape[-1]
    g = k if group_size in (None, -1) else group_size
    if k % g:
        raise MoeportError(f"input dim {k} is not a multiple of group size {g}")
    return x.reshape(*x.shape[:-1], k // g, g)


def group_size_of(k: int, group_size: int | None) -> int:
    return k if group_size in (None, -1) else group_size


def rtn_params(
    weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scale (as stored, in scale_dtype) and zero point (float, asymmetric only)."""
    qmin, qmax = int_range(bits)
    # min/max are exact in any float dtype: reduce in the weight's own dtype, in one pass
    src = weight if weight.is_floating_point() else weight.float()
    lo, hi = torch.aminmax(_groups(src, group_size), dim=-1)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if symmetric:
        scale = divide(torch.maximum(-lo, hi), (qmax - qmin) / 2)
    else:
        scale = divide(hi - lo, qmax - qmin)
    eps = torch.finfo(scale_dtype).eps if scale_dtype.is_floating_point else 1e-8
    stored = torch.where(scale == 0, torch.full_like(scale, eps), scale).to(scale_dtype)
    zero = None if symmetric else torch.round((qmin - lo / stored.float()).clamp(qmin, qmax))
    return stored, zero


def rtn_codes(
    weight: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None
) -> torch.Tensor:
    """Signed int8 codes of `weight` for the given per-group scale/zero."""
    qmin, qmax = int_range(bits)
    g = weight.float().reshape(*weight.shape[:-1], scale.shape[-1], -1)
    shifted = g / scale.float().unsqueeze(-1) + (0 if zero is None else zero.unsqueeze(-1))
    return torch.round(shifted).clamp(qmin, qmax).to(torch.int8).reshape(weight.shape)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
) -> IntQuantized:
    scale, zero = rtn_params(weight, bits, group_size, symmetric, scale_dtype)
    codes = rtn_codes(weight, bits, scale, zero)
    return IntQuantized(codes, scale, None if zero is None else zero.to(torch.int8))


def rtn_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    groups = scale.shape[-1]
    g = codes.float().reshape(*codes.shape[:-1], groups, -1)
    if zero is not None:
        g = g - zero.float().unsqueeze(-1)
    return (g * scale.float().unsqueeze(-1)).reshape(codes.shape)
