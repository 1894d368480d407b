"""From a detected expert format (detect.formats.ExpertFormat) to the codec that decodes it."""

from __future__ import annotations

from moeport.codecs.base import Codec
from moeport.codecs.compressed_tensors import PackQuantizedCodec
from moeport.codecs.floats import FloatCodec
from moeport.codecs.format import ExpertFormat
from moeport.codecs.fp4 import Dsv4Mxfp4Codec, GptOssMxfp4Codec, Nvfp4Codec
from moeport.codecs.fp8 import Fp8BlockCodec, Fp8ScaledCodec
from moeport.codecs.gptq import AwqCodec, GptqCodec
from moeport.errors import MoeportError


def codec_for(fmt: ExpertFormat) -> Codec:
    """The codec that decodes weights stored as `fmt` (parameters taken from the detection)."""
    p = fmt.params
    if fmt.name in ("bf16", "fp16", "fp32"):
        return FloatCodec(fmt.name)
    if fmt.name == "fp8-block":
        return Fp8BlockCodec(block=tuple(p["block"]), ue8m0=bool(p.get("ue8m0")), scale_name=p["scale"])
    if fmt.name in ("fp8-channel", "fp8-tensor"):
        return Fp8ScaledCodec(strategy=fmt.name.removeprefix("fp8-"), scale_name=p["scale"])
    if fmt.name == "mxfp4":
        return GptOssMxfp4Codec() if p.get("variant") == "gpt-oss" else Dsv4Mxfp4Codec()
    if fmt.name == "nvfp4":
        return Nvfp4Codec()
    if fmt.name == "gptq":
        return GptqCodec(
            group_size=int(p.get("group_size", 128)),
            sym=bool(p.get("sym", True)),
            checkpoint_format=str(p.get("checkpoint_format", "gptq")),
        )
    if fmt.name == "awq":
        return AwqCodec(group_size=int(p.get("group_size", 128)))
    if fmt.name == "ct-pack-quantized":
        return PackQuantizedCodec(
            bits=int(p.get("num_bits", 4)),
            group_size=p.get("group_size"),
            symmetric=bool(p.get("symmetric", True)),
        )
    raise MoeportError(f"no decoder for expert format {fmt.describe()} yet")
