"""One module per storage format; every codec decodes its parts to float32 and encodes back.

Each module also declares its formats (format.StorageFormat: how a weight in it is recognised, its
decoded shape, its parts' row rules, its codec); registry lists them in recognition order.

| format | declared names | codec |
|---|---|---|
| bf16 / fp16 / fp32 (/ fp64, no codec) | bf16 fp16 fp32 fp64 | floats.FloatCodec |
| FP8 block (`weight_scale_inv`, DeepSeek) | fp8-block | fp8.Fp8BlockCodec |
| FP8 per-channel / per-tensor (`weight_scale`) | fp8-channel fp8-tensor | fp8.Fp8ScaledCodec |
| MXFP4 GPT-OSS / DeepSeek-V4, NVFP4 (ModelOpt) | mxfp4 nvfp4 | fp4 |
| GPTQ v1/v2, AWQ GEMM | gptq awq | gptq |
| compressed-tensors packed INT, NVFP4, MXFP4 | ct-pack-quantized ct-nvfp4 ct-mxfp4 | compressed_tensors |
| compressed-tensors float-quantized | fp8-channel fp8-tensor | compressed_tensors.float_quantized_codec |
| RTN INT4/INT8 math | | int_rtn |
"""

from moeport.codecs.base import Codec
from moeport.codecs.compressed_tensors import (
    CtMxfp4Codec,
    CtNvfp4Codec,
    PackQuantizedCodec,
    float_quantized_codec,
)
from moeport.codecs.floats import FloatCodec
from moeport.codecs.fp4 import Dsv4Mxfp4Codec, GptOssMxfp4Codec, Nvfp4Codec
from moeport.codecs.fp8 import Fp8BlockCodec, Fp8ScaledCodec
from moeport.codecs.gptq import AwqCodec, GptqCodec

__all__ = [
    "AwqCodec",
    "Codec",
    "CtMxfp4Codec",
    "CtNvfp4Codec",
    "Dsv4Mxfp4Codec",
    "FloatCodec",
    "Fp8BlockCodec",
    "Fp8ScaledCodec",
    "GptOssMxfp4Codec",
    "GptqCodec",
    "Nvfp4Codec",
    "PackQuantizedCodec",
    "float_quantized_codec",
]
