"""One module per storage format; every codec decodes its parts to float32 and encodes back.

| format | codec |
|---|---|
| bf16 / fp16 / fp32 | floats.FloatCodec |
| FP8 block (`weight_scale_inv`, DeepSeek) | fp8.Fp8BlockCodec |
| FP8 per-channel / per-tensor (`weight_scale`) | fp8.Fp8ScaledCodec |
| MXFP4 GPT-OSS / DeepSeek-V4, NVFP4 (ModelOpt) | fp4 |
| GPTQ v1/v2, AWQ GEMM | gptq |
| compressed-tensors pack-quantized / float-quantized | compressed_tensors |
| RTN INT4/INT8 math | int_rtn |
"""

from moeport.codecs.base import Codec
from moeport.codecs.compressed_tensors import PackQuantizedCodec, float_quantized_codec
from moeport.codecs.floats import FloatCodec
from moeport.codecs.fp4 import Dsv4Mxfp4Codec, GptOssMxfp4Codec, Nvfp4Codec
from moeport.codecs.fp8 import Fp8BlockCodec, Fp8ScaledCodec
from moeport.codecs.gptq import AwqCodec, GptqCodec

__all__ = [
    "AwqCodec",
    "Codec",
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
