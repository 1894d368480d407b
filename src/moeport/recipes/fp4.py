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
from moeport.recipes.fp4_inputs import add_input_scales, file_digest
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
    w4a4: bool = False  # static input scales given (--input-scales): NVFP4 activations too

    def codec(self) -> Codec:
        return _CODECS[(self.scheme, self.flavor)]()

    @property
    def format_group(self) -> int:
        """Input columns per scale, fixed by the format (16 NVFP4, 32 MXFP4): every quantized
        weight's K must be a multiple (plan_gpu refuses the others in one line)."""
        return int(_CT_WEIGHTS[self.scheme]["group_size"])

    def carried(self, ck: Checkpoint, det: Detection) -> str | None:
        """Experts stored exactly as this recipe writes them (format and flavour) are carried
        bit-exact: their first part's name, or None. Not with --ignore."""
        codec = self.codec()
        if det.expert_format.name != codec.name or self.ignore:
            return None
        return codec.required[0]

    def quantization_config(self, kept_linear: list[str]) -> dict[str, Any]:
        ignore = sorted({*kept_linear, "lm_head"})
        if self.flavor == "modelopt":  # what ModelOpt 0.47's export writes (tests compare)
            weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
            group = ({"input_activations": dict(weights)} if self.w4a4 else {}) | {"weights": weights}
            return {
                "config_groups": {"group_0": group | {"targets": ["Linear"]}},
                "ignore": ignore,
                "quant_algo": self.quant_algo,
                "producer": {"name": "moeport"},
                "quant_method": "modelopt",
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
        # llmcompressor's NVFP4 preset: activations quantized per 16 on the fly (`dynamic: local`)
        # under the static global scale `input_global_scale`
        activations = weights | {"dynamic": "local", "observer": "static_minmax"} if self.w4a4 else None
        group = {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": activations,
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

    @property
    def quant_algo(self) -> str:
        """ModelOpt's name of the scheme: NVFP4 is W4A4 (servers read `input_scale`), W4A16_NVFP4
        weight-only, as ModelOpt's own export names them."""
        return "NVFP4" if self.w4a4 else "W4A16_NVFP4"

    def hf_quant_config(self, ignore: list[str]) -> dict[str, Any] | None:
        """ModelOpt's `hf_quant_config.json` (what vLLM/SGLang/TensorRT-LLM read for quant_method
        modelopt); None for the compressed-tensors flavour, whose config.json says it all."""
        if self.flavor != "modelopt":
            return None
        quant = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None, "group_size": 16}
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
    w4a4 = bool(opts.input_scales)
    return Recipe(scheme, flavor, opts.targets, tuple(opts.ignore), opts.allow_nonfinite, w4a4)


def _target(scheme: str, help: str) -> Target:
    def build(ck: Checkpoint, det: Detection, opts: Options, metadata: dict[str, str]):
        recipe = recipe_of(scheme, opts)
        if recipe.flavor == "gpt-oss":
            plan = plan_gpt_oss(ck, det, opts.device)
        else:
            plan = plan_gpu(ck, det, recipe, opts.device)
        if recipe.w4a4:
            plan = add_input_scales(plan, ck, det, recipe.flavor, opts.input_scales)
        acts = "static input scales" if recipe.w4a4 else "weight-only"
        plan.title = (
            f"{det.family.title}: {det.expert_format.name} -> {scheme} "
            f"({recipe.flavor}, {opts.targets}, {acts})"
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
        if opts.input_scales:  # the calibration data, by content (another file: another output)
            fields["input_scales"] = file_digest(opts.input_scales)
        return fields | ({"allow_nonfinite": True} if opts.allow_nonfinite else {})

    takes = {"flavor", "targets", "ignore", "max_shard_bytes"}
    # E8M0 scales cannot hold NaN/Inf; static activation scales are NVFP4's (W4A4)
    takes |= {"allow_nonfinite", "input_scales"} if scheme == "nvfp4" else set()
    return Target(scheme, help, build, fields, takes=frozenset(takes))


TARGETS = [
    _target(
        "nvfp4",
        "NVFP4 weights (E2M1, E4M3 scale per 16, global scale), 16-bit activations, or NVFP4 ones "
        "with --input-scales (--flavor compressed-tensors|modelopt, --targets, --ignore)",
    ),
    _target(
        "mxfp4",
        "MXFP4 weights (E2M1, E8M0 scale per 32), 16-bit activations (--flavor compressed-tensors, "
        "or gpt-oss: GPT-OSS's fused _blocks/_scales experts)",
    ),
]
