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
import math
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


# stepfun-ai/Step-3.5-Flash's config.json keys (Step3p5ForCausalLM, remote code), at tiny sizes: the
# real one has 45 layers (MoE from layer 3, `moe_layers_enum` "3,...,44"), 288 experts, top 8, I=1280,
# H=4096, 3 MTP layers, and pads the per-layer lists with one entry per MTP layer.
STEP35_LAYERS, STEP35_MTP = 4, 1


def step35_flash_config(hidden: int = 256) -> dict:
    n, padded = STEP35_LAYERS, STEP35_LAYERS + STEP35_MTP
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": hidden,
        "intermediate_size": hidden,
        "num_hidden_layers": n,
        "vocab_size": 256,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "head_dim": 64,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": 8,
            "num_attention_groups": 2,
            "head_dim": 64,
        },
        "layer_types": (["full_attention"] + ["sliding_attention"] * 3)[:n] + ["full_attention"] * STEP35_MTP,
        "sliding_window": 512,
        "rope_theta": (([5000000.0] + [10000.0] * 3) * 2)[:padded],
        "partial_rotary_factors": (([0.5] + [1.0] * 3) * 2)[:padded],
        "moe_num_experts": 4,
        "moe_top_k": 2,
        "moe_intermediate_size": hidden,
        "share_expert_dim": hidden,
        "moe_layers_enum": ",".join(str(i) for i in range(1, n)),
        "moe_router_activation": "sigmoid",
        "moe_router_scaling_factor": 3.0,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "norm_expert_weight": True,
        "use_head_wise_attn_gate": True,
        "use_qk_norm": True,
        "zero_centered": True,
        "swiglu_limits": [0.0] * (n - 1) + [7.0] + [0.0] * STEP35_MTP,
        "swiglu_limits_shared": [0.0] * (n - 1) + [16.0] + [0.0] * STEP35_MTP,
        "num_nextn_predict_layers": STEP35_MTP,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": [1, 2],
        "torch_dtype": "bfloat16",
    }


def step35_flash(out: Path, hidden: int = 256, seed: int = 1):
    """A tiny Step-3.5-Flash checkpoint under the Hub's names, and transformers' model of it.

    The tensors are what transformers' own `save_pretrained` writes for a seeded Step3p7 model whose
    text config is the Hub's (its `step3p7` conversion mapping, reverted, gives Step-3.5's
    `model.layers.{L}.moe.gate_proj.weight` stacks, `moe.router_bias`, `share_expert.`); the vision
    tower Step-3.5 does not have is left out, and its MTP layers are added as the Hub stores them:
    `model.layers.{num_hidden_layers + i}.` holding a decoder layer with a dense MLP plus `enorm`,
    `hnorm`, `eh_proj` and `transformer.shared_head.norm` / `.output` (SGLang's Step3p5MTP loader
    and the public converters read those names). Returns the folder and transformers' save of the
    Step3p7 model (Step-3.5's tensors and a vision tower), which transformers loads by its mapping."""
    from transformers import Step3p7Config, Step3p7ForConditionalGeneration

    config = step35_flash_config(hidden)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    model = Step3p7ForConditionalGeneration(Step3p7Config(text_config=dict(config), vision_config=vision))
    model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    saved = out.with_name(out.name + "-step3p7")  # transformers' own save: it loads it back
    model.save_pretrained(saved)
    tensors = {k: v for k, v in load_tensors(saved).items() if not k.startswith(("vision_model.", "vit_"))}
    n = config["num_hidden_layers"]
    for i in range(STEP35_MTP):
        mtp, first = f"model.layers.{n + i}.", "model.layers.0."  # layer 0: dense, as the MTP layers
        for k, v in list(tensors.items()):
            if k.startswith(first):
                noise = torch.randn(v.shape, generator=g) * 0.01  # no two layers equal
                tensors[mtp + k[len(first) :]] = (v.float() + noise).bfloat16()
        for name, shape in {
            "enorm.weight": (hidden,),
            "hnorm.weight": (hidden,),
            "eh_proj.weight": (hidden, 2 * hidden),
            "transformer.shared_head.norm.weight": (hidden,),
            "transformer.shared_head.output.weight": (config["vocab_size"], hidden),
        }.items():
            tensors[mtp + name] = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, saved


