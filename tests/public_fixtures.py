"""Checkpoints carrying public models' own names where transformers writes others (issue 21).

Built from the transformers-made fixtures (fixtures.py) by renaming and adding tensors, names taken
from the public checkpoints: DeepSeek-V4 keeps its attention KV norm as `attn.kv_norm` and its MTP
block under `mtp.0.` (transformers drops both on load, so it cannot write them); Qwen3-Next and
Qwen3.5 keep MTP under `mtp.layers.0.` with `mtp.fc`, `mtp.norm` and `mtp.pre_fc_norm_*` beside it.
An MTP layer is a copy of the last decoder layer's tensors under the MTP prefix (seeded noise
added, so no two layers are equal), plus the MTP-only tensors.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from fixtures import load_tensors
from safetensors.torch import save_file

# model_type -> (main layer prefix in the transformers save, MTP prefix, MTP-only tensors: name -> shape)
MTP = {
    "deepseek_v4": (
        "model.layers.{L}.",
        "mtp.0.",
        {
            "e_proj.weight": (64, 64),
            "h_proj.weight": (64, 64),
            "enorm.weight": (64,),
            "hnorm.weight": (64,),
            "norm.weight": (64,),
        },
    ),
    "qwen3_next": (
        "model.layers.{L}.",
        "mtp.layers.0.",
        {
            "^mtp.fc.weight": (64, 128),
            "^mtp.norm.weight": (64,),
            "^mtp.pre_fc_norm_embedding.weight": (64,),
            "^mtp.pre_fc_norm_hidden.weight": (64,),
        },
    ),
    # GLM-4.5 keeps MTP as one more decoder layer (model.layers.{num_hidden_layers}), as DeepSeek-V3
    "glm4_moe": (
        "model.layers.{L}.",
        "model.layers.3.",
        {
            "eh_proj.weight": (64, 128),
            "enorm.weight": (64,),
            "hnorm.weight": (64,),
            "shared_head.norm.weight": (64,),
        },
    ),
    "qwen3_5_moe": (
        "model.language_model.layers.{L}.",
        "mtp.layers.0.",
        {
            "^mtp.fc.weight": (64, 128),
            "^mtp.norm.weight": (64,),
            "^mtp.pre_fc_norm_embedding.weight": (64,),
            "^mtp.pre_fc_norm_hidden.weight": (64,),
        },
    ),
}


# LongCat-Flash (meituan-longcat/LongCat-Flash-Chat): one dense MTP layer, names as vLLM's
# longcat_flash_mtp.py and SGLang's longcat_flash_nextn.py `load_weights` map them. It is a
# DeepSeek-style decoder layer, unlike LongCat's own (one attention `self_attn.`, not `.0`/`.1`;
# one dense MLP under `transformer_layer.mlp.`; no routed experts), built here from the last
# layer's first attention and dense MLP; `eh_proj`, `enorm.m`, `hnorm.m` beside it and the
# MTP's own `model.mtp.embed_tokens` / `model.mtp.norm` outside the layer.
LONGCAT_MTP = "model.mtp.layers.0."
LONGCAT_MTP_FROM_LAST = (
    (r"^self_attn\.0\.", "self_attn."),
    (r"^(input|post_attention)_layernorm\.0\.", r"\1_layernorm."),
    (r"^mlps\.0\.", "transformer_layer.mlp."),
)


def longcat_mtp_tensors(tensors: dict, config: dict, seed: int) -> dict[str, torch.Tensor]:
    """LongCat-Flash's MTP block under its public names, seeded noise on the copied tensors."""
    last, h = f"model.layers.{config['num_layers'] - 1}.", config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tensors.items():
        if not k.startswith(last):
            continue
        for pattern, to in LONGCAT_MTP_FROM_LAST:
            name, hit = re.subn(pattern, to, k[len(last) :])
            if hit:
                out[LONGCAT_MTP + name] = (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype)
    shapes = {
        LONGCAT_MTP + "eh_proj.weight": (h, 2 * h),
        LONGCAT_MTP + "enorm.m.weight": (h,),
        LONGCAT_MTP + "hnorm.m.weight": (h,),
        "model.mtp.embed_tokens.weight": (config["vocab_size"], h),
        "model.mtp.norm.weight": (h,),
    }
    out.update({k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()})
    return out


def with_public_names(src: Path, out: Path, model_type: str, mtp: bool = True, seed: int = 1) -> Path:
    """A copy of the transformers checkpoint `src` under the public names of `model_type`."""
    tensors = load_tensors(src)
    config = json.loads((src / "config.json").read_text())
    if model_type == "deepseek_v4":
        tensors = {re.sub(r"\.attn\.norm\.", ".attn.kv_norm.", k): v for k, v in tensors.items()}
    if mtp and model_type == "longcat_flash":
        tensors.update(longcat_mtp_tensors(tensors, config, seed))
    elif mtp:
        tensors.update(mtp_tensors(tensors, config, model_type, seed))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def mtp_tensors(tensors: dict, config: dict, model_type: str, seed: int) -> dict[str, torch.Tensor]:
    main, prefix, extra = MTP[model_type]
    text = config.get("text_config", config)
    last = main.replace("{L}", str(text["num_hidden_layers"] - 1))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tensors.items():
        if k.startswith(last):
            if v.is_floating_point():
                v = (v.float() + torch.randn(v.shape, generator=g) * 0.01).to(v.dtype)
            out[prefix + k[len(last) :]] = v.clone()
    for name, shape in extra.items():
        key = name[1:] if name.startswith("^") else prefix + name
        out[key] = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    return out


def deepseek_v4_fp4(src: Path, out: Path) -> Path:
    """DeepSeek-V4 as published: routed experts (MTP's too) in FP4 (I8 codes + E8M0 `scale` per 32),
    `expert_dtype: fp4` in config.json beside an FP8 `quantization_config`. The codes come from
    moeport's Dsv4Mxfp4Codec, whose decode is checked against gguf (test_codecs)."""
    from moeport.codecs import Dsv4Mxfp4Codec

    codec = Dsv4Mxfp4Codec()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in load_tensors(src).items():
        if re.search(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$", k):
            parts = codec.encode(v.float())
            tensors[k] = parts["weight"]
            tensors[k.removesuffix("weight") + "scale"] = parts["scale"]
        else:
            tensors[k] = v
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["expert_dtype"] = "fp4"
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def gpt_oss_mxfp4(src: Path, out: Path) -> Path:
    """GPT-OSS as published: fused experts as MXFP4 `_blocks`/`_scales` ([E, N, K] rows), biases in
    BF16, `quant_method: mxfp4` (transformers reads it; see test_convert_hf)."""
    from moeport.codecs import GptOssMxfp4Codec

    codec = GptOssMxfp4Codec()
    tensors = load_tensors(src)
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        parts = codec.encode(tensors.pop(name).float().transpose(-1, -2).contiguous())
        tensors[name + "_blocks"], tensors[name + "_scales"] = parts["_blocks"], parts["_scales"]
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    skip = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": skip}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
