"""numba kernels for the CPU hot paths: FP8-block dequant and INT4/INT8 RTN quantize+pack.

Why by hand: in eager torch each elementwise step is a full pass over memory (FP8 -> INT4 needs
~15 of them, ~0.05 GB/s per core); these loops do one pass. They follow the torch reference
implementations in fp8.py / int_rtn.py operation for operation in float32 (IEEE division,
round-half-even), and the tests require byte-identical output. Used only when numba imports and
the tensors are on the CPU; otherwise the torch path runs.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a regular dependency; keep the torch path usable
    njit = None

AVAILABLE = njit is not None

_E4M3_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_BF16_EPS = np.float32(torch.finfo(torch.bfloat16).eps)
_F32_EPS = np.float32(torch.finfo(torch.float32).eps)

if AVAILABLE:

    @njit(cache=True, nogil=True, parallel=True)
    def _fp8_block_dequant(w, scale, lut, bn, bk, out):  # pragma: no cover - compiled
        n, k = w.shape
        for i in prange(n):
            srow = scale[i // bn]
            for jb in range(scale.shape[1]):
                s = srow[jb]
                for j in range(jb * bk, min(k, (jb + 1) * bk)):
                    out[i, j] = lut[w[i, j]] * s

    # min/max are exact whatever the order, so letting LLVM reassociate (vectorise) changes no result
    @njit(cache=True, nogil=True, inline="always", fastmath={"nnan", "ninf", "reassoc", "nsz"})
    def _min_max_with_zero(v):  # pragma: no cover - compiled
        lo = np.float32(0.0)
        hi = np.float32(0.0)
        for j in range(v.shape[0]):
            lo = min(lo, v[j])
            hi = max(hi, v[j])
        return lo, hi

    @njit(cache=True, nogil=True, parallel=True)
    def _rtn_pack(x, bits, group, symmetric, bf16_scale, packed, scale, zero):  # pragma: no cover
        n, k = x.shape
        qmin = np.float32(-(2 ** (bits - 1)))
        qmax = np.float32(2 ** (bits - 1) - 1)
        offset = 2 ** (bits - 1)
        half_range = np.float32((qmax - qmin) / 2)
        full_range = np.float32(qmax - qmin)
        eps = _BF16_EPS if bf16_scale else _F32_EPS
        for i in prange(n):
            codes = np.empty(group, dtype=np.uint8)
            quot = np.empty(group, dtype=np.float32)
            bits32 = np.empty(1, dtype=np.float32)
            as_u32 = bits32.view(np.uint32)
            row = x[i]
            for g in range(k // group):
                base = g * group
                lo, hi = _min_max_with_zero(row[base : base + group])
                s = (-lo if -lo > hi else hi) / half_range if symmetric else (hi - lo) / full_range
                if s == 0:
                    s = eps
                if bf16_scale:  # round-to-nearest-even to bf16, on the bit pattern (as torch does)
                    bits32[0] = s
                    u = as_u32[0]
                    as_u32[0] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(
                        0xFFFF0000
                    )
                    s = bits32[0]
                scale[i, g] = s
                z = np.float32(0.0)
                if not symmetric:
                    z = qmin - lo / s
                    z = np.float32(np.rint(qmax if z > qmax else (qmin if z < qmin else z)))
                    zero[i, g] = np.int8(z)
                for j in range(group):  # kept apart so LLVM vectorises the division
                    quot[j] = row[base + j] / s + z
                for j in range(group):
                    q = np.rint(quot[j])
                    q = qmax if q > qmax else (qmin if q < qmin else q)
                    codes[j] = np.uint8(np.int32(q) + offset)
                if bits == 4:
                    for j in range(group // 2):
                        packed[i, base // 2 + j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))
                else:
                    for j in range(group):
                        packed[i, base + j] = codes[j]


def fp8_block_dequant(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> None:
    """[N, K] e4m3 x [ceil(N/bn), ceil(K/bk)] float32 -> `out` float32 [N, K] (contiguous)."""
    _fp8_block_dequant(
        weight.contiguous().view(torch.uint8).numpy(),
        scale.float().contiguous().numpy(),
        _E4M3_LUT,
        block[0],
        block[1],
        out.numpy(),
    )


def rtn_pack(
    x: torch.Tensor, bits: int, group: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float32 [N, K] -> (packed int32 [N, K*bits/32], scale [N, K/group], zero int8 or None)."""
    n, k = x.shape
    packed = torch.empty(n, k * bits // 8, dtype=torch.uint8)
    scale = torch.empty(n, k // group, dtype=torch.float32)
    zero = torch.empty(n, k // group, dtype=torch.int8)
    _rtn_pack(
        x.float().contiguous().numpy(),
        bits,
        group,
        symmetric,
        scale_dtype == torch.bfloat16,
        packed.numpy(),
        scale.numpy(),
        zero.numpy(),
    )
    return packed.view(torch.int32), scale.to(scale_dtype), None if symmetric else zero


def rtn_pack_supported(x: torch.Tensor, bits: int, group: int | None, scale_dtype: torch.dtype) -> bool:
    k = x.shape[-1]
    return (
        AVAILABLE
        and x.device.type == "cpu"
        and x.dim() == 2
        and bits in (4, 8)
        and group is not None
        and group > 0
        and k % group == 0
        and group % 2 == 0
        and (k * bits) % 32 == 0
        and scale_dtype in (torch.float32, torch.bfloat16)
    )
