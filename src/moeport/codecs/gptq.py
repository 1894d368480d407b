"""GPTQ (AutoGPTQ/GPTQModel, v1 and v2 zero storage) and AWQ GEMM int4 weights.

GPTQ: `qweight` I32 [K/8, N] packed along K, `qzeros` I32 [G, N/8] packed along N, `scales` F16
[G, N], `g_idx` I32 [K] (act-order honoured: row k uses group g_idx[k]); v1 stores zero-1.
AWQ GEMM: `qweight` I32 [K, N/8] and `qzeros` I32 [G, N/8] packed along N in the 0,2,4,6,1,3,5,7
nibble order, `scales` F16 [G, N], no +1. Both are [K, N] (transposed vs nn.Linear); we return [N, K].
Encoding is RTN with AutoGPTQ's parameter rule (0 always representable; scale=(max-min)/15).

Formats: a `qweight` group is awq when quant_method says so, gptq otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from moeport.codecs.base import Parts, cdiv, check_dtype, check_finite, check_shape, divide, need
from moeport.codecs.format import ExpertFormat, Params, Part, RowRule, Shape, StorageFormat
from moeport.codecs.packing import deinterleave_awq, interleave_awq, pack_int32, unpack_int32
from moeport.errors import MoeportError

BITS = 4
MAXQ = 2**BITS - 1


def _params_unsigned(
    w: torch.Tensor, group: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> scales fp16 [N, G], zeros [N, G] (true zero points >= min_zero): AutoGPTQ's rule
    (0 always representable; sym: scale = 2 * amax / 15 when the group has a negative value, zero 8;
    an all-zero group gets the scale of [-1, 1])."""
    n, k = w.shape
    if k % group:
        raise MoeportError(f"input dim {k} is not a multiple of group size {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
    both_zero = (lo == 0) & (hi == 0)
    lo, hi = torch.where(both_zero, -1.0, lo), torch.where(both_zero, 1.0, hi)
    scale = divide(hi - lo, MAXQ).to(torch.float16)
    zero = (
        torch.full_like(lo, (MAXQ + 1) // 2)
        if sym
        else torch.round(-lo / scale.float()).clamp(min_zero, MAXQ)
    )
    return scale, zero


def _rtn_unsigned(
    w: torch.Tensor, group: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> codes [N, K] in 0..15, scales fp16 [N, G], zeros [N, G] (true zero points >= min_zero)."""
    n, k = w.shape
    scale, zero = _params_unsigned(w, group, sym, min_zero)
    g = w.float().reshape(n, k // group, group)
    # round(x / scale) + zero, as AutoGPTQ's and AutoAWQ's quantizers (and GPTQ's codes) do:
    # round(x / scale + zero) would differ where adding the zero rounds x / scale onto a half
    codes = (torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, MAXQ)
    return codes.reshape(n, k).to(torch.int32), scale, zero.to(torch.int32)


@dataclass(frozen=True)
class GptqCodec:
    group_size: int = 128
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: zero-1 stored) | "gptq_v2"
    name: str = "gptq"
    required: tuple[str, ...] = ("qweight", "qzeros", "scales")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False
    bits: ClassVar[int] = BITS

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        for name in self.required:
            check_dtype(
                parts[name],
                (torch.int32,) if name != "scales" else (torch.float16, torch.bfloat16, torch.float32),
                where,
                name,
            )
        k, n = qweight.shape[0] * 32 // BITS, qweight.shape[1]
        groups = scales.shape[0]
        check_shape(scales, (groups, n), where, "scales")
        check_shape(qzeros, (groups, cdiv(n * BITS, 32)), where, "qzeros")
        g_idx = parts.get("g_idx")
        if g_idx is None:
            g_idx = torch.arange(k) // cdiv(k, groups)
        else:
            check_shape(g_idx, (k,), where, "g_idx")
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
                raise MoeportError(f"{where}.g_idx: group ids outside 0..{groups - 1}")
        q = unpack_int32(qweight, BITS, k, dim=0)  # [K, N]
        z = unpack_int32(qzeros, BITS, n, dim=-1)  # [G, N]
        if self.checkpoint_format == "gptq":
            z = z + 1
        s = check_finite(scales, where, "scales")
        g = g_idx.long()
        return ((q - z[g]).float() * s[g]).T.contiguous()

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        v1 = self.checkpoint_format == "gptq"
        # v1 stores zero-1: a true zero of 0 would wrap to 15 (read back as 16), so zeros start at 1
        codes, scale, zero = _rtn_unsigned(weight, self._group(k), self.sym, min_zero=1 if v1 else 0)
        return self._parts(codes, scale, zero)

    def code_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-group scales [N, G] (fp16) of `weight` [N, K] as `encode` chooses them (symmetric)."""
        self._need_sym()
        return _params_unsigned(weight, self._group(weight.shape[-1]), sym=True)[0]

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of signed codes [N, K] in -8..7 with `scale` [N, G] (symmetric: zero point 8)."""
        self._need_sym()
        zero = torch.full(scale.shape, (MAXQ + 1) // 2, dtype=torch.int32, device=codes.device)
        return self._parts(codes.to(torch.int32) + (MAXQ + 1) // 2, scale, zero)

    def _parts(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
        """AutoGPTQ's tensors from unsigned codes [N, K], fp16 scales and true zero points [N, G]."""
        k = codes.shape[-1]
        stored_zero = zero - 1 if self.checkpoint_format == "gptq" else zero
        return {
            "qweight": pack_int32(codes.T, BITS, dim=0),
            "qzeros": pack_int32(stored_zero.T, BITS, dim=-1),
            "scales": scale.T.contiguous(),
            "g_idx": (torch.arange(k, device=codes.device) // self._group(k)).to(torch.int32),
        }

    def _group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def _need_sym(self) -> None:
        if not self.sym:
            raise MoeportError("GPTQ codes are written to symmetric GPTQ storage only (sym: true)")


@dataclass(frozen=True)
class AwqCodec:
    group_size: int = 128
    name: str = "awq"
    required: tuple[str, ...] = ("qweight", "qzeros", "scales")
    stacked_decode: ClassVar[bool] = False
    stacked_encode: ClassVar[bool] = False

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor:
        need(parts, self.required, where, self.name)
        qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
        check_dtype(qweight, (torch.int32,), where, "qweight")
        check_dtype(qzeros, (torch.int32,), where, "qzeros")
        k, n = qweight.shape[0], qweight.shape[1] * 32 // BITS
        groups = scales.shape[0]
        check_shape(scales, (groups, n), where, "scales")
        check_shape(qzeros, (groups, n // 8), where, "qzeros")
        q = deinterleave_awq(unpack_int32(qweight, BITS, n))
        z = deinterleave_awq(unpack_int32(qzeros, BITS, n))
        s = check_finite(scales, where, "scales")
        g = torch.arange(k) // (k // groups)
        return ((q - z[g]).float() * s[g]).T.contiguous()

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = weight.shape
        codes, scale, zero = _rtn_unsigned(weight, self.group_size, sym=False)
        return {
            "qweight": pack_int32(interleave_awq(codes.T), BITS),
            "qzeros": pack_int32(interleave_awq(zero.T), BITS),
            "scales": scale.T.contiguous(),
        }


# --- the formats -------------------------------------------------------------------------------

_PARAMS = ("bits", "group_size", "sym", "desc_act", "zero_point", "version")


def _params(active: dict[str, Part], quant: dict[str, Any], where: str) -> Params:
    """The config's parameters of a `qweight` group (which must carry its `scales`)."""
    if "scales" not in active:
        raise MoeportError(f"{where}: 'qweight' without 'scales'")
    return {k: quant[k] for k in _PARAMS if k in quant}


def _recognize_awq(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    params = _params(active, quant, where)
    return ExpertFormat("awq", params) if method == "awq" else None


def _recognize_gptq(
    active: dict[str, Part], quant: dict[str, Any], method: str, where: str
) -> ExpertFormat | None:
    params = _params(active, quant, where)
    if "checkpoint_format" in quant:
        params["checkpoint_format"] = quant["checkpoint_format"]
    return ExpertFormat("gptq", params)


def _gptq_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    q = shapes["qweight"]  # [K/8, N]
    return (*q[:-2], q[-1], q[-2] * 8)


def _awq_shape(shapes: dict[str, Shape], params: Params) -> Shape:
    q = shapes["qweight"]  # [K, N/8]
    return (*q[:-2], q[-1] * 8, q[-2])


# qweight/scales are [K/g, N] (N last); AWQ packs N by 8 in qweight/qzeros, GPTQ in qzeros only.
def _gptq_rows(part: str, params: Params) -> RowRule:
    return RowRule(-1, 8 if part == "qzeros" else 1)


def _awq_rows(part: str, params: Params) -> RowRule:
    return RowRule(-1, 8 if part in ("qzeros", "qweight") else 1)


AWQ = StorageFormat(
    "awq",
    _recognize_awq,
    _awq_shape,
    lambda p: AwqCodec(group_size=int(p.get("group_size", 128))),
    row_rule=_awq_rows,
    marker="qweight",
)
GPTQ = StorageFormat(
    "gptq",
    _recognize_gptq,
    _gptq_shape,
    lambda p: GptqCodec(
        group_size=int(p.get("group_size", 128)),
        sym=bool(p.get("sym", True)),
        checkpoint_format=str(p.get("checkpoint_format", "gptq")),
    ),
    row_rule=_gptq_rows,
    marker="qweight",
)
FORMATS = (AWQ, GPTQ)  # in recognition order: a qweight group is gptq unless quant_method is awq
