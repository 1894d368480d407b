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


def transcode(src: Codec, parts: Parts, dst: Codec, where: str = "") -> dict[str, torch.Tensor]:
    if isinstance(src, Fp8BlockCodec) and isinstance(dst, PackQuantizedCodec):
        w, block_scale = src.checked(parts, where)
        group = group_size_of(w.shape[-1], dst.group_size)
        if w.dim() == 2 and cpu_kernels.fp8_block_to_int_supported(
            w, src.block, dst.bits, group, dst.scale_dtype
        ):
            packed, scale, zero = cpu_kernels.fp8_block_to_int(
                w, block_scale, src.block, dst.bits, group, dst.symmetric, dst.scale_dtype, where
            )
            return dst.assemble(*w.shape, packed, scale, zero)
    return dst.encode(src.decode(parts, where))
