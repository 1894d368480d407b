"""The CLI: human output, the demo, and one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import save_file


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeport", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_prints_a_table(checkpoint) -> None:
    result = run_cli("inspect", str(checkpoint("deepseek_v3", "hub", "fp8-block")))
    assert result.returncode == 0, result.stderr
    for text in ("deepseek_v3", "dense 0", "MoE 1-2", "fp8-block", "weight_scale_inv", "4 routed"):
        assert text in result.stdout


def test_demo_writes_and_inspects_the_builtin_example(tmp_path) -> None:
    result = run_cli("demo", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "deepseek_v3" in result.stdout and "MoE 1-3" in result.stdout
    report = json.loads(run_cli("inspect", str(tmp_path / "deepseek-v3-tiny"), "--json").stdout)
    assert report["experts"]["per_layer"] == 8 and report["expert_format"]["name"] == "bf16"


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(checkpoint("qwen3_moe", "hub"), dst)
    return dst


def _truncate(path):
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _corrupt_header(path):
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))


def _index_names_missing_file(path):
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _unknown_family(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))


def _no_safetensors(path):
    (path / "model.safetensors").unlink()


def _missing_expert_tensor(path):
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (None, "no such file or folder"),
        (_no_safetensors, "no *.safetensors files"),
        (_truncate, "truncated safetensors file"),
        (_corrupt_header, "corrupt safetensors header"),
        (_index_names_missing_file, "names shard 'model-00002-of-00002.safetensors', which does not exist"),
        (_unknown_family, "unknown model family (model_type llama"),
        (_missing_expert_tensor, "layer 1 expert 2 up_proj lacks companion tensor(s) ['weight']"),
    ],
)
def test_bad_input_gives_one_line_error(checkpoint, tmp_path, damage, message) -> None:
    path = tmp_path / "does-not-exist"
    if damage is not None:
        path = _copy(checkpoint, tmp_path)
        damage(path)
    result = run_cli("inspect", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize(
    ("to", "form", "method"), [("kt-int4", "merged", "AMXINT4"), ("kt-int8", "folders", "AMXINT8")]
)
def test_inspect_recognises_moeports_kt_outputs(tmp_path, to, form, method) -> None:
    from moeport.synthetic import SyntheticSpec, write_synthetic

    src = write_synthetic(tmp_path / "src", SyntheticSpec.tiny()) or tmp_path / "src"
    out = tmp_path / "kt"
    done = run_cli(
        "convert", str(src), str(out), "--to", to, "--kt-layout", form, "--quiet", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    result = run_cli("inspect", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "kt" and report["kt_layout"] == form and report["method"] == method
    assert report["threadpool_count"] == 1 and report["layers"] == [1, 2, 3]
    assert report["experts"] == {"per_layer": 8, "hidden_size": 256, "intermediate_size": 128}
    assert report["source_family"] == "deepseek_v3" and report["source_format"] == "bf16"
    table = run_cli("inspect", str(out))
    assert table.returncode == 0, table.stderr
    for line in (f"kt-kernel CPU experts, {form} form", f"{method}, T=1 (--numa)", "3: 1-3", "8 per layer"):
        assert line in table.stdout, table.stdout


def test_inspect_verbose_lists_the_bytes_of_every_layer(checkpoint) -> None:
    result = run_cli("inspect", str(checkpoint("deepseek_v3", "hub")), "--verbose")
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"│\s+\d+ │", line)]
    assert [row.split("│")[1].strip() for row in rows] == ["0", "1", "2"]
