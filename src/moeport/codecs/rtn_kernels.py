"""numba kernel for BF16 -> INT RTN (compressed-tensors pack-quantized) in one pass.

Why by hand: the torch path makes a float32 copy of the weight, a grouped min/max and a divide,
each a pass over fresh memory; this loop reads the bf16 bits once (same bytes: tests compare it
with the torch path). Single-threaded and GIL-free, like every kernel in cpu_kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from moeport.codecs.cpu_kernels import AVAILABLE, _stored, quantize_pack_supported

if AVAILABLE:
    from numba import njit

    from moeport.codecs.cpu_kernels import _pack_codes, _round_bf16

    @njit(cache=True, nogil=True, boundscheck=False)
    def _bf16_to_int(
        w, bits, group, symmetric, bf16_scale, eps, packed, scale, zero, bad
    ):  # pragma: no cover
        """BF16 weight (bit patterns) -> INT RTN codes in one pass, with no float32 copy of it.

        As _fp8_block_to_int: a group's min/max are its largest positive and negative bit patterns
        (integer maxima, which vectorise; bf16 -> float32 is exact and order-preserving), then the
        same float32 steps as int_rtn. A row holding NaN/Inf is flagged in `bad` (left to torch).
        """
        n, k = w.shape
        qmin = np.float32(-(2 ** (bits - 1)))
        qmax = np.float32(2 ** (bits - 1) - 1)
        offset = np.float32(2 ** (bits - 1))
        half_range = np.float32((qmax - qmin) / 2)
        full_range = np.float32(qmax - qmin)
        for i in range(n):
            as_bits = np.empty(group, dtype=np.uint32)
            as_float = as_bits.view(np.float32)
            codes = np.empty(group, dtype=np.uint8)
            code_pairs = codes.view(np.uint16)
            bits32 = np.empty(1, dtype=np.float32)
            as_u32 = bits32.view(np.uint32)
            wrow = w[i]
            wrow_signed = wrow.view(np.int16)
            prow = packed[i]
            for g in range(k // group):
                base = g * group
                smax = np.int16(0)  # largest positive pattern (as int16: negatives are < 0)
                umax = np.uint16(0)  # largest pattern: 0x8000 + the largest negative magnitude, if any
                for j in range(group):
                    smax = max(smax, wrow_signed[base + j])
                    umax = max(umax, wrow[base + j])
                pos = np.uint16(smax)
                neg = np.uint16(umax - np.uint16(0x8000)) if umax >= np.uint16(0x8000) else np.uint16(0)
                if pos >= np.uint16(0x7F80) or neg >= np.uint16(0x7F80):  # Inf or NaN
                    bad[i] = True
                    break
                as_u32[0] = np.uint32(pos) << np.uint32(16)
                hi = bits32[0]
                as_u32[0] = np.uint32(neg) << np.uint32(16)
                lo = np.float32(0.0) - bits32[0] if neg > 0 else np.float32(0.0)
                # cpu_kernels._group_scale_zero's steps, written out: through that inlined helper
                # this kernel measured 15-30% slower (the FP8 one did not)
                s = (-lo if -lo > hi else hi) / half_range if symmetric else (hi - lo) / full_range
                if s == 0:
                    s = eps
                if bf16_scale:
                    s = _round_bf16(s, bits32, as_u32)
                scale[i, g] = s
                z = np.float32(0.0)
                if not symmetric:
                    z = qmin - lo / s
                    z = np.float32(np.rint(qmax if z > qmax else (qmin if z < qmin else z)))
                    zero[i, g] = z
                for j in range(group):
                    as_bits[j] = np.uint32(wrow[base + j]) << np.uint32(16)
                for j in range(group):
                    q = min(max(np.rint(as_float[j] / s + z), qmin), qmax)
                    codes[j] = np.uint8(np.int32(q + offset))
                _pack_codes(codes, code_pairs, bits, group, prow, base)


def bf16_to_int(
    weight: torch.Tensor, bits: int, group: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """BF16 [N, K] -> (packed int32, scale in scale_dtype, zero or None), as int_rtn computes them;
    None when a row holds NaN/Inf (the torch path then says what it makes of them)."""
    n, k = weight.shape
    packed = np.empty((n, k * bits // 8), dtype=np.uint8)
    scale = np.empty((n, k // group), dtype=np.float32)
    zero = np.zeros((n, k // group) if not symmetric else (0, 0), dtype=np.float32)
    bad = np.zeros(n, dtype=np.bool_)
    _bf16_to_int(
        weight.contiguous().view(torch.uint16).numpy(),
        bits,
        group,
        symmetric,
        scale_dtype == torch.bfloat16,
        np.float32(torch.finfo(scale_dtype).eps),
        packed,
        scale,
        zero,
        bad,
    )
    if bad.any():
        return None
    return (
        torch.from_numpy(packed).view(torch.int32),
        _stored(scale, scale_dtype),
        None if symmetric else torch.from_numpy(zero),
    )


def bf16_to_int_supported(weight: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype) -> bool:
    return (
        weight.dtype == torch.bfloat16
        and quantize_pack_supported(weight, bits, group)
        and scale_dtype in (torch.float32, torch.bfloat16)
    )
