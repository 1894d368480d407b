"""FP8 E4M3 weights with block-wise (DeepSeek `weight_scale_inv`), per-channel or per-tensor scales.

Scales are dequant multipliers: W = fp32(weight) * scale. Block grids are ceil-divided and the
edge blocks are zero-padded before taking amax (DeepSeek README_WEIGHTS.md). Encoding clamps to
±448 before the cast (the cast itself is round-to-nearest-even); all-zero blocks get scale 1.
ue8m0 scales are powers of two rounded up, computed explicitly (a cast to E8M0 rounds to nearest);
with scale_dtype uint8 they are written as raw E8M0 bytes (MXFP8: blocks of 1x32, MiniMax-M3).

Formats fp8-tensor, fp8-channel and fp8-block: an E4M3 `weight` whose scale's shape says which.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs import cpu_kernels
from moeport.codecs.base import Parts, cdiv, check_dtype, check_finite, check_shape, divide, need, row_chunks
from moeport.codecs.format import ExpertFormat, Params, Part, RowRule, Shape, StorageFormat
from moeport.errors import MoeportError
from moeport.parallel import fan_out

FP8_MAX = 448.0
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu, torch.uint8)


def e8m0_from_bytes(scale: torch.Tensor) -> torch.Tensor:
    """Producers ship E8M0 scales as F8_E8M0 or as raw U8 bytes; both mean 2^(b-127)."""
    return scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), exactly, via frexp."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), exponent - (mantissa == 0.5).to(exponent.dtype))


# E4M3 bits moved into an fp16 (sign, then exponent+mantissa shifted by 7) give the value times 2^-8,
# for normals and subnormals alike; the 2^8 is folded into the scale. Much faster than torch's
# float8 -> float32 cast on CPU. NaN (0x7F/0xFF) would decode as a finite value: checked separately.
E4M3_VIA_F16_FACTOR = 256.0


def check_no_nan_codes(w: torch.Tensor, where: str) -> None:
    if w.numel() and int((w.view(torch.uint8) & 0x7F).max()) == 0x7F:
        raise MoeportError(f"{where}.weight: FP8 weight contains NaN codes")


def e4m3_to_scaled_f16(w: torch.Tensor, where: str = "") -> torch.Tensor:
    check_no_nan_codes(w, where)
    b = w.view(torch.uint8).to(torch.int16)
    return ((b & 0x80) << 8 | (b & 0x7F) << 7).view(torch.float16)


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


_ROWS_PER_JOB = 1024  # rows of one weight decoded per job on a thread pool

# CPU kernels that decode FP8-block into an output of this dtype directly
_DECODE_INTO = {
    torch.float32: cpu_kernels.fp8_block_dequant,
    torch.bfloat16: cpu_kernels.fp8_block_dequant_bf16,
}


@dataclass(frozen=True)
class Fp8BlockCodec:
    block: tuple[int, int] = (128, 128)
    ue8m0: bool = False
    scale_dtype: torch.dtype = torch.float32  # ue8m0 producers use float8_e8m0fnu
    scale_name: str = "weight_scale_inv"
    name: str = "fp8-block"
    stacked_decode: ClassVar[bool] = True
    stacked_encode: ClassVar[bool] = True

    @property
    def required(self) -> tuple[str, ...]:
        return ("weight", self.scale_name)

    def checked(self, parts: Parts, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and its float32 block scales, after every check a decode needs."""
        need(parts, self.required, where, self.name)
        w, s = parts["weight"], parts[self.scale_name]
        check_dtype(w, (torch.float8_e4m3fn,), where, "weight")
        check_dtype(s, SCALE_DTYPES, where, self.scale_name)
        n, k = w.shape[-2:]
        bn, bk = self.block
        check_shape(s, (*w.shape[:-2], cdiv(n, bn), cdiv(k, bk)), where, self.scale_name)
        return w, check_finite(e8m0_from_bytes(s), where, self.scale_name)

    def cut(
        self, shape: tuple[int, ...], dim: int, start: int, length: int
    ) -> dict[str, tuple[int, int, int]] | None:
        """The stored parts of rows (`dim` 0) or columns (1) [start, start + length) of the decoded
        [n, k] weight, as (dim, start, length) per part; None when the cut splits a scale block.
        A fused encoder then reads a slice's own FP8 parts (kt's per-NUMA slices of an expert)."""
        if len(shape) != 2:
            return None
        b = self.block[dim]
        if start % b or (length % b and start + length != shape[dim]):
            return None
        return {"weight": (dim, start, length), self.scale_name: (dim, start // b, cdiv(length, b))}

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        w, scale = self.checked(parts, where)
        n, k = w.shape[-2:]
        bn, bk = self.block
        w2, scale2 = w.reshape(-1, n, k), scale.reshape(-1, *scale.shape[-2:])
        if cpu_kernels.AVAILABLE and w.device.type == "cpu":
            check_no_nan_codes(w, where)
            out = torch.empty(w2.shape, dtype=torch.float32)
            step = bn * max(1, _ROWS_PER_JOB // bn)  # whole scale blocks of rows per job
            jobs = [
                functools.partial(
                    cpu_kernels.fp8_block_dequant,
                    w2[e, r : r + step],
                    scale2[e, r // bn : cdiv(r + step, bn)],
                    self.block,
                    out[e, r : r + step],
                )
                for e in range(w2.shape[0])
                for r in range(0, n, step)
            ]
            fan_out(jobs)  # on the active thread pool (verify, a stacked decode), else inline
            return out.reshape(w.shape)
        scale2 = scale2 * E4M3_VIA_F16_FACTOR
        if w.device.type != "cpu":  # one pass over every expert: the GPU has the memory for it
            full = scale2.repeat_interleave(bn, dim=-2)[:, :n].repeat_interleave(bk, dim=-1)[..., :k]
            return (e4m3_to_scaled_f16(w2, where).float() * full).reshape(w.shape)
        out = torch.empty(w2.shape, dtype=torch.float32, device=w.device)
        for e in range(w2.shape[0]):
            for rows in row_chunks(n, k, multiple=bn) if w.device.type == "cpu" else [slice(0, n)]:
                sc = scale2[e, rows.start // bn : -(-rows.stop // bn)]
                full = sc.repeat_interleave(bn, dim=0)[: rows.stop - rows.start].repeat_interleave(bk, dim=1)[
                    :, :k
                ]
                out[e, rows] = e4m3_to_scaled_f16(w2[e, rows], where)
                out[e, rows] *= full
        return out.reshape(w.shape)

    def decode_into(self, parts: Parts, out: torch.Tensor, where: str = "") -> bool:
        """Decode one [N, K] weight straight into `out` (float32 or bfloat16, on the CPU): no
        temporary, same values as decode(...).to(out.dtype). False: not handled here."""
        kernel = _DECODE_INTO.get(out.dtype)
        if out.dtype == torch.bfloat16 and self.block[0] * self.block[1] < 4096:
            return False  # its table of 256 rounded products pays off on big blocks only (1x32: no)
        if kernel is None or not cpu_kernels.AVAILABLE or out.device.type != "cpu" or not out.is_contiguous():
            return False
        if any(t.device.type != "cpu" for t in parts.values()) or parts["weight"].dim() != 2:
            return False
        w, scale = self.checked(parts, where)
        check_shape(out, tuple(w.shape), where, "output")
        check_no_nan_codes(w, where)
        kernel(w, scale, self.block, out)
        return True

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        x = weight.float()
        n, k = x.shape[-2:]
        bn, bk = self.block
        lead = x.shape[:-2]
        gn, gk = cdiv(n, bn), cdiv(k, bk)
        padded = torch.nn.functional.pad(x, (0, gk * bk - k, 0, gn * bn - n))
        tiles = padded.reshape(*lead, gn, bn, gk, bk)
        amax = tiles.abs().amax(dim=(-3, -1))
        # amax == 0 (not amax > 0): a NaN in the block reaches its scale, where the caller finds it
        scale = torch.where(amax == 0, torch.ones_like(amax), divide(amax, FP8_MAX))
        if self.ue8m0:
            scale = pow2_ceil(scale)
        if self.scale_dtype == torch.uint8:  # E8M0 shipped as raw U8 bytes (MXFP8, MiniMax-M3)
            stored = scale.to(torch.float8_e8m0fnu).view(torch.uint8)
        else:
            stored = scale.to(self.scale_dtype)
        used = e8m0_from_bytes(stored).float()  # quantize with exactly the scale a reader multiplies by
        q = quantize_e4m3(tiles, used[..., :, None, :, None]).reshape(padded.shape)[..., :n, :k]
        return {"weight": q.contiguous(), self.scale_name: stored}


@dataclass(frozen=True)
class Fp8ScaledCodec:
    """Per-channel (`weight_scale` [N, 1] or [N]) or per-tensor (0-d or [1]) FP8 scales."""

    strategy: str = "channel"  # "channel" | "tensor"
    scale_dtype: torch.dtype = torch.float32
    scale_name: str = "weight_scale"
    name: str = "fp8"
    stacked_decode: ClassVar[bool] = False

    @property
    def required(self) -> tuple[str, ...]:
        return ("weight", self.scale_name)

    @property
    def stacked_encode(self) -> bool:
        return self.strategy == "channel"  # a per-tensor scale would span the whole stack

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        w, s = parts["weight"], parts[self.scale_name]
        check_dtype(w, (torch.float8_e4m3fn,), where, "weight")
        check_dtype(s, SCALE_DTYPES[:3], where, self.scale_name)
        scale = check_finite(s, where, self.scale_name)
        n = w.shape[-2]
        lead = tuple(w.shape[:-2])
        if scale.numel() == 1:
            return w.float() * scale.reshape(())
        if tuple(scale.shape) in ((*lead, n), (*lead, n, 1)):
            return w.float() * scale.reshape(*lead, n, 1)
        raise MoeportError(
            f"{where}.{self.scale_name}: shape {list(s.shape)}, expected [{n}, 1], [{n}] or a single value"
        )

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        x = weight.float()
        if self.strategy == "tensor":
            amax = x.abs().amax().reshape(1)
        else:
            amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax == 0, torch.ones_like(amax), divide(amax, FP8_MAX)).to(self.scale_dtype)
        return {"weight": quantize_e4m3(x, scale.float()), self.scale_name: scale}


# --- the formats -------------------------------------------------------------------------------

_SCALE_NAMES = ("weight_scale_inv", "scale", "weight_scale")


@dataclass(frozen=True)
class _Scale:
    """The scale of an E4M3 weight as its header says: name, per-weight shape, first params."""

    name: str
    part: Part
    shape: Shape  # without the leading expert dim of fused experts
    n: int
    k: int
    params: Params


def _scale_of(active: dict[str, Part], method: str, where: str) -> _Scale | None:
    weight = active.get("weight")
    if weight is None or weight.dtype != "F8_E4M3":
        return None
    scale_name = next((n for n in _SCALE_NAMES if n in active), None)
    if scale_name is None:
        raise MoeportError(
            f"{where}: FP8 weight without a scale tensor (expected weight_scale_inv, weight_scale or scale)"
        )
    scale = active[scale_name]
    n, k = weight.shape[-2], weight.shape[-1]
    lead = weight.shape[:-2]  # fused experts carry a leading expert dim on both
    s_shape = scale.shape[len(lead) :] if scale.shape[: len(lead)] == lead else scale.shape
    params: Params = {"scale": scale_name, "scale_dtype": scale.dtype}
    if method == "compressed-tensors":
        params["container"] = "compressed-tensors"
    return _Scale(scale_name, scale, tuple(s_shape), n, k, params)


def _recognize_tensor(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    s = _scale_of(active, method, where)
    if s is None or not (len(s.shape) <= 1 and math.prod(s.shape) == 1):  # 0-d or [1]; [1, 1] is a block
        return None
    return ExpertFormat("fp8-tensor", s.params)


def _recognize_channel(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    s = _scale_of(active, method, where)
    if s is None or s.shape not in ((s.n,), (s.n, 1)):
        return None
    return ExpertFormat("fp8-channel", s.params)


def _recognize_block(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    """Last of the FP8 formats: an E4M3 weight whose scale is no block grid fits none of them."""
    s = _scale_of(active, method, where)
    if s is None:
        return None
    if len(s.shape) != 2:
        raise MoeportError(f"{where}: FP8 scale '{s.name}' shape {list(s.part.shape)} fits no known layout")
    block = quant.get("weight_block_size") or _guess_block(s.n, s.k, s.shape)
    if block is None or (math.ceil(s.n / block[0]), math.ceil(s.k / block[1])) != s.shape:
        raise MoeportError(
            f"{where}: FP8 scale '{s.name}' has shape {list(s.shape)}, which is no "
            f"block grid of weight [{s.n}, {s.k}] (block size {block})"
        )
    params = {**s.params, "block": list(block)}
    if s.part.dtype in ("F8_E8M0", "U8") or quant.get("scale_fmt") == "ue8m0":
        params["ue8m0"] = True
    return ExpertFormat("fp8-block", params)


def _guess_block(n: int, k: int, s_shape: Shape) -> list[int] | None:
    for b in (128, 64, 256, 32):
        if (math.ceil(n / b), math.ceil(k / b)) == tuple(s_shape):
            return [b, b]
    return None


def _weight_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    return shapes["weight"]


def _block_rows(part: str, params: Params) -> RowRule | None:
    """Block scales hold one row per `block[0]` rows of the weight."""
    return RowRule(-2, int(params["block"][0])) if part == params.get("scale") else None


FP8_TENSOR = StorageFormat(
    "fp8-tensor",
    _recognize_tensor,
    _weight_shape,
    lambda p: Fp8ScaledCodec(strategy="tensor", scale_name=p["scale"]),
)
FP8_CHANNEL = StorageFormat(
    "fp8-channel",
    _recognize_channel,
    _weight_shape,
    lambda p: Fp8ScaledCodec(strategy="channel", scale_name=p["scale"]),
)
FP8_BLOCK = StorageFormat(
    "fp8-block",
    _recognize_block,
    _weight_shape,
    lambda p: Fp8BlockCodec(block=tuple(p["block"]), ue8m0=bool(p.get("ue8m0")), scale_name=p["scale"]),
    row_rule=_block_rows,
)
FORMATS = (FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK)  # in recognition order: block is the fallback
