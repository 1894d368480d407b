"""Recipes `--to nvfp4|mxfp4`: 4-bit float (E2M1) checkpoints for Blackwell-class GPU servers.

nvfp4 `--flavor compressed-tensors` (default): `nvfp4-pack-quantized` (`weight_packed`, E4M3
`weight_scale` per 16, `weight_global_scale` [1]), the math of compressed-tensors/llmcompressor.
nvfp4 `--flavor modelopt`: ModelOpt's export (`weight`, `weight_scale`, `weight_scale_2` [] = the
reciprocal global), `quant_method: modelopt` plus `hf_quant_config.json`, the math of ModelOpt's
`NVFP4QTensor`. mxfp4 `--flavor compressed-tensors`: `mxfp4-pack-quantized` (E8M0 `weight_scale`
per 32, compressed-tensors' scale choice).

Weight-only (A16): no calibration data means no static activation scale. The compressed-tensors
flavour is the default because vLLM (and transformers) load NVFP4A16/MXFP4A16 as they are, while
vLLM's and SGLang's ModelOpt NVFP4 path is W4A4 and expects a static `input_scale` per layer.

Gate and up of an expert (and q/k/v, w1/w3, a dense MLP's gate/up) always share one global scale
(recipes.gpu.fused_sets, convert.encode.EncodeShared). Experts the source already stores in the
target's format and flavour are carried bit-exact (`carried`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moeport.codecs import CtMxfp4Codec, CtNvfp4Codec, GptOssMxfp4Codec, Nvfp4Codec
from moeport.codecs.base import Codec
from moeport.convert.plan import HF_QUANT_CONFIG
from moeport.detect.detection import Detection
from moeport.errors import MoeportError
from moeport.recipes.base import Options, Target
from moeport.recipes.fp4_gptoss import plan_gpt_oss
from moeport.recipes.gpu import ignore_regex, plan_gpu
from moeport.sinks.sharded import HfSink
from moeport.sources.checkpoint import Checkpoint

FLAVORS = {"nvfp4": ("compressed-tensors", "modelopt"), "mxfp4": ("compressed-tensors", "gpt-oss")}
_CODECS = {
    ("nvfp4", "compressed-tensors"): CtNvfp4Codec,
    ("nvfp4", "modelopt"): Nvfp4Codec,
    ("mxfp4", "compressed-tensors"): CtMxfp4Codec,
    ("mxfp4", "gpt-oss"): GptOssMxfp4Codec,
}
# compressed-tensors weights args per scheme (as llmcompressor's NVFP4A16 / MXFP4A16 presets write them)
_CT_WEIGHTS = {
    "nvfp4": {"strategy": "tensor_group", "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"},
    "mxfp4": {"strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"},
}


@dataclass(frozen=True)
class Recipe:
    scheme: str  # nvfp4 | mxfp4
    flavor: str = "compressed-tensors"
    targets: str = "experts"
    ignore: tuple[str, ...] = ()
    allow_nonfinite: bool = False

    def codec(self) -> Codec:
        return _CODECS[(self.scheme, self.flavor)]()

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        """Experts stored exactly as this recipe writes them (format and flavour) are carried
        bit-exact: their first part's name, or None. Not with --ignore."""
        codec = self.codec()
        if det.expert_format.name != codec.name or self.ignore:
            return None
        return codec.required[0]

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        ignore = sorted(kept_linear) + ["lm_head"]
        if self.flavor == "modelopt":
            weights = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
            return {
                "quant_method": "modelopt",
                "quant_algo": "NVFP4",
                "config_groups": {"group_0": {"weights": weights, "targets": ["Linear"]}},
                "ignore": ignore,
                "kv_cache_scheme": None,
                "producer": {"name": "moeport"},
            }
        fmt = f"{self.scheme}-pack-quantized"
        weights = {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            **_CT_WEIGHTS[self.scheme],
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": None,
            "observer_kwargs": {},
            "zp_dtype": None,
        }
        group = {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": fmt,
        }
        return {
            "quant_method": "compressed-tensors",
            "format": fmt,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": ignore,
            "kv_cache_scheme": None,
        }

    def hf_quant_config(self, ignore: list[str]) -> dict[str, Any] | None:
        """ModelOpt's `hf_quant_config.json` (what vLLM/SGLang/TensorRT-LLM read for quant_method
        modelopt); None for the compressed-tensors flavour, whose config.json says it all."""
        if self.flavor != "modelopt":
            return None
        quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16}
        return {"producer": {"name": "moeport"}, "quantization": quant | {"exclude_modules": ignore}}


def recipe_of(scheme: str, opts: Options) -> Recipe:
    flavor = opts.flavor or FLAVORS[scheme][0]
    if flavor not in FLAVORS[scheme]:
        raise MoeportError(f"--flavor {flavor}: --to {scheme} writes {' or '.join(FLAVORS[scheme])}")
    if opts.layout != "hub":
        raise MoeportError(
            f"--to {scheme} writes per-expert (hub) names, as vLLM/SGLang load them; drop --layout "
            "(re-lay it out with --to hf --layout fused --dtype keep)"
        )
    if opts.targets not in ("experts", "all-linear"):
        raise MoeportError(f"--targets {opts.targets}: expected experts or all-linear")
    for pattern in opts.ignore:
        ignore_regex(pattern)
    if flavor == "gpt-oss" and (opts.targets != "experts" or opts.ignore):
        raise MoeportError(
            "--flavor gpt-oss: GPT-OSS's MXFP4 holds the routed experts only, all of them; "
            "drop --targets/--ignore (--flavor compressed-tensors takes them)"
        )
    return Recipe(scheme, flavor, opts.targets, tuple(opts.ignore), opts.allow_nonfinite)


def _target(scheme: str, help: str) -> Target:
    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        recipe = recipe_of(scheme, opts)
        if recipe.flavor == "gpt-oss":
            plan = plan_gpt_oss(ck, det, opts.device)
        else:
            plan = plan_gpu(ck, det, recipe, opts.device)
        plan.title = (
            f"{det.family.title}: {det.expert_format.name} -> {scheme} ({recipe.flavor}, {opts.targets})"
        )
        ignore = (plan.config or {}).get("quantization_config", {}).get("ignore", [])
        plan.side_files[HF_QUANT_CONFIG] = recipe.hf_quant_config(ignore)  # None: a source's is dropped
        return plan, HfSink(opts.max_shard_bytes, metadata)

    def fields(opts: Options) -> dict[str, object]:
        fields = {
            "flavor": opts.flavor or FLAVORS[scheme][0],
            "targets": opts.targets,
            "ignore": list(opts.ignore),
        }
        return fields | ({"allow_nonfinite": True} if opts.allow_nonfinite else {})

    takes = {"flavor", "targets", "ignore", "max_shard_bytes"}
    takes |= {"allow_nonfinite"} if scheme == "nvfp4" else set()  # E8M0 scales cannot hold NaN/Inf
    return Target(scheme, help, build, fields, takes=frozenset(takes))


TARGETS = [
    _target(
        "nvfp4",
        "NVFP4 weights (E2M1, E4M3 scale per 16, global scale), 16-bit activations "
        "(--flavor compressed-tensors|modelopt, --targets, --ignore)",
    ),
    _target(
        "mxfp4",
        "MXFP4 weights (E2M1, E8M0 scale per 32), 16-bit activations (--flavor compressed-tensors, "
        "or gpt-oss: GPT-OSS's fused _blocks/_scales experts)",
    ),
]
