"""The Hugging Face outputs behind `--to kt-mxfp4|kt-mxfp8`: routed experts in kt-kernel's native
microscaling formats, everything else as the GPU side loads it (recipes.gpu.plan_gpu).

kt-mxfp4 (`MXFP4SafeTensorLoader`, DeepSeek-V4-Flash's routed experts): `{L}.ffn.experts.{E}.w1/w3/w2`
`.weight` I8 [N, K/2] (E2M1 codes, element 2j in the low nibble) + `.scale` F8_E8M0 [N, K/32];
OCP scale choice (codecs.fp4.mx_exponent). Experts already in MXFP4 are not requantized: DeepSeek-V4's
own are carried bit-exact, compressed-tensors MXFP4 ones move their codes and scales (`Recode`).
config.json says what DeepSeek-V4 says (`quant_method: fp8` for its non-expert linears, ue8m0, and
`expert_dtype: fp4`), with the linears this output keeps in 16 bits in `modules_to_not_convert`.

kt-mxfp8 (`MXFP8SafeTensorLoader`, MiniMax-M3-Preview's experts): `{L}.block_sparse_moe.experts.{E}`
`.w1/w3/w2.weight` E4M3 [N, K] + `.weight_scale_inv` U8 (E8M0) [N, K/32]: one power-of-two scale per
32 along K, rounded up from amax/448 (DeepSeek's ue8m0 rule: no code saturates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeport.codecs import Fp8BlockCodec
from moeport.codecs.base import Codec
from moeport.codecs.fp4 import Dsv4Mxfp4Codec
from moeport.detect.detection import Detection
from moeport.recipes.base import Options, Target
from moeport.recipes.gpu import plan_gpu
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint

MX_GROUP = 32


@dataclass(frozen=True)
class MxRecipe:
    scheme: str  # kt-mxfp4 | kt-mxfp8
    targets: str = "experts"
    ignore: tuple[str, ...] = ()
    allow_nonfinite: bool = False

    def codec(self) -> Codec:
        if self.scheme == "kt-mxfp4":
            return Dsv4Mxfp4Codec()
        return Fp8BlockCodec(block=(1, MX_GROUP), ue8m0=True, scale_dtype=torch.uint8)

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        """The source's experts stored exactly as this recipe writes them: their first part."""
        fmt, codec = det.expert_format, self.codec()
        if isinstance(codec, Dsv4Mxfp4Codec):
            ours = fmt.name == "mxfp4" and fmt.params.get("variant") == "deepseek-v4"
        else:
            p = fmt.params
            ours = (
                fmt.name == "fp8-block"
                and tuple(p.get("block", ())) == codec.block
                and p.get("scale") == codec.scale_name
                and p.get("scale_dtype") == "U8"
            )
        return "weight" if ours else None

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        block = [128, 128] if self.scheme == "kt-mxfp4" else [1, MX_GROUP]
        config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": block,
            "scale_fmt": "ue8m0",
            "modules_to_not_convert": sorted(kept_linear) + ["lm_head"],
        }
        return config | ({"expert_dtype": "fp4"} if self.scheme == "kt-mxfp4" else {})


def _target(scheme: str, help: str) -> Target:
    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        recipe = MxRecipe(scheme, allow_nonfinite=opts.allow_nonfinite)
        plan = plan_gpu(ck, det, recipe, opts.device)
        if plan.config is not None and scheme == "kt-mxfp4":
            plan.config["expert_dtype"] = "fp4"  # DeepSeek-V4 reads it at the top level
        return plan, HfSink(opts.max_shard_bytes, metadata)

    # E8M0-scaled FP4 codes cannot hold NaN/Inf (codecs.fp4); E4M3 ones can
    takes = {"max_shard_bytes"} | ({"allow_nonfinite"} if scheme == "kt-mxfp8" else set())
    return Target(scheme, help, build, takes=frozenset(takes))


MXFP4 = _target("kt-mxfp4", "MXFP4 experts (E2M1, E8M0 scale per 32), DeepSeek-V4 names")
MXFP8 = _target("kt-mxfp8", "MXFP8 experts (E4M3, E8M0 scale per 32), MiniMax names")
