"""Detection and codecs together, on real checkpoints: decode the experts a detection names and
compare with what transformers itself loads from the same files."""

from __future__ import annotations

import pytest
import torch

from moeport.codecs.registry import codec_for
from moeport.detect import detect
from moeport.sources import open_checkpoint


def expert_parts(ck, det, layer: int, expert: int, proj: str) -> dict[str, torch.Tensor]:
    prefix = det.layer_prefix.replace("{L}", str(layer)) + f"{det.layout.block}.experts.{expert}.{proj}."
    return {k[len(prefix) :]: ck.read(k) for k in ck.keys() if k.startswith(prefix)}


@pytest.mark.parametrize("model_type", ["deepseek_v3", "minimax_m2", "qwen3_moe"])
def test_decoded_fp8_experts_equal_transformers_dequantized_weights(checkpoint, model_type) -> None:
    """transformers loads an FP8 checkpoint on CPU by dequantizing it; our decode must agree exactly."""
    from transformers import AutoModelForCausalLM

    path = checkpoint(model_type, "hub", "fp8-block")
    with open_checkpoint(path) as ck:
        det = detect(ck)
        codec = codec_for(det.expert_format)
        layer = det.moe_layers[-1]
        projs = det.layout.projs
        ours = {
            role: codec.decode(expert_parts(ck, det, layer, 2, projs[role]))
            for role in ("gate", "up", "down")
        }
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    experts = model.model.layers[layer].mlp.experts
    gate_up, down = experts.gate_up_proj[2], experts.down_proj[2]
    inter = ours["gate"].shape[0]
    assert torch.equal(gate_up[:inter], ours["gate"])
    assert torch.equal(gate_up[inter:], ours["up"])
    assert torch.equal(down, ours["down"])


def test_bf16_experts_decode_to_the_model_parameters(checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoint("glm4_moe", "hub")
    with open_checkpoint(path) as ck:
        det = detect(ck)
        down = codec_for(det.expert_format).decode(expert_parts(ck, det, 1, 3, "down_proj"))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj[3].float(), down)
