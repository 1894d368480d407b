"""numba kernel for the CPU hot path of every E2M1 encoder (NVFP4 either flavour, MXFP4 any layout).

One pass: code = RNE_E2M1(x / divisor[group]) (IEEE float32 division, the same threshold compares
as fp4.e2m1_encode, so the bytes equal the torch path's), two codes per byte, element 2j low.
The scales (group maxima in torch, whose vectorised reductions beat a numba loop; then a few ops
on the 16-32x smaller scale tensors) are computed by the codec; only the divisor per group comes
here. BF16 weights are read as their bits (no float32 copy of the weight).

Serial on purpose (no `parallel=True`): the CPU path spreads experts over a thread pool, and
`nogil=True` lets those threads run this kernel at the same time.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a regular dependency; keep the torch path usable
    njit = None

AVAILABLE = njit is not None

if AVAILABLE:

    @njit(cache=True, nogil=True, inline="always")
    def _codes(quot, codes):  # pragma: no cover - compiled
        """RNE onto the E2M1 grid, saturating at 6; negative values keep the sign bit (code 8+)."""
        for j in range(quot.shape[0]):
            q = quot[j]
            a = abs(q)
            m = (
                np.uint8(a > 0.25)
                + np.uint8(a >= 0.75)
                + np.uint8(a > 1.25)
                + np.uint8(a >= 1.75)
                + np.uint8(a > 2.5)
                + np.uint8(a >= 3.5)
                + np.uint8(a > 5.0)
            )
            codes[j] = m + np.uint8(8) * np.uint8(q < 0)

    @njit(cache=True, nogil=True, inline="always")
    def _pack(codes, out_row, base):  # pragma: no cover - compiled
        for j in range(codes.shape[0] // 2):
            out_row[base // 2 + j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))

    @njit(cache=True, nogil=True, boundscheck=False)
    def _e2m1_pack_f32(x, divisor, group, out):  # pragma: no cover - compiled
        n, k = x.shape
        quot = np.empty(group, dtype=np.float32)
        codes = np.empty(group, dtype=np.uint8)
        for i in range(n):
            row = x[i]
            for g in range(k // group):
                d = divisor[i, g]
                base = g * group
                for j in range(group):
                    quot[j] = row[base + j] / d
                _codes(quot, codes)
                _pack(codes, out[i], base)

    @njit(cache=True, nogil=True, boundscheck=False)
    def _e2m1_pack_bf16(x, divisor, group, out):  # pragma: no cover - compiled
        """x: the bf16 weight's bits (uint16); each value widened to float32 exactly (<< 16)."""
        n, k = x.shape
        as_bits = np.empty(group, dtype=np.uint32)
        as_float = as_bits.view(np.float32)
        codes = np.empty(group, dtype=np.uint8)
        for i in range(n):
            row = x[i]
            for g in range(k // group):
                d = divisor[i, g]
                base = g * group
                for j in range(group):
                    as_bits[j] = np.uint32(row[base + j]) << np.uint32(16)
                for j in range(group):
                    as_float[j] = as_float[j] / d
                _codes(as_float, codes)
                _pack(codes, out[i], base)

    @njit(cache=True, nogil=True, inline="always")
    def _amax(vals, n):  # pragma: no cover - compiled
        """max |v| of vals[:n]; NaN when any is NaN (as torch's reductions give)."""
        m = np.float32(0.0)
        nans = 0
        for j in range(n):
            a = abs(vals[j])
            m = a if a > m else m
            nans += a != a
        return np.float32(np.nan) if nans else m

    @njit(cache=True, nogil=True, boundscheck=False)
    def _group_amax_f32(x, group, out):  # pragma: no cover - compiled
        n, k = x.shape
        for i in range(n):
            for g in range(k // group):
                out[i, g] = _amax(x[i, g * group : (g + 1) * group], group)

    @njit(cache=True, nogil=True, boundscheck=False)
    def _group_amax_bf16(x, group, out):  # pragma: no cover - compiled
        n, k = x.shape
        as_bits = np.empty(group, dtype=np.uint32)
        as_float = as_bits.view(np.float32)
        for i in range(n):
            row = x[i]
            for g in range(k // group):
                for j in range(group):
                    as_bits[j] = np.uint32(row[g * group + j]) << np.uint32(16)
                out[i, g] = _amax(as_float, group)


def group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    """max |x| of each run of `group` along K of [..., K] float32/bf16 -> float32 [..., K/group]."""
    k = x.shape[-1]
    x2 = x.contiguous().reshape(-1, k)
    out = np.empty((x2.shape[0], k // group), dtype=np.float32)
    if x2.dtype == torch.bfloat16:
        _group_amax_bf16(x2.view(torch.uint16).numpy(), group, out)
    else:
        _group_amax_f32(x2.numpy(), group, out)
    return torch.from_numpy(out).reshape(*x.shape[:-1], k // group)


def supported(x: torch.Tensor, group: int) -> bool:
    return (
        AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[-1] % group == 0
        and group % 2 == 0
    )


def e2m1_pack(x: torch.Tensor, divisor: torch.Tensor, group: int) -> torch.Tensor:
    """[..., K] float32/bf16 with float32 divisors [..., K/group] -> packed codes uint8 [..., K/2]."""
    k = x.shape[-1]
    x2 = x.contiguous().reshape(-1, k)
    d2 = divisor.float().contiguous().reshape(-1, k // group)
    out = np.empty((x2.shape[0], k // 2), dtype=np.uint8)
    if x2.dtype == torch.bfloat16:
        _e2m1_pack_bf16(x2.view(torch.uint16).numpy(), d2.numpy(), group, out)
    else:
        _e2m1_pack_f32(x2.numpy(), d2.numpy(), group, out)
    return torch.from_numpy(out).reshape(*x.shape[:-1], k // 2)