def step35_flash_headers(out: Path) -> Path:
    """stepfun-ai/Step-3.5-Flash at its real sizes, headers only (the data is a hole: sparse, no
    disk): its config.json facts (45 layers, dense 0-2, 288 experts, top 8, I=1280, H=4096, 3 MTP
    layers 45-47, 64 heads on full-attention layers and 96 on sliding ones, 8 KV groups) and every
    tensor name and shape the tiny fixture holds (step35_flash), in BF16 as the Hub's BF16 files."""
    n, mtp, hidden, experts, inter, vocab, head = 45, 3, 4096, 288, 1280, 128896, 128
    kinds = (["full_attention"] + ["sliding_attention"] * 3) * 12
    config = step35_flash_config(hidden) | {
        "num_hidden_layers": n,
        "num_nextn_predict_layers": mtp,
        "intermediate_size": 11264,
        "vocab_size": vocab,
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "head_dim": head,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": 96,
            "num_attention_groups": 8,
            "head_dim": head,
        },
        "layer_types": kinds[:n] + ["full_attention"] * mtp,
        "rope_theta": [5000000.0 if k == "full_attention" else 10000.0 for k in kinds[: n + mtp]],
        "partial_rotary_factors": [0.5 if k == "full_attention" else 1.0 for k in kinds[: n + mtp]],
        "moe_num_experts": experts,
        "moe_top_k": 8,
        "moe_intermediate_size": inter,
        "share_expert_dim": inter,
        "moe_layers_enum": ",".join(str(i) for i in range(3, n)),
        "swiglu_limits": [0.0] * 43 + [7.0, 7.0] + [0.0] * mtp,
        "swiglu_limits_shared": [0.0] * 44 + [16.0] + [0.0] * mtp,
        "max_position_embeddings": 262144,
        "sliding_window": 512,
    }
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    shapes |= {"lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for L in range(n + mtp):
        p = f"model.layers.{L}."
        heads = 64 if config["layer_types"][L] == "full_attention" else 96
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head, hidden),
            p + "self_attn.k_proj.weight": (8 * head, hidden),
            p + "self_attn.v_proj.weight": (8 * head, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head),
            p + "self_attn.g_proj.weight": (heads, hidden),
            p + "self_attn.q_norm.weight": (head,),
            p + "self_attn.k_norm.weight": (head,),
        }
        if 3 <= L < n:
            shapes |= {
                p + "moe.gate.weight": (experts, hidden),
                p + "moe.router_bias": (experts,),
                p + "moe.gate_proj.weight": (experts, inter, hidden),
                p + "moe.up_proj.weight": (experts, inter, hidden),
                p + "moe.down_proj.weight": (experts, hidden, inter),
            }
            shapes |= {p + f"share_expert.{r}_proj.weight": (inter, hidden) for r in ("gate", "up")}
            shapes[p + "share_expert.down_proj.weight"] = (hidden, inter)
        else:
            shapes |= {p + f"mlp.{r}_proj.weight": (11264, hidden) for r in ("gate", "up")}
            shapes[p + "mlp.down_proj.weight"] = (hidden, 11264)
        if L >= n:
            shapes |= {p + "enorm.weight": (hidden,), p + "hnorm.weight": (hidden,)}
            shapes |= {p + "eh_proj.weight": (hidden, 2 * hidden)}
            shapes |= {p + "transformer.shared_head.norm.weight": (hidden,)}
            shapes |= {p + "transformer.shared_head.output.weight": (vocab, hidden)}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.mkdir(parents=True)
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no disk used
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
