"""kt-kernel CPU expert weights: AMXINT4 / AMXINT8 (the byte image of kt's AMX BufferB).

Format (see kvcache-ai/ktransformers kt-kernel `operators/amx/`; checked byte for byte against
kt-kernel 0.7.2 by tests/test_kt_amx.py):

* one matrix [n, k] (nn.Linear layout, bf16) -> per-row symmetric codes + n float32 scales d;
  INT8: ``d = amax * (1.0f/127)``, ``q = sat8(rint(x * (1.0f/d)))``;
  INT4: ``d = (float)((double)amax / 112)``, ``q8`` as above, ``q4 = sign(q8) * ((|q8| + 8) >> 4)``
  in [-7, 7], dequantized as ``16 * q4 * d``; d == 0 gives q == 0.
* byte order: n-blocks (N_BLOCK rows) -> 32-row tiles -> k-blocks (K_BLOCK = 3584 k) -> tiles of
  64 bytes per row (64 int8 k, or 128 int4 k: byte j = q4[j] | q4[64 + j] << 4); each 16-row half
  of a 32x64-byte tile is a 16x16 matrix of dwords stored transposed (VNNI).
* tensor parallel `numa.t` slices cut the intermediate dim I: gate/up rows and down columns
  [t*I/T, (t+1)*I/T).

The quantizer is a numba kernel over rows (one pass, reading bf16 bit patterns) plus one strided
copy for the tile order; without numba an equivalent torch path runs (same bytes).
"""

from __future__ import annotations

import torch

from moeport.codecs import cpu_kernels, kt_kernels
from moeport.codecs.base import row_chunks
from moeport.errors import MoeportError

N_STEP = 32  # rows per tile
K_BLOCK = 3584  # k per k-block (elements)
TILE_BYTES = 64  # bytes per tile row
N_BLOCK = {8: 64, 4: 128}
K_PER_TILE = {8: 64, 4: 128}  # k per tile row
METHOD = {4: "AMXINT4", 8: "AMXINT8"}
PROJS = ("gate", "up", "down")

_INV127 = kt_kernels.INV127


def _check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise MoeportError(f"kt AMX: bits {bits}, expected 4 (AMXINT4) or 8 (AMXINT8)")


def method_name(bits: int) -> str:
    _check_bits(bits)
    return METHOD[bits]


def row_bytes(k: int, bits: int) -> int:
    return k * bits // 8


def quant_nbytes(n: int, k: int, bits: int) -> int:
    """Size of the weight (quant) image of one [n, k] matrix; the scale is 4*n bytes."""
    return n * row_bytes(k, bits)


# --------------------------------------------------------------------------- alignment / TP


def _tp_ok(hidden: int, intermediate: int, tp: int, bits: int) -> bool:
    a = K_PER_TILE[bits]
    if tp < 1 or intermediate % tp:
        return False
    part = intermediate // tp
    return hidden % a == 0 and part % a == 0 and hidden % N_STEP == 0 and part % N_STEP == 0


def suggest_tp(hidden: int, intermediate: int, bits: int, want: int = 1, max_tp: int = 64) -> int | None:
    """A threadpool_count T that kt accepts for these sizes: the largest <= want, else the smallest
    above it (up to max_tp); None when no T works (the hidden size itself is misaligned)."""
    _check_bits(bits)
    ok = [t for t in range(1, max(max_tp, want) + 1) if _tp_ok(hidden, intermediate, t, bits)]
    if not ok:
        return None
    below = [t for t in ok if t <= want]
    return max(below) if below else min(ok)


def check_alignment(hidden: int, intermediate: int, tp: int, bits: int, where: str = "experts") -> None:
    """Raise MoeportError unless kt's AMX kernels accept H, I and T = threadpool_count.

    INT4: H % 128 == 0 and (I/T) % 128 == 0; INT8: % 64 (rows a multiple of 32 follows).
    """
    _check_bits(bits)
    if _tp_ok(hidden, intermediate, tp, bits):
        return
    a = K_PER_TILE[bits]
    s = suggest_tp(hidden, intermediate, bits, want=tp)
    hint = f"; use --numa {s}" if s is not None else "; no --numa value works for this hidden size"
    if intermediate % max(tp, 1) or tp < 1:
        what = f"intermediate {intermediate} is not divisible by {tp}"
    else:
        what = f"hidden {hidden} and intermediate/T {intermediate // tp} must be multiples of {a}"
    raise MoeportError(f"{where}: {METHOD[bits]} with --numa {tp}: {what}{hint}")


