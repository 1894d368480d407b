"""zoo/tiny.py and zoo/tiny_answers.py: tiny configs transformers accepts, and the model class
built for each, on transformers' own config classes (no model weights: `meta`)."""

from __future__ import annotations

import pytest
from transformers import CONFIG_MAPPING

from moeport.errors import MoeportError
from moeport.zoo.tiny import EXPERTS, build_model, text_overrides, tiny_config

HIDDEN = text_overrides()["hidden_size"]


def test_nope_model_keeps_its_zero_rope_dim() -> None:
    """GLM-5-Next refuses a RoPE dim ('Expecting NoPE ... got 8 as RoPE dim'): the value quoted
    is one of ours, reverted to the class's default; equal head counts come from 'must be the same as'."""
    text = tiny_config("glm5_next_text")
    assert text.qk_rope_head_dim == 0 and text.num_attention_heads == text.num_key_value_heads
    assert text.hidden_size == HIDDEN and text.n_routed_experts == EXPERTS
    assert "sparse" in text.mlp_layer_types  # its default makes the first 3 layers dense


def test_rope_sections_refusal_reverts_the_rope_dim_it_names() -> None:
    text = tiny_config("hy_v4_vl_text")
    assert text.qk_rope_head_dim == CONFIG_MAPPING["hy_v4_vl_text"]().qk_rope_head_dim
    assert sum(text.rope_parameters["mrope_section"]) == text.qk_rope_head_dim // 2


def test_list_typed_size_takes_the_default_lists_length() -> None:
    """ERNIE-4.5-VL types `moe_intermediate_size` list[int] (text and vision experts)."""
    text = tiny_config("ernie4_5_vl_moe_text")
    assert text.moe_intermediate_size == [48] * len(
        CONFIG_MAPPING["ernie4_5_vl_moe_text"]().moe_intermediate_size
    )


@pytest.mark.parametrize(
    ("model_type", "tower", "field"),
    [
        ("inkling2", "vision_config", "text_hidden_size"),  # named in the refusal
        ("dots3_note", "vision_config", "adapter_out_dim"),  # "vision adapter output width must match..."
        ("muse_spark", "audio_config", "out_hidden_size"),
    ],
)
def test_wrapper_towers_output_the_tiny_text_width(model_type: str, tower: str, field: str) -> None:
    config = tiny_config(model_type)
    assert config.get_text_config().hidden_size == HIDDEN
    assert getattr(getattr(config, tower), field) == HIDDEN


def test_other_vocabulary_sizes_follow_the_tiny_vocabulary() -> None:
    """Inkling-2 slices its padded vocabulary to `unpadded_vocab_size` (200058 by default)."""
    text = tiny_config("inkling2").get_text_config()
    assert text.unpadded_vocab_size == text.vocab_size == text_overrides()["vocab_size"]


def test_a_rule_of_the_family_wins_over_the_common_overrides() -> None:
    assert (
        tiny_config("zaya").num_experts_per_tok == 1
    )  # "ZAYA currently supports num_experts_per_tok=1 only"


@pytest.mark.skipif("kolibri1_1" not in CONFIG_MAPPING, reason="Kolibri-1.1 comes with transformers 5.25")
def test_a_field_bounded_by_other_facts_takes_its_lower_bound() -> None:
    """Kolibri-1.1: '`index_num_heads` must be between 1 and the number of query heads of key head
    0' (12 by default; 4 query heads over 2 key heads in the tiny config): it takes 1; its other
    refusal ('a `head_dim` that is a multiple of 16') reverts our head_dim to its default."""
    config = tiny_config("kolibri1_1")
    assert config.index_num_heads == 1 and config.num_attention_heads // config.num_key_value_heads == 2
    assert config.head_dim == CONFIG_MAPPING["kolibri1_1"]().head_dim
    assert config.hidden_size == HIDDEN and config.num_experts == EXPERTS and config.mlp_only_layers == [0]


def test_per_layer_defaults_sized_for_full_depth_get_the_tiny_depths_types() -> None:
    """dots.3's vision encoder sets per-layer expert counts for layers 25-41 unless told its types."""
    config = tiny_config("dots3_note_vision_encoder")
    assert config.num_hidden_layers == 2 and config.mlp_layer_types == ["dense", "sparse"]


@pytest.mark.parametrize(
    ("model_type", "depth"),
    [
        ("lfm2_moe", {"num_hidden_layers": 2}),
        ("deepseek_ocr2", {"text_config": {"num_hidden_layers": 2}}),
        ("dbrx", {"n_layers": 2}),
    ],
)
def test_fields_transformers_defaults_leave_out_are_given(model_type: str, depth: dict) -> None:
    """transformers' own default config (at 2 layers) does not build: its model reads a field the
    config leaves None or does not declare, which real checkpoints' config.json set; the tiny one builds."""
    with pytest.raises(MoeportError, match="transformers cannot build it"):
        build_model(CONFIG_MAPPING[model_type](**depth), "meta")
    model = build_model(tiny_config(model_type, small_vision=False), "meta")
    assert any(".experts." in k for k in model.state_dict())


@pytest.mark.parametrize(
    ("model_type", "cls"),
    [
        ("qwen3_omni_moe_text", "Qwen3OmniMoeThinkerTextModel"),
        ("qwen3_omni_moe_talker_text", "Qwen3OmniMoeTalkerModel"),
        ("step3p5", "Step3p7TextModel"),
        ("qwen3_omni_moe", "Qwen3OmniMoeForConditionalGeneration"),
        ("vitpose_backbone", "VitPoseBackbone"),
    ],
)
def test_config_without_an_auto_class_builds_the_class_its_module_declares(model_type: str, cls: str) -> None:
    assert type(build_model(tiny_config(model_type, small_vision=False), "meta")).__name__ == cls


def test_unknown_model_type_is_one_line() -> None:
    with pytest.raises(MoeportError, match="'no_such_moe' is not in the installed transformers"):
        tiny_config("no_such_moe")


def test_a_familys_own_layer_types_are_kept() -> None:
    """Only all-dense or missing `mlp_layer_types` are filled: DeepSeek-V4's hash-routed layers stay."""
    assert set(tiny_config("deepseek_v4").mlp_layer_types) == {"hash_moe"}


def test_a_sub_config_chosen_at_load_time_builds() -> None:
    """Kimi-K2.5's text_config class is AutoConfig (no model_type of its own): its tiny config is
    built all the same, where it raised AttributeError."""
    config = tiny_config("kimi_k25")
    assert config.text_config.num_hidden_layers >= 1
