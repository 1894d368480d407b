"""The built-in example is a real checkpoint: transformers loads it with every key accounted for."""

from __future__ import annotations

import torch

from moeport.synthetic import SyntheticSpec, write_synthetic


def test_transformers_loads_the_synthetic_checkpoint_with_no_missing_or_unexpected_keys(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    spec = SyntheticSpec.tiny()
    write_synthetic(tmp_path, spec, max_shard_bytes=2_000_000)
    assert (tmp_path / "model.safetensors.index.json").exists()  # several shards
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    assert experts.shape == (spec.n_routed_experts, 2 * spec.moe_intermediate_size, spec.hidden_size)
    assert torch.count_nonzero(experts) == experts.numel()


def test_synthetic_is_reproducible_and_sized(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic(a, SyntheticSpec.tiny())
    write_synthetic(b, SyntheticSpec.tiny())
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    spec = SyntheticSpec.of_size(0.5)
    per_layer = 3 * spec.hidden_size * spec.moe_intermediate_size * (spec.n_routed_experts + 1) * 2
    assert 0.4e9 < per_layer * (spec.num_hidden_layers - spec.first_k_dense_replace) < 0.7e9