# --------------------------------------------------------------------------- tile order


def _segments(n: int, bits: int) -> list[tuple[int, int, int]]:
    """(first row, rows per n-block, number of blocks): the full n-blocks, then the tail block."""
    nb = N_BLOCK[bits]
    full = n // nb
    segs = [(0, nb, full)] if full else []
    if n % nb:
        segs.append((full * nb, n % nb, 1))
    return segs


def _tile_views(rows: torch.Tensor, flat: torch.Tensor, k: int, bits: int):
    """Pairs (row-major view, tile-order view) of the same int32 words, shaped alike.

    rows: int32 [n, kb/4] (row-major bytes), flat: int32 [n*kb/4] (kt's BufferB image).
    """
    n, kw = rows.shape  # kw = words per row
    blk_w = K_BLOCK * bits // 8 // 4  # words per k-block row
    for r0, nbs, count in _segments(n, bits):
        src_rows = rows[r0 : r0 + nbs * count].view(count, nbs // N_STEP, 2, 16, kw)
        dst_rows = flat[r0 * kw : (r0 + nbs * count) * kw].view(count, nbs * kw)
        for kbb in range(0, kw, blk_w):
            kbs = min(blk_w, kw - kbb)
            src = src_rows[..., kbb : kbb + kbs].unflatten(-1, (kbs // 16, 16))  # [c, a, h, r, b, w]
            dst = dst_rows[:, kbb * nbs : (kbb + kbs) * nbs].unflatten(
                -1, (nbs // N_STEP, kbs // 16, 2, 16, 16)
            )
            yield src.permute(0, 1, 4, 2, 5, 3), dst  # [c, a, b, h, w, r]


def to_tile_order(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Row-major code bytes [n, kb] (kb = k*bits/8) -> kt's BufferB image, int8 1-D."""
    n, kb = q.shape
    out = torch.empty(n * kb, dtype=torch.int8, device=q.device)
    rows = q.contiguous().view(torch.int32)
    flat = out.view(torch.int32)
    for src, dst in _tile_views(rows, flat, kb * 8 // bits, bits):
        dst.copy_(src)
    return out


def from_tile_order(image: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Inverse of to_tile_order: int8 [n, kb] row-major code bytes."""
    kb = row_bytes(k, bits)
    q = torch.empty(n, kb, dtype=torch.int8)
    rows = q.view(torch.int32)
    flat = image.contiguous().view(torch.int8).view(torch.int32)
    for src, dst in _tile_views(rows, flat, k, bits):
        src.copy_(dst)
    return q


# --------------------------------------------------------------------------- quantize


def _codes_torch(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: float32 [n, k] -> (int8 codes [n, k] (q8 or q4), float32 scale [n])."""
    amax = x.abs().amax(1)
    if bits == 8:
        d = amax * torch.tensor(float(_INV127), dtype=torch.float32)
    else:
        d = (amax.double() / 112.0).float()
    inv = torch.ones_like(d) / d
    q = torch.round(x * inv[:, None]).clamp(-128, 127)
    q = torch.where((d == 0)[:, None], torch.zeros_like(q), q).to(torch.int8)
    if bits == 4:
        mag = ((q.abs().to(torch.int16) + 8) & 0xF0) >> 4
        q = torch.where(q < 0, -mag, mag).to(torch.int8)
    return q, d


def _pack_int4(q4: torch.Tensor) -> torch.Tensor:
    """int8 q4 [n, k] -> bytes [n, k/2]: per 128-k tile, byte j = q4[j] (low nibble) | q4[64+j] << 4."""
    n, k = q4.shape
    t = q4.view(n, k // 128, 2, 64)
    return ((t[:, :, 0] & 0xF) | (t[:, :, 1] << 4)).reshape(n, k // 2)


def _unpack_int4(b: torch.Tensor) -> torch.Tensor:
    n, kb = b.shape
    t = b.view(n, kb // 64, 1, 64)
    lo = (t << 4) >> 4  # arithmetic shifts on int8 sign-extend the nibbles
    hi = t >> 4
    return torch.cat([lo, hi], dim=2).reshape(n, kb * 2)


def _as_bf16(w: torch.Tensor, where: str) -> torch.Tensor:
    if w.dim() != 2:
        raise MoeportError(f"{where}: shape {list(w.shape)}, expected a 2-D [n, k] matrix")
    if not w.dtype.is_floating_point:
        raise MoeportError(f"{where}: dtype {str(w.dtype).removeprefix('torch.')}, expected bfloat16/float32")
    return w.detach().to(dtype=torch.bfloat16).contiguous()  # stays on its device (CPU or CUDA)


def check_matrix(n: int, k: int, bits: int, where: str = "weight") -> None:
    _check_bits(bits)
    a = K_PER_TILE[bits]  # kt rejects rows or columns that are not a multiple of this (= N_BLOCK)
    if n % a or k % a or n == 0 or k == 0:
        prefix = f"{where}: " if where else ""
        raise MoeportError(
            f"{prefix}shape [{n}, {k}], {METHOD[bits]} needs rows and columns a multiple of {a}"
        )


def _refuse_bad_rows(bad: torch.Tensor, where: str, what: str = "NaN or Inf") -> None:
    if bool(bad.any()):
        prefix = f"{where}: " if where else ""
        raise MoeportError(
            f"{prefix}row {int(bad.nonzero()[0])} contains {what} ({int(bad.sum())} row(s) in all); "
            "kt-kernel's AMX format cannot hold them"
        )


def kt_codes(w: torch.Tensor, bits: int, where: str = "weight", use_numba: bool | None = None):
    """Row-major code bytes int8 [n, k*bits/8] and float32 scales [n] (before the tile order)."""
    _check_bits(bits)
    wb = _as_bf16(w, where)
    n, k = wb.shape
    check_matrix(n, k, bits, where)
    if use_numba is None or wb.device.type != "cpu":
        use_numba = kt_kernels.AVAILABLE and wb.device.type == "cpu"
    if use_numba:
        q = torch.empty(n, row_bytes(k, bits), dtype=torch.int8)
        scale = torch.zeros(n, dtype=torch.float32)
        bad = torch.zeros(n, dtype=torch.bool)
        kt_kernels._kt_quant_rows(
            wb.view(torch.uint16).numpy(), bits, _INV127, q.numpy(), scale.numpy(), bad.numpy()
        )
        _refuse_bad_rows(bad, where)
        return q, scale
    q = torch.empty(n, row_bytes(k, bits), dtype=torch.int8, device=wb.device)
    scale = torch.empty(n, dtype=torch.float32, device=wb.device)
    for rs in row_chunks(n, k):
        x = wb[rs].float()
        if not torch.isfinite(x).all():
            _refuse_bad_rows((~torch.isfinite(wb.float())).any(1).cpu(), where)
        c, d = _codes_torch(x, bits)
        q[rs] = c if bits == 8 else _pack_int4(c)
        scale[rs] = d
    return q, scale


def kt_quantize_fp8_block(
    weight: torch.Tensor, block_scale: torch.Tensor, block: tuple[int, int], bits: int, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8-block [n, k] (E4M3 + float32 block scales, on the CPU) -> what kt_quantize gives for
    its bf16 decode, in one kernel (codecs/kt_kernels.py) without the bf16 matrix."""
    _check_bits(bits)
    n, k = weight.shape
    check_matrix(n, k, bits, where)
    q = torch.empty(n, row_bytes(k, bits), dtype=torch.int8)
    scale = torch.zeros(n, dtype=torch.float32)
    bad = torch.zeros(n, dtype=torch.bool)
    kt_kernels._fp8_block_to_kt(
        weight.contiguous().view(torch.uint8).numpy(),
        block_scale.float().contiguous().numpy(),
        cpu_kernels.E4M3_LUT,
        block[0],
        block[1],
        bits,
        _INV127,
        q.numpy(),
        scale.numpy(),
        bad.numpy(),
    )
    _refuse_bad_rows(bad, where, "NaN codes or values beyond bf16")
    return to_tile_order(q, bits), scale


def kt_quantize(
    w: torch.Tensor, bits: int, where: str = "weight", use_numba: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (or bf16-exact float32) [n, k] -> (int8 1-D BufferB image, float32 scale [n])."""
    q, scale = kt_codes(w, bits, where, use_numba)
    return to_tile_order(q, bits), scale


def kt_quantize_many(
    ws: torch.Tensor, bits: int, where: str = "weights"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack of same-shape matrices [B, n, k] -> (int8 images [B, bytes], float32 scales [B, n]).

    The GPU path: one kernel sequence for the whole stack (rows are independent, so each image
    is exactly what `kt_quantize` gives for its matrix).
    """
    _check_bits(bits)
    b, n, k = ws.shape
    check_matrix(n, k, bits, where)
    x = ws.to(torch.bfloat16).float().reshape(b * n, k)
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        prefix = f"{where}: " if where else ""
        raise MoeportError(f"{prefix}matrix {row // n} of {b}: row {row % n} contains NaN or Inf")
    c, d = _codes_torch(x, bits)
    q = (c if bits == 8 else _pack_int4(c)).reshape(b, n, -1)
    images = torch.stack([to_tile_order(q[i], bits) for i in range(b)])
    return images, d.reshape(b, n)


def kt_dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, n: int, k: int, bits: int, where: str = "weight"
) -> torch.Tensor:
    """Inverse of kt_quantize: float32 [n, k] = q*d (INT8) or 16*q4*d (INT4)."""
    check_matrix(n, k, bits, where)
    if qweight.dtype not in (torch.int8, torch.uint8):
        raise MoeportError(
            f"{where}.weight: dtype {str(qweight.dtype).removeprefix('torch.')}, expected int8"
        )
    if qweight.numel() != quant_nbytes(n, k, bits):
        raise MoeportError(
            f"{where}.weight: {qweight.numel()} bytes, expected {quant_nbytes(n, k, bits)} for "
            f"{METHOD[bits]} [{n}, {k}]"
        )
    if scale.numel() != n:
        raise MoeportError(f"{where}.scale: {scale.numel()} values, expected {n}")
    s = scale.reshape(n).float()
    if not torch.isfinite(s).all():
        raise MoeportError(f"{where}.scale: NaN or Inf values")
    q = from_tile_order(qweight.reshape(-1), n, k, bits)
    if bits == 4:
        return (_unpack_int4(q).float() * 16) * s[:, None]
    return q.float() * s[:, None]


class KtAmxCodec:
    """kt-kernel's AMX expert layout as a codec: float [N, K] -> {weight: BufferB image (int8 1-D),
    scale: float32 [N]}; a stack [B, N, K] encodes in one call (the GPU path). The tile order
    loses the shape, so decoding takes K from the image size and the bit width."""

    required = ("weight", "scale")
    stacked_encode = True
    stacked_decode = False
    checks_finite = True  # encode refuses NaN/Inf itself, naming the row (no extra pass needed)

    def __init__(self, bits: int):
        _check_bits(bits)
        self.bits = bits
        self.name = f"kt-{METHOD[bits].lower()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KtAmxCodec) and other.bits == self.bits

    def __hash__(self) -> int:
        return hash(("kt-amx", self.bits))

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if weight.dim() == 3:
            images, scales = kt_quantize_many(weight, self.bits, where="")
            return {"weight": images, "scale": scales}
        q, scale = kt_quantize(weight, self.bits, where="")
        return {"weight": q, "scale": scale}

    def decode(self, parts, where: str = "") -> torch.Tensor:
        for name in self.required:
            if name not in parts:
                raise MoeportError(f"{where}: {self.name} needs tensor(s) {list(self.required)}")
        q, s = parts["weight"], parts["scale"]
        n = s.numel()
        k = q.numel() * 8 // self.bits // max(n, 1)
        return kt_dequantize(q, s, n, k, self.bits, where=where or "weight")
