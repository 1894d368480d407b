"""The Hugging Face output behind `--to kt-gptq-int4`: routed experts as symmetric GPTQ INT4 for
kt-kernel's `GPTQSafeTensorLoader`, every other linear in 16 bits, and a config that says so.

Experts: AutoGPTQ v1 storage (codecs.gptq: `qweight` I32 [K/8, N], `scales` F16 [K/g, N], `qzeros`
all 0x77777777, `g_idx` = k // g), RTN with GPTQ's symmetric parameter rule by default; with
`--method gptq --calibration FILE` the codes come from calibrated GPTQ (recipes/gptq.py, the layer
walk of calibrate/), same scales and storage. No act-order: kt refuses `desc_act: true`.
kt reads `qweight` and `scales` only, derives the group size from the scales' rows, and refuses
`desc_act: true` and `sym: false` from config.json.

config.json `quantization_config` is GPTQModel's, as SGLang and vLLM read it for the GPU side:
`quant_method: gptq`, bits 4, `sym: true`, `desc_act: false`, `lm_head: false`, and a `dynamic`
rule `-:<regex>` whose negative match keeps every linear that is not a routed expert unquantized
(their `get_linear_quant_method` gives such modules `UnquantizedLinearMethod`). Routed experts are
the servers' fused MoE layers, which the rule never names. GPTQ experts already stored so (v1,
symmetric, no act-order, this group size) are carried bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeport.codecs import GptqCodec
from moeport.codecs.base import Codec
from moeport.detect.detection import Detection
from moeport.recipes.base import Options, Target
from moeport.recipes.gptq import with_method
from moeport.recipes.gpu import plan_gpu
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint

# GPTQModel `dynamic`: "-:" + a regex re.match'ed against a module name means "not quantized".
# Anything whose name has no `.experts` segment (attention, shared experts, dense MLPs, ...): not a
# routed expert `...experts.<E>.gate_proj`, nor the fused MoE layer `...mlp.experts` itself (vLLM
# asks the rule for that prefix too).
NOT_ROUTED_EXPERTS = r"-:^(?!.*\.experts(\.|$)).*"


@dataclass(frozen=True)
class GptqRecipe:
    group_size: int = 128
    scheme: str = "kt-gptq-int4"
    targets: str = "experts"
    ignore: tuple[str, ...] = ()
    allow_nonfinite: bool = False

    def codec(self) -> Codec:
        return GptqCodec(group_size=self.group_size, sym=True, checkpoint_format="gptq")

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        fmt = det.expert_format
        p = fmt.params
        same = (
            fmt.name == "gptq"
            and int(p.get("bits", 4)) == 4
            and int(p.get("group_size", 128)) == self.group_size
            and bool(p.get("sym", True))
            and not p.get("desc_act", False)
            and p.get("checkpoint_format", "gptq") == "gptq"
        )
        return "qweight" if same else None

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": self.group_size,
            "desc_act": False,
            "sym": True,
            "static_groups": False,
            "checkpoint_format": "gptq",
            "lm_head": False,
            "dynamic": {NOT_ROUTED_EXPERTS: {}},
        }


def recipe_of(opts: Options) -> GptqRecipe:
    return GptqRecipe(opts.group_size or 128, allow_nonfinite=opts.allow_nonfinite)


def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
    plan = plan_gpu(ck, det, recipe_of(opts), opts.device)
    return plan, HfSink(opts.max_shard_bytes, metadata)


# --method gptq: the recorded recipe keeps "method" for kt's method name (GPTQ_INT4), so GPTQ is
# recorded as "quantizer"; act-order would need desc_act: true, which kt-kernel's loader refuses.
TARGET = with_method(
    Target(
        "kt-gptq-int4",
        "symmetric GPTQ INT4 experts, the rest unquantized",
        build,
        takes=frozenset({"max_shard_bytes", "allow_nonfinite"}),
    ),
    recipe_for=recipe_of,
    method_field="quantizer",
    act_order="kt-kernel's GPTQ_INT4 loader refuses desc_act: true, and act-order needs it",
)
