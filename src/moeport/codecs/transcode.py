"""transcode(src, parts, dst) = dst.encode(src.decode(parts)), through a fused CPU kernel where one
exists. The fused path gives the same bytes (tests check it) without materialising the float
weight, which on CPU costs more than the arithmetic (fresh pages for a float32 copy of the weight).
"""

from __future__ import annotations

import torch

from moeport.codecs import cpu_kernels
from moeport.codecs.base import Codec, Parts
from moeport.codecs.compressed_tensors import PackQuantizedCodec
from moeport.codecs.fp8 import Fp8BlockCodec
from moeport.codecs.int_rtn import group_size_of
from moeport.codecs.kt_amx import KtAmxCodec, kt_quantize_fp8_block


def has_fused(src: Codec, dst: Codec, via: torch.dtype = torch.float32) -> bool:
    """Whether (src -> float in `via` -> dst) has a fused CPU kernel: FP8-block into compressed-
    tensors INT (from a float32 decode), or into kt's AMX layout (which rounds to bf16 first, so
    a float32 or a bf16 decode gives the same bytes)."""
    if not (isinstance(src, Fp8BlockCodec) and cpu_kernels.AVAILABLE):
        return False
    if isinstance(dst, KtAmxCodec):
        return via in (torch.float32, torch.bfloat16)
    return isinstance(dst, PackQuantizedCodec) and via == torch.float32


def transcode(
    src: Codec, parts: Parts, dst: Codec, where: str = "", via: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """dst.encode(src.decode(parts).to(via))."""
    if has_fused(src, dst, via) and isinstance(dst, KtAmxCodec):
        w, block_scale = src.checked(parts, where)
        if w.dim() == 2 and w.device.type == "cpu":
            weight, scale = kt_quantize_fp8_block(w, block_scale, src.block, dst.bits, where)
            return {"weight": weight, "scale": scale}
    if has_fused(src, dst, via) and isinstance(dst, PackQuantizedCodec):
        w, block_scale = src.checked(parts, where)
        group = group_size_of(w.shape[-1], dst.group_size)
        if w.dim() == 2 and cpu_kernels.fp8_block_to_int_supported(
            w, src.block, dst.bits, group, dst.scale_dtype
        ):
            packed, scale, zero = cpu_kernels.fp8_block_to_int(
                w, block_scale, src.block, dst.bits, group, dst.symmetric, dst.scale_dtype, where
            )
            return dst.assemble(*w.shape, packed, scale, zero)
    return dst.encode(src.decode(parts, where).to(via))
