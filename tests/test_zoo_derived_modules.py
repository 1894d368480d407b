"""Experts held as separate modules (zoo/derived_modules.py): Switch Transformers' `wi`/`wo` and
NLLB-MoE's biased `fc1`/`fc2`, one module per expert named `experts.expert_{E}`, in the encoder and
in the decoder. The per-type end to end checks (inspect, round trip, logits, w4a16, kt's refusal)
are test_zoo_derived's; these are the layouts read off transformers' models, the names of the real
Hub checkpoints, and transformers loading our W4A16 output."""

from __future__ import annotations

import pytest

from moeport.zoo.derived import _revert
from moeport.zoo.derived_experts import NotDerivable
from moeport.zoo.derived_modules import module_experts
from moeport.zoo.families import ExpertLayout
from moeport.zoo.tiny import EXPERTS, build_model, tiny_config

SWITCH = ExpertLayout("per-expert", "mlp", {"up": "wi", "down": "wo"}, index_prefix="expert_")
NLLB = ExpertLayout("per-expert", "ffn", {"up": "fc1", "down": "fc2"}, index_prefix="expert_")


@pytest.mark.parametrize(
    ("model_type", "layout", "templates"),
    [
        ("switch_transformers", SWITCH, ["encoder.block.{L}.layer.1.", "decoder.block.{L}.layer.2."]),
        ("nllb-moe", NLLB, ["encoder.layers.{L}.", "decoder.layers.{L}."]),
    ],
)
def test_separate_expert_modules_are_up_down_layouts_in_two_stacks(
    model_type: str, layout: ExpertLayout, templates: list[str]
) -> None:
    """Each expert module's two linears are up [I, H] and down [H, I]; the encoder's experts are the
    main stack, the decoder's another; Switch's sub-layer (`layer.1.` in the encoder, `layer.2.` in
    the decoder) goes into each stack's layer template so that one layout names both."""
    model = build_model(tiny_config(model_type, small_vision=False), "meta")
    state = model.state_dict()
    hidden = int(model.config.d_model)
    found, keys = module_experts(model_type, state, _revert(model, state), hidden, EXPERTS, NotDerivable("-"))
    assert found["layout"] == layout
    assert found["templates"] + found["stack_templates"] == templates
    parts = 4 if model_type == "nllb-moe" else 2  # NLLB-MoE's expert linears carry biases
    assert len(keys) == 2 * EXPERTS * parts and set(keys) <= set(state)
    for template in templates:  # every MoE layer of both stacks holds what the layout names
        layer = template.replace("{L}", "1")
        for name in layout.templates(layer):
            assert name.replace("{E}", str(EXPERTS - 1)) in state, name


def test_models_without_expert_modules_keep_their_reason() -> None:
    """A model with no `experts.<index>.<proj>` linears (VitPose+'s experts are bare linears) is
    refused with the reason no fused stacks were found, unchanged."""
    model = build_model(tiny_config("vitpose_backbone", small_vision=False), "meta")
    state = model.state_dict()
    why = NotDerivable("vitpose_backbone: experts are separate modules")
    with pytest.raises(NotDerivable) as refused:
        module_experts("vitpose_backbone", state, _revert(model, state), 64, EXPERTS, why)
    assert refused.value is why
