"""Tiny real checkpoints written by transformers' own model classes.

Each family gets a tiny random model (seeded) saved with `save_pretrained` in the hub layout
(transformers reverts to per-expert names on save) and with `save_original_format=False` (the fused
layout transformers holds in memory). FP8-block variants are made with transformers' own
`Fp8Quantize` op and written by `safetensors.save_file`, so no fixture depends on moeport code.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
DEEPSEEK_LIKE = dict(
    n_routed_experts=4,
    moe_intermediate_size=32,
    intermediate_size=64,
    first_k_dense_replace=1,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
)
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)

# model_type -> config overrides (on top of COMMON)
FAMILY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, intermediate_size=64),
    "qwen2_moe": dict(
        num_experts=4, moe_intermediate_size=32, intermediate_size=64, shared_expert_intermediate_size=32
    ),
    "qwen3_next": dict(
        num_experts=4,
        moe_intermediate_size=32,
        intermediate_size=64,
        shared_expert_intermediate_size=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    ),
    "mixtral": dict(num_local_experts=4, intermediate_size=32),
    "minimax_m2": dict(num_local_experts=4, intermediate_size=32, bos_token_id=1, eos_token_id=2),
    "deepseek_v3": {**DEEPSEEK_LIKE, **MLA},
    "glm4_moe": DEEPSEEK_LIKE,
    "glm_moe_dsa": {**DEEPSEEK_LIKE, **MLA, "index_n_heads": 2, "index_head_dim": 16},
    "gpt_oss": dict(num_local_experts=4, intermediate_size=32),
    "deepseek_v4": dict(
        n_routed_experts=4,
        moe_intermediate_size=32,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        o_lora_rank=32,
        o_groups=2,
        index_n_heads=2,
        index_head_dim=16,
        hc_mult=2,
        **MLA,
    ),
    # multimodal wrapper: these go into text_config (see tiny_config)
    "qwen3_5_moe": dict(
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
    ),
}
MULTIMODAL = {
    "qwen3_5_moe": dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
}
FP8_BLOCK = [32, 32]


def tiny_config(model_type: str):
    from transformers import AutoConfig

    text = {**COMMON, **FAMILY_CONFIGS[model_type]}
    if model_type in MULTIMODAL:
        return AutoConfig.for_model(model_type, text_config=text, vision_config=MULTIMODAL[model_type])
    return AutoConfig.for_model(model_type, **text)


def tiny_model(model_type: str):
    """A tiny random model of `model_type` built by transformers' own class."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if model_type in MULTIMODAL else AutoModelForCausalLM
    return auto.from_config(tiny_config(model_type))


def build_transformers_checkpoint(model_type: str, layout: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny random model; layout 'hub' (per-expert names) or 'fused' (transformers v5 layout)."""
    torch.manual_seed(seed)
    model = tiny_model(model_type).to(torch.bfloat16)
    with torch.no_grad():  # transformers' init leaves some parameters at zero; tests want random data
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    model.save_pretrained(out, save_original_format=(layout == "hub"))
    return out


def quantize_fp8_block(
    src: Path,
    out: Path,
    which: Callable[[str, torch.Tensor], bool] | None = None,
    block: list[int] = FP8_BLOCK,
) -> Path:
    """FP8-block copy of `src` (DeepSeek style: weight + weight_scale_inv) via transformers' Fp8Quantize,
    of the tensors `which` picks (default: attention and MLP linears)."""
    from safetensors.torch import save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=block)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    which = which or _is_quantized_linear
    tensors: dict[str, torch.Tensor] = {}
    for key, value in load_tensors(src).items():
        tensors.update(op.convert({key: value}) if which(key, value) else {key: value})
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _is_quantized_linear(key: str, value: torch.Tensor) -> bool:
    """Linear weights of attention and MLPs; router, embeddings, lm_head and norms stay in BF16."""
    skip = ("embed_tokens", "head.weight", "norm", "mlp.gate.", "router", "_bias", "shared_expert_gate")
    return value.ndim >= 2 and value.is_floating_point() and not any(s in key for s in skip)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors' own reader."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """The raw bytes of each safetensors file in a folder, by file name (for byte-identity checks)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.safetensors"))}


def sigint_default() -> None:
    """Popen `preexec_fn`: SIGINT back to its default in the child. A test run started in the
    background of a non-interactive shell ignores SIGINT, children inherit that, and Python then
    installs no KeyboardInterrupt handler: a Ctrl-C test would see the run finish (exit 0)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
