"""`moeport inspect --families`: every MoE model type of the installed transformers, with its support."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moeport.cli.app import app
from moeport.errors import MoeportError
from moeport.zoo.support import moe_model_types

runner = CliRunner()


def test_families_lists_every_moe_model_type_with_how_it_is_supported() -> None:
    result = runner.invoke(app, ["inspect", "--families", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["model_type"]: r for r in json.loads(result.stdout)}
    assert sorted(rows) == list(moe_model_types())
    assert rows["mixtral"]["support"] == "zoo" and rows["mixtral"]["detail"] == "Mixtral"
    assert rows["hunyuan_v1_moe"]["support"] == "derived"
    assert "mlp.experts.{E}.gate_proj/up_proj/down_proj" in rows["hunyuan_v1_moe"]["detail"]
    # transformers' SwitchTransformers keeps each expert as its own module: said, not guessed
    assert rows["switch_transformers"]["support"] == "not"
    assert "separate modules" in rows["switch_transformers"]["detail"]

    table = runner.invoke(app, ["inspect", "--families"])
    assert table.exit_code == 0 and "hunyuan_v1_moe" in table.stdout and " derived, " in table.stdout


def test_families_takes_no_path(tmp_path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path), "--families"])  # main() prints it in one line
    assert isinstance(result.exception, MoeportError)
    assert str(result.exception) == "inspect --families takes no checkpoint path"
