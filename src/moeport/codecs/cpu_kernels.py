"""numba kernels for the CPU hot paths: FP8-block dequant and the INT4/INT8 quantize+pack loop.

Why by hand: in eager torch each elementwise step is a full pass over memory (FP8 -> INT4 needs
~15 of them, ~0.05 GB/s per core); these loops do one pass. They follow the torch reference
implementations in fp8.py / int_rtn.py operation for operation in float32 (IEEE division,
round-half-even), and the tests require byte-identical output. Reductions (group min/max) stay
in torch, whose vectorised reductions are ~5x faster than a numba loop with IEEE min/max. Used
only when numba imports and the tensors are on the CPU; otherwise the torch path runs.

Each kernel is single-threaded and releases the GIL: the CPU path runs one per expert on every
core at once (moeport.parallel), which scales further than splitting one matrix's rows.
"""

from __future__ import annotations

import numpy as np
import torch

from moeport.errors import MoeportError

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a regular dependency; keep the torch path usable
    njit = None

AVAILABLE = njit is not None

E4M3_LUT = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()

if AVAILABLE:

    @njit(cache=True, nogil=True)
    def _fp8_block_dequant(w, scale, lut, bn, bk, out):  # pragma: no cover - compiled
        n, k = w.shape
        for i in range(n):
            srow = scale[i // bn]
            for jb in range(scale.shape[1]):
                s = srow[jb]
                for j in range(jb * bk, min(k, (jb + 1) * bk)):
                    out[i, j] = lut[w[i, j]] * s

    @njit(cache=True, nogil=True, boundscheck=False)
    def _fp8_block_dequant_bf16(w, scale, lut, bn, bk, out):  # pragma: no cover - compiled
        """As _fp8_block_dequant, each float32 product rounded to bf16 bits (nearest even, as
        torch's cast; NaN codes are refused before) and stored in `out` (uint16).

        A block's 128 x 128 bytes share one scale, so its 256 possible products are rounded once
        into a table and each element is one lookup (16384 elements per 256 products)."""
        n, k = w.shape
        gk = scale.shape[1]
        table = np.empty((gk, 256), dtype=np.uint16)
        prod = np.empty(256, dtype=np.float32)
        bits = prod.view(np.uint32)
        for ib in range(scale.shape[0]):
            for jb in range(gk):
                s = scale[ib, jb]
                for b in range(256):
                    prod[b] = lut[b] * s
                for b in range(256):
                    u = bits[b]
                    table[jb, b] = np.uint16(
                        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> 16
                    )
            for i in range(ib * bn, min(n, (ib + 1) * bn)):
                wrow = w[i]
                orow = out[i]
                for jb in range(gk):
                    t = table[jb]
                    for j in range(jb * bk, min(k, (jb + 1) * bk)):
                        orow[j] = t[wrow[j]]

    @njit(cache=True, nogil=True, inline="always")
    def _round_pack_group(quot, qmin, qmax, offset, bits, packed_row, base):  # pragma: no cover - compiled
        """Round half to even, clamp, offset and pack one group of quotients (element 2j low nibble).

        Plain loops over the group so LLVM vectorises each (one fused loop ran 3x slower).
        """
        for j in range(quot.shape[0]):
            q = np.rint(quot[j])
            quot[j] = qmax if q > qmax else (qmin if q < qmin else q)
        if bits == 4:
            for j in range(quot.shape[0] // 2):
                lo_code = np.uint8(np.int32(quot[2 * j]) + offset)
                hi_code = np.uint8(np.int32(quot[2 * j + 1]) + offset)
                packed_row[base // 2 + j] = lo_code | (hi_code << np.uint8(4))
        else:
            for j in range(quot.shape[0]):
                packed_row[base + j] = np.uint8(np.int32(quot[j]) + offset)

    @njit(cache=True, nogil=True, inline="always")
    def _round_bf16(s, bits32, as_u32):  # pragma: no cover - compiled
        """Round-to-nearest-even to bf16 on the bit pattern, as torch's cast does."""
        bits32[0] = s
        u = as_u32[0]
        as_u32[0] = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return bits32[0]

    @njit(cache=True, nogil=True)
    def _quantize_pack(x, scale, zero, bits, group, packed):  # pragma: no cover - compiled
        """codes = clamp(rint(x / scale + zero)) + offset, packed LSB-first; scales/zeros given per group."""
        n, k = x.shape
        qmin = np.float32(-(2 ** (bits - 1)))
        qmax = np.float32(2 ** (bits - 1) - 1)
        offset = 2 ** (bits - 1)
        for i in range(n):
            quot = np.empty(group, dtype=np.float32)
            for g in range(k // group):
                s = scale[i, g]
                z = zero[i, g]
                base = g * group
                for j in range(group):
                    quot[j] = x[i, base + j] / s + z
                _round_pack_group(quot, qmin, qmax, offset, bits, packed[i], base)

    @njit(cache=True, nogil=True, inline="always")
    def _group_scale_zero(lo, hi, qmin, qmax, symmetric, bf16_scale, eps, bits32, as_u32):  # pragma: no cover
        """int_rtn's float32 steps for one group of min `lo` <= 0 <= max `hi`: (scale as stored,
        zero point); shared by the fused FP8 and BF16 kernels."""
        if symmetric:
            s = (-lo if -lo > hi else hi) / np.float32((qmax - qmin) / 2)
        else:
            s = (hi - lo) / np.float32(qmax - qmin)
        if s == 0:
            s = eps
        if bf16_scale:
            s = _round_bf16(s, bits32, as_u32)
        z = np.float32(0.0)
        if not symmetric:
            z = qmin - lo / s
            z = np.float32(np.rint(qmax if z > qmax else (qmin if z < qmin else z)))
        return s, z

    @njit(cache=True, nogil=True, inline="always")
    def _pack_codes(codes, code_pairs, bits, group, prow, base):  # pragma: no cover - compiled
        """One group's code bytes into the packed row: two 4-bit codes per byte, or one byte each."""
        if bits == 4:  # two codes (< 16) as one little-endian uint16 lo | hi << 8 -> lo | hi << 4
            for j in range(group // 2):
                u = code_pairs[j]
                prow[base // 2 + j] = np.uint8(u | (u >> np.uint16(4)))
        else:
            for j in range(group):
                prow[base + j] = codes[j]

    @njit(cache=True, nogil=True, boundscheck=False)
    def _fp8_block_to_int(  # pragma: no cover - compiled
        w, bscale, lut, bn, bk, bits, group, symmetric, bf16_scale, eps, packed, scale, zero, nan
    ):
        """FP8-block weight -> INT RTN codes in one pass, never materialising the float weight.

        A group's min/max come from its largest positive and negative E4M3 magnitudes (byte maxima,
        which vectorise): multiplying by the positive block scale is monotonic, so this equals
        min/max of the decoded floats exactly. Then the same float32 steps as int_rtn.

        Per group, every loop is simple enough for LLVM to vectorise (~3x the scalar version):
        no table lookup (a gather, which LLVM keeps scalar): each E4M3 byte is decoded by moving
        its bits into a float32 (exponent rebiased by +120, exact for normals; E4M3 subnormals
        land on 2^-7 * (1 + f/8) and are corrected exactly with (v - 2^-7) * 2), written as uint32
        and read back as float32 through a view of the same small buffer.
        """
        n, k = w.shape
        qmin = np.float32(-(2 ** (bits - 1)))
        qmax = np.float32(2 ** (bits - 1) - 1)
        offset = np.float32(2 ** (bits - 1))
        two_m7 = np.float32(2.0**-7)
        for i in range(n):
            as_bits = np.empty(group, dtype=np.uint32)
            as_float = as_bits.view(np.float32)
            codes = np.empty(group, dtype=np.uint8)
            code_pairs = codes.view(np.uint16)
            bits32 = np.empty(1, dtype=np.float32)
            as_u32 = bits32.view(np.uint32)
            wrow = w[i]
            wrow_signed = wrow.view(np.int8)
            prow = packed[i]
            for g in range(k // group):
                base = g * group
                sb = bscale[i // bn, base // bk]
                smax = np.int8(0)  # largest positive byte (as int8: negatives are < 0)
                umax = np.uint8(0)  # largest byte: 0x80 + the largest negative magnitude, if any
                for j in range(group):
                    smax = max(smax, wrow_signed[base + j])
                    umax = max(umax, wrow[base + j])
                pos = np.uint8(smax)
                neg = np.uint8(umax - np.uint8(0x80)) if umax >= np.uint8(0x80) else np.uint8(0)
                if pos == np.uint8(0x7F) or neg == np.uint8(0x7F):  # E4M3 NaN code
                    nan[i] = True
                hi = lut[pos] * sb
                lo = np.float32(0.0) - lut[neg] * sb if neg > 0 else np.float32(0.0)
                s, z = _group_scale_zero(lo, hi, qmin, qmax, symmetric, bf16_scale, eps, bits32, as_u32)
                scale[i, g] = s
                if not symmetric:
                    zero[i, g] = z
                for j in range(group):
                    b = np.uint32(wrow[base + j])
                    as_bits[j] = (((b & np.uint32(0x7F)) << np.uint32(20)) + np.uint32(120 << 23)) | (
                        (b & np.uint32(0x80)) << np.uint32(24)
                    )
                for j in range(group):
                    v = as_float[j]
                    if (wrow[base + j] & np.uint8(0x78)) == 0:  # subnormal (0x80 gives +0: same code as -0)
                        v = (v - (two_m7 if v > 0 else -two_m7)) * np.float32(2.0)
                    q = min(max(np.rint((v * sb) / s + z), qmin), qmax)
                    codes[j] = np.uint8(np.int32(q + offset))
                _pack_codes(codes, code_pairs, bits, group, prow, base)


def _stored(scale: np.ndarray, scale_dtype: torch.dtype) -> torch.Tensor:
    """float32 scales already rounded to bf16 (when that is the stored dtype) as the stored tensor."""
    if scale_dtype == torch.bfloat16:  # keep the top half of each float32
        return torch.from_numpy(
            (scale.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.int16)
        ).view(torch.bfloat16)
    return torch.from_numpy(scale)


def fp8_block_dequant(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> None:
    """[N, K] e4m3 x [ceil(N/bn), ceil(K/bk)] float32 -> `out` float32 [N, K] (contiguous)."""
    _fp8_block_dequant(
        weight.contiguous().view(torch.uint8).numpy(),
        scale.float().contiguous().numpy(),
        E4M3_LUT,
        block[0],
        block[1],
        out.numpy(),
    )


def fp8_block_dequant_bf16(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> None:
    """[N, K] e4m3 x block scales -> `out` bfloat16 [N, K] (contiguous), rounded as torch rounds."""
    _fp8_block_dequant_bf16(
        weight.contiguous().view(torch.uint8).numpy(),
        scale.float().contiguous().numpy(),
        E4M3_LUT,
        block[0],
        block[1],
        out.view(torch.uint16).numpy(),
    )


def quantize_pack(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int
) -> torch.Tensor:
    """float32 [N, K] with per-group float32 scale/zero [N, K/group] -> packed int32 [N, K*bits/32]."""
    n, k = x.shape
    packed = torch.empty(n, k * bits // 8, dtype=torch.uint8)
    z = torch.zeros(scale.shape, dtype=torch.float32) if zero is None else zero.float()
    _quantize_pack(
        x.float().contiguous().numpy(),
        scale.float().contiguous().numpy(),
        z.contiguous().numpy(),
        bits,
        group,
        packed.numpy(),
    )
    return packed.view(torch.int32)


def quantize_pack_supported(x: torch.Tensor, bits: int, group: int) -> bool:
    k = x.shape[-1]
    return (
        AVAILABLE
        and x.device.type == "cpu"
        and x.dim() == 2
        and bits in (4, 8)
        and group % 2 == 0
        and k % group == 0
        and (k * bits) % 32 == 0
    )


def fp8_block_to_int(
    weight: torch.Tensor,
    block_scale: torch.Tensor,
    block: tuple[int, int],
    bits: int,
    group: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """FP8-block [N, K] -> (packed int32 [N, K*bits/32], scale [N, K/group] in scale_dtype, zero or None).

    Outputs are allocated and converted with numpy, not torch: a torch op over the [N, K/group]
    scales is big enough to wake torch's OpenMP pool, whose spinning threads then compete with
    numba's (a separate OpenMP runtime) for the cores (measured: 2 threads at a third of the speed).
    """
    n, k = weight.shape
    packed = np.empty((n, k * bits // 8), dtype=np.uint8)
    scale = np.empty((n, k // group), dtype=np.float32)
    zero = np.zeros((n, k // group) if not symmetric else (0, 0), dtype=np.float32)
    nan = np.zeros(n, dtype=np.bool_)
    _fp8_block_to_int(
        weight.contiguous().view(torch.uint8).numpy(),
        block_scale.float().contiguous().numpy(),
        E4M3_LUT,
        block[0],
        block[1],
        bits,
        group,
        symmetric,
        scale_dtype == torch.bfloat16,
        np.float32(torch.finfo(scale_dtype).eps),
        packed,
        scale,
        zero,
        nan,
    )
    if nan.any():
        raise MoeportError(f"{where}.weight: FP8 weight contains NaN codes (row {int(nan.nonzero()[0][0])})")
    stored = _stored(scale, scale_dtype)  # already rounded to bf16 in the kernel
    return torch.from_numpy(packed).view(torch.int32), stored, None if symmetric else torch.from_numpy(zero)


def fp8_block_to_int_supported(
    weight: torch.Tensor, block: tuple[int, int], bits: int, group: int, scale_dtype: torch.dtype
) -> bool:
    """Groups must sit inside one scale block (so one block scale per group)."""
    return (
        quantize_pack_supported(weight, bits, group)
        and block[1] % group == 0
        and scale_dtype in (torch.float32, torch.bfloat16)
    )
