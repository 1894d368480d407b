"""Detection of quantized expert formats from their tensor layouts (each codec module states its format).

Each case rewrites the expert tensors of a real tiny Qwen3-MoE checkpoint into the companion
tensors of one format (names, dtypes and shapes as the producers write them, seeded random
contents) and sets the matching quantization_config; `inspect` must name the format.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_detect import inspect_json

G = torch.Generator().manual_seed(7)


def _u8(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=G, dtype=torch.uint8)


def _e8m0(*shape: int) -> torch.Tensor:
    return torch.randint(110, 130, shape, generator=G, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def _f(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=G) + 0.5).to(dtype)


def gptq(n: int, k: int, g: int = 16) -> dict[str, torch.Tensor]:
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=G, dtype=torch.int32),
        "qzeros": torch.full((k // g, n // 8), 0x77777777, dtype=torch.int32),
        "scales": _f(k // g, n, dtype=torch.float16),
        "g_idx": (torch.arange(k) // g).to(torch.int32),
    }


def ct_packed(n: int, k: int, g: int = 16) -> dict[str, torch.Tensor]:
    return {
        "weight_packed": torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=G, dtype=torch.int32),
        "weight_scale": _f(n, k // g, dtype=torch.bfloat16),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }


def nvfp4(n: int, k: int) -> dict[str, torch.Tensor]:
    return {
        "weight": _u8(n, k // 2),
        "weight_scale": _f(n, k // 16).to(torch.float8_e4m3fn),
        "weight_scale_2": _f(),
        "input_scale": _f(),
    }


def dsv4_fp4(n: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": _u8(n, k // 2).view(torch.int8), "scale": _e8m0(n, k // 32)}


def fp8_channel(n: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": _f(n, k).to(torch.float8_e4m3fn), "weight_scale": _f(n, 1)}


def fp8_tensor(n: int, k: int) -> dict[str, torch.Tensor]:
    return {"weight": _f(n, k).to(torch.float8_e4m3fn), "weight_scale": _f()}


def fp8_block_e8m0(n: int, k: int) -> dict[str, torch.Tensor]:
    return {
        "weight": _f(n, k).to(torch.float8_e4m3fn),
        "weight_scale_inv": _e8m0(math.ceil(n / 128), math.ceil(k / 128)),
    }


CT_W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 16,
            },
        }
    },
}
GPTQ_CFG = {"quant_method": "gptq", "bits": 4, "group_size": 16, "sym": True, "desc_act": False}
FP8_UE8M0 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}

CASES = [
    ("gptq", gptq, GPTQ_CFG, {"bits": 4, "group_size": 16, "sym": True}),
    (
        "awq",
        gptq,
        {"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm"},
        {"version": "gemm"},
    ),
    ("ct-pack-quantized", ct_packed, CT_W4A16, {"num_bits": 4, "group_size": 16}),
    ("nvfp4", nvfp4, {"quant_method": "modelopt", "quant_algo": "NVFP4"}, {"group_size": 16}),
    ("mxfp4", dsv4_fp4, {"quant_method": "fp8"}, {"variant": "deepseek-v4"}),
    ("fp8-channel", fp8_channel, {"quant_method": "compressed-tensors"}, {"scale": "weight_scale"}),
    ("fp8-tensor", fp8_tensor, {"quant_method": "fp8"}, {"scale": "weight_scale"}),
    ("fp8-block", fp8_block_e8m0, FP8_UE8M0, {"block": [128, 128], "ue8m0": True, "scale_dtype": "F8_E8M0"}),
]


def rewrite_experts(src, dst, make_parts, quant: dict) -> None:
    dst.mkdir()
    tensors = {}
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        for key in h.keys():
            value = h.get_tensor(key)
            if ".experts." in key and key.endswith(".weight"):
                prefix = key[: -len("weight")]
                tensors.update({prefix + part: t for part, t in make_parts(*value.shape).items()})
            else:
                tensors[key] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("name", "make_parts", "quant", "params"), CASES, ids=[c[0] for c in CASES])
def test_quantized_expert_format_is_detected(checkpoint, tmp_path, name, make_parts, quant, params) -> None:
    dst = tmp_path / name
    rewrite_experts(checkpoint("qwen3_moe", "hub"), dst, make_parts, quant)
    report = inspect_json(dst)
    assert report["expert_format"]["name"] == name
    for k, v in params.items():
        assert report["expert_format"][k] == v, k
    assert report["experts"]["per_layer"] == 4


def test_gpt_oss_mxfp4_blocks_and_scales_are_detected(checkpoint, tmp_path) -> None:
    """GPT-OSS MXFP4: `*_blocks` U8 [E, N, K/32, 16] + `*_scales` E8M0 bytes [E, N, K/32], [out, in]."""
    src, dst = checkpoint("gpt_oss", "hub"), tmp_path / "gpt-oss-mxfp4"
    dst.mkdir()
    tensors = {}
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        for key in h.keys():
            value = h.get_tensor(key)
            if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
                e, k, n = value.shape  # transformers holds [E, in, out]
                tensors[key + "_blocks"] = _u8(e, n, k // 32, 16)
                tensors[key + "_scales"] = _u8(e, n, k // 32)
            else:
                tensors[key] = value
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    report = inspect_json(dst)
    assert report["expert_format"] == {"name": "mxfp4", "variant": "gpt-oss", "group_size": 32}
    assert "model.layers.{L}.mlp.experts.gate_up_proj_blocks" in report["expert_tensors"]


def test_fp8_weight_without_scale_is_a_clear_error(checkpoint, tmp_path) -> None:
    def no_scale(n, k):
        return {"weight": _f(n, k).to(torch.float8_e4m3fn)}

    dst = tmp_path / "fp8-no-scale"
    rewrite_experts(checkpoint("qwen3_moe", "hub"), dst, no_scale, {"quant_method": "fp8"})
    from test_cli import run_cli

    result = run_cli("inspect", str(dst))
    assert result.returncode == 2 and "FP8 weight without a scale tensor" in result.stderr
    assert "model.layers.0.mlp.experts.0.gate_proj" in result.stderr
