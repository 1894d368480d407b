"""Name the storage format of one weight from its companion tensors (headers only, no data).

A weight is a group of tensors sharing a prefix: `weight` alone (bf16), `weight` +
`weight_scale_inv` (FP8 block), `qweight`/`scales`/`qzeros` (GPTQ/AWQ), `_blocks`/`_scales`
(GPT-OSS MXFP4)... `classify` maps such a group, plus the config's quantization_config, to a
format name and its parameters. Facts: ../shared/specs/formats.md. ExpertFormat, Part and
PASSIVE_PARTS live in codecs.format (imported here under their old path).
"""

from __future__ import annotations

import math
from typing import Any

from moeport.codecs.format import PASSIVE_PARTS, ExpertFormat, Part
from moeport.dtypes import FLOAT_DTYPES
from moeport.errors import MoeportError

_FLOAT_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}


def classify(parts: dict[str, Part], quant: dict[str, Any], where: str) -> ExpertFormat:
    """Format of a weight given its parts (keyed by suffix: 'weight', 'weight_scale_inv', '_blocks'...)."""
    active = {k: v for k, v in parts.items() if k not in PASSIVE_PARTS}
    names = set(active)
    method = str(quant.get("quant_method", "")).lower()
    if {"_blocks", "_scales"} <= names:
        return ExpertFormat("mxfp4", {"variant": "gpt-oss", "group_size": 32})
    if "qweight" in names:
        return _gptq_or_awq(active, quant, method, where)
    if "weight_packed" in names:
        return _compressed_tensors_packed(active, quant, where)
    weight = active.get("weight")
    if weight is None:
        raise MoeportError(
            f"{where}: no weight tensor among parts {sorted(parts)}; "
            "expected 'weight', 'qweight', 'weight_packed' or '_blocks'+'_scales'"
        )
    if weight.dtype in FLOAT_DTYPES and len(names) == 1:
        return ExpertFormat(_FLOAT_NAMES[weight.dtype])
    if weight.dtype == "F8_E4M3":
        return _fp8(active, weight, quant, method, where)
    if weight.dtype in ("U8", "I8"):
        return _fp4(active, weight, where)
    raise MoeportError(
        f"{where}: unrecognised expert storage: parts "
        f"{ {k: f'{v.dtype}{list(v.shape)}' for k, v in active.items()} }"
    )


def _nk(part: Part) -> tuple[int, int]:
    return part.shape[-2], part.shape[-1]


def _fp8(
    active: dict[str, Part], weight: Part, quant: dict[str, Any], method: str, where: str
) -> ExpertFormat:
    scale_name = next((n for n in ("weight_scale_inv", "scale", "weight_scale") if n in active), None)
    if scale_name is None:
        raise MoeportError(
            f"{where}: FP8 weight without a scale tensor (expected weight_scale_inv, weight_scale or scale)"
        )
    scale = active[scale_name]
    n, k = _nk(weight)
    lead = weight.shape[:-2]  # fused experts carry a leading expert dim on both
    s_shape = scale.shape[len(lead) :] if scale.shape[: len(lead)] == lead else scale.shape
    params: dict[str, Any] = {"scale": scale_name, "scale_dtype": scale.dtype}
    if method == "compressed-tensors":
        params["container"] = "compressed-tensors"
    if len(s_shape) <= 1 and math.prod(s_shape) == 1:  # 0-d or [1]; a [1, 1] grid is one block
        return ExpertFormat("fp8-tensor", params)
    if tuple(s_shape) in ((n,), (n, 1)):
        return ExpertFormat("fp8-channel", params)
    if len(s_shape) == 2:
        block = quant.get("weight_block_size") or _guess_block(n, k, s_shape)
        if block is None or (math.ceil(n / block[0]), math.ceil(k / block[1])) != tuple(s_shape):
            raise MoeportError(
                f"{where}: FP8 scale '{scale_name}' has shape {list(s_shape)}, which is no "
                f"block grid of weight [{n}, {k}] (block size {block})"
            )
        params["block"] = list(block)
        if scale.dtype in ("F8_E8M0", "U8") or quant.get("scale_fmt") == "ue8m0":
            params["ue8m0"] = True
        return ExpertFormat("fp8-block", params)
    raise MoeportError(f"{where}: FP8 scale '{scale_name}' shape {list(scale.shape)} fits no known layout")


def _guess_block(n: int, k: int, s_shape: tuple[int, ...]) -> list[int] | None:
    for b in (128, 64, 256, 32):
        if (math.ceil(n / b), math.ceil(k / b)) == tuple(s_shape):
            return [b, b]
    return None


def _fp4(active: dict[str, Part], weight: Part, where: str) -> ExpertFormat:
    n, half_k = _nk(weight)
    k = half_k * 2
    if "weight_scale_2" in active and "weight_scale" in active:
        return ExpertFormat("nvfp4", {"producer": "modelopt", "group_size": 16})
    scale = active.get("scale", active.get("weight_scale"))
    if scale is not None and scale.dtype in ("F8_E8M0", "U8") and scale.shape[-1] * 32 == k:
        return ExpertFormat("mxfp4", {"variant": "deepseek-v4", "group_size": 32})
    raise MoeportError(
        f"{where}: packed {weight.dtype} weight [{n}, {half_k}] without a recognised FP4 scale "
        "(expected E8M0 'scale' per 32 or NVFP4 'weight_scale'+'weight_scale_2')"
    )


def _gptq_or_awq(active: dict[str, Part], quant: dict[str, Any], method: str, where: str) -> ExpertFormat:
    for needed in ("scales",):
        if needed not in active:
            raise MoeportError(f"{where}: 'qweight' without '{needed}'")
    params = {
        k: quant[k] for k in ("bits", "group_size", "sym", "desc_act", "zero_point", "version") if k in quant
    }
    if method == "awq":
        return ExpertFormat("awq", params)
    if "checkpoint_format" in quant:
        params["checkpoint_format"] = quant["checkpoint_format"]
    return ExpertFormat("gptq", params)


def _compressed_tensors_packed(active: dict[str, Part], quant: dict[str, Any], where: str) -> ExpertFormat:
    packed = active["weight_packed"]
    weights = _ct_weight_args(quant)
    params = {k: weights[k] for k in ("num_bits", "group_size", "symmetric", "strategy") if k in weights}
    if packed.dtype == "U8" and "weight_global_scale" in active:
        return ExpertFormat("ct-nvfp4", params)
    if packed.dtype == "U8":
        return ExpertFormat("ct-mxfp4", params)
    if packed.dtype != "I32":
        raise MoeportError(f"{where}: 'weight_packed' has dtype {packed.dtype}, expected I32 or U8")
    return ExpertFormat("ct-pack-quantized", params)


def _ct_weight_args(quant: dict[str, Any]) -> dict[str, Any]:
    """The weights args of the first config group (enough to describe the expert format)."""
    for group in (quant.get("config_groups") or {}).values():
        if isinstance(group, dict) and isinstance(group.get("weights"), dict):
            return group["weights"]
    return {}
