"""`moeport inspect --families`: every MoE model type of the installed transformers, with its support."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeport.cli.app import app
from moeport.errors import MoeportError
from moeport.zoo.support import moe_model_types

runner = CliRunner()
TINY_CONFIG_TYPES = (
    "dots3_note dots3_note_vision_encoder ernie4_5_vl_moe ernie4_5_vl_moe_text glm5_next glm5_next_text "
    "hy_v4_vl "
    "hy_v4_vl_text inkling2 inkling2_loop muse_spark zaya dbrx deepseek_ocr2 lfm2_moe deepseek_ocr2_text "
    "diffusion_gemma_text qwen3_omni_moe qwen3_omni_moe_text qwen3_omni_moe_talker_text step3p5 "
    "unlimited_ocr_text vitpose_backbone"
).split()
UNBUILT = ("refuses a tiny config", "cannot build it", "no causal-LM", "no model class")


def test_families_lists_every_moe_model_type_with_how_it_is_supported() -> None:
    result = runner.invoke(app, ["inspect", "--families", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["model_type"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == list(moe_model_types())
    assert rows["deepseek_v3"]["support"] == "zoo" and rows["deepseek_v3"]["detail"].startswith("DeepSeek-V2")
    # derivation reproduces Mixtral's and Qwen3-MoE's hand-written data: the zoo no longer holds them
    assert rows["mixtral"]["support"] == rows["qwen3_moe"]["support"] == "derived"
    assert "block_sparse_moe.experts.{E}.w1/w3/w2" in rows["mixtral"]["detail"]
    assert rows["hunyuan_v1_moe"]["support"] == "derived"
    assert "mlp.experts.{E}.gate_proj/up_proj/down_proj" in rows["hunyuan_v1_moe"]["detail"]
    # transformers' SwitchTransformers keeps each expert as its own module: derived as such
    assert rows["switch_transformers"]["support"] == "derived"
    assert "mlp.experts.expert_{E}.wi/wo" in rows["switch_transformers"]["detail"]

    # tiny configs transformers refused, or model classes not found, before: each now builds, and
    # is derived or says the structural reason derivation stops at
    for model_type in TINY_CONFIG_TYPES:
        detail = rows[model_type]["detail"]
        assert not any(why in detail for why in UNBUILT), (model_type, detail)
    for model_type in ("lfm2_moe", "dots3_note", "qwen3_omni_moe_text", "unlimited_ocr_text"):
        assert rows[model_type]["support"] == "derived", rows[model_type]
    # a sub-config type's checkpoints come from its wrapper: named, with the wrapper's support
    assert "a sub-model of qwen3_omni_moe: " in rows["qwen3_omni_moe_talker_text"]["detail"]
    # Step-3.5-Flash ships its own `step3p5` checkpoints under names transformers maps for step3p7 only
    assert rows["step3p5"]["support"] == "zoo" and rows["step3p7"]["support"] == "derived"
    # VitPose+'s experts are one bare linear each (`mlp.experts.{E}.weight`), with no router
    assert rows["vitpose_backbone"]["support"] == "derived"
    assert "mlp.experts.{E}.weight (each expert one linear)" in rows["vitpose_backbone"]["detail"]

    table = runner.invoke(app, ["inspect", "--families"])
    assert table.exit_code == 0 and "hunyuan_v1_moe" in table.stdout and " derived, " in table.stdout


def test_families_takes_no_path(tmp_path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path), "--families"])  # main() prints it in one line
    assert isinstance(result.exception, MoeportError)
    assert str(result.exception) == "inspect --families takes no checkpoint path"
