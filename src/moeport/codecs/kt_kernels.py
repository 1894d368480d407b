"""numba kernels for kt-kernel's AMX quantizer (codecs/kt_amx.py): bf16 rows -> codes + scales, and
the same from FP8-block rows without the bf16 weight in between.

Why by hand: kt's rounding (per-row amax / 112 in double, rint, the INT4 nibble rule) takes about
ten torch passes over the weight; these loops do it in one, and the FP8 one also saves decoding
the expert into a fresh bf16 matrix first (that decode, at about 0.6 GB/s per core with its page
faults, was most of an FP8 -> kt conversion). Both are serial and release the GIL: the CPU path
runs one expert per thread (moeport.parallel). The tests require the torch path's bytes.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a regular dependency
    njit = None

AVAILABLE = njit is not None
INV127 = np.float32(np.float32(1.0) / np.float32(127.0))  # 1.0f/127 in float32

if AVAILABLE:

    @njit(cache=True, nogil=True, inline="always")
    def _row_codes(buf, m, bits, inv127, out, scale, i):  # pragma: no cover - compiled
        """One row held as bf16-exact float32 `buf`, |max| bf16 bits `m` -> kt's codes in `out`
        and its scale: INT8 d = amax/127, INT4 d = amax/112 (double); q = sat8(rint(x/d)), INT4
        nibbles sign(q) * ((|q| + 8) >> 4) packed per 128-k tile (byte j = q[j] | q[64 + j] << 4)."""
        u = buf.view(np.uint32)
        k = buf.shape[0]
        keep = u[0]
        u[0] = np.uint32(m) << np.uint32(16)
        amax = buf[0]
        u[0] = keep
        if bits == 8:
            d = amax * inv127
        else:
            d = np.float32(np.float64(amax) / 112.0)
        scale[i] = d
        if d == np.float32(0.0):
            for j in range(out.shape[0]):
                out[j] = 0
            return
        inv = np.float32(1.0) / d
        for j in range(k):
            v = np.rint(buf[j] * inv)
            buf[j] = np.float32(127.0) if v > 127.0 else (np.float32(-128.0) if v < -128.0 else v)
        if bits == 8:
            for j in range(k):
                out[j] = np.int8(buf[j])
        else:
            for t in range(k // 128):
                base = t * 128
                for j in range(64):
                    lo = np.int32(buf[base + j])
                    hi = np.int32(buf[base + 64 + j])
                    lo4 = ((abs(lo) + 8) & 0xF0) >> 4
                    hi4 = ((abs(hi) + 8) & 0xF0) >> 4
                    lo4 = -lo4 if lo < 0 else lo4
                    hi4 = -hi4 if hi < 0 else hi4
                    out[t * 64 + j] = np.int8(np.uint8(((hi4 & 0xF) << 4) | (lo4 & 0xF)))

    @njit(cache=True, nogil=True, boundscheck=False)
    def _kt_quant_rows(xb, bits, inv127, q, scale, bad):  # pragma: no cover - compiled
        """bf16 bit patterns [n, k] -> code bytes [n, k*bits/8] + scales [n]; `bad` marks rows
        holding NaN/Inf (left unwritten)."""
        n, k = xb.shape
        buf = np.empty(k, dtype=np.float32)
        u = buf.view(np.uint32)
        for i in range(n):
            row = xb[i]
            m = np.uint16(0)
            for j in range(k):  # |x| max on the bit pattern: monotonic for non-NaN, vectorises
                m = max(m, row[j] & np.uint16(0x7FFF))
            if m >= np.uint16(0x7F80):
                bad[i] = True
                continue
            for j in range(k):
                u[j] = np.uint32(row[j]) << np.uint32(16)
            _row_codes(buf, m, bits, inv127, q[i], scale, i)

    @njit(cache=True, nogil=True, inline="always")
    def _to_bf16_bits(x):  # pragma: no cover - compiled
        """float32 bits -> the float32 bits of its bf16 rounding (nearest even, as torch's cast)."""
        return (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)

    @njit(cache=True, nogil=True, boundscheck=False)
    def _fp8_block_to_kt(w, bscale, lut, bn, bk, bits, inv127, q, scale, bad):  # pragma: no cover - compiled
        """FP8 E4M3 [n, k] with block scales -> kt's codes and scales, each row decoded into a
        small float32 buffer exactly as torch's decode then cast to bf16 gives it (the E4M3 value
        times its block's scale in float32, rounded to bf16), never a whole matrix. Blocks of at
        least 4096 codes share a table of their 256 rounded products (one lookup per code);
        smaller ones multiply and round per code. `bad` marks rows with NaN codes or products
        beyond bf16's range (both land on NaN/Inf bits)."""
        n, k = w.shape
        gk = bscale.shape[1]
        buf = np.empty(k, dtype=np.float32)
        u = buf.view(np.uint32)
        tabled = bn * bk >= 4096
        table = np.empty((gk, 256), dtype=np.float32)
        table_bits = table.view(np.uint32)
        for i in range(n):
            wrow = w[i]
            srow = bscale[i // bn]
            if tabled:
                if i % bn == 0:  # the first row of a row of blocks: their products, rounded once
                    for jb in range(gk):
                        for b in range(256):
                            table[jb, b] = lut[b] * srow[jb]
                            table_bits[jb, b] = _to_bf16_bits(table_bits[jb, b])
                for jb in range(gk):
                    t = table[jb]
                    for j in range(jb * bk, min(k, (jb + 1) * bk)):
                        buf[j] = t[wrow[j]]
            else:
                for jb in range(gk):
                    s = srow[jb]
                    for j in range(jb * bk, min(k, (jb + 1) * bk)):
                        buf[j] = lut[wrow[j]] * s
                for j in range(k):
                    u[j] = _to_bf16_bits(u[j])
            m = np.uint32(0)
            for j in range(k):  # |max| on the bf16 bits; NaN and Inf lie above every finite value
                m = max(m, (u[j] >> np.uint32(16)) & np.uint32(0x7FFF))
            if m >= np.uint32(0x7F80):
                bad[i] = True
                continue
            _row_codes(buf, np.uint16(m), bits, inv127, q[i], scale, i)
