"""Several expert stacks in one checkpoint (detect/stacks.py): Qwen3-Omni's thinker and talker,
saved by transformers' own classes, with different sizes in each stack as in the real checkpoints
(thinker H=2048, talker H=1024 on the Hub; here 256 and 128, 4 and 6 experts: sizes kt takes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from rich.console import Console
from safetensors.torch import save_file
from test_zoo_derived import _convert, _save_seeded

from moeport.cli.convert import RunFlags, run_convert
from moeport.detect import detect
from moeport.detect.layout import LayerNaming
from moeport.errors import MoeportError
from moeport.recipes import Options
from moeport.report import inspect_report
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.model_config import ModelConfig
from moeport.zoo.tiny import build_model, text_overrides, tiny_config


def _summary(src: Path, dst: Path, to: str, capsys, **options) -> dict:
    """convert --json's summary of a finished run (its notes)."""
    flags = RunFlags(overwrite=True, quiet=True, as_json=True)
    run_convert(src, dst, to, Options(**options), flags, Console(quiet=True))
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Path:
    """A tiny Qwen3-Omni (thinker, talker, code2wav) whose talker has its own sizes, seeded."""
    config = tiny_config("qwen3_omni_moe", text_overrides(hidden=256, inter=256, dense=256))
    talker = config.talker_config.text_config
    talker.hidden_size, talker.moe_intermediate_size, talker.num_experts = 128, 128, 6
    talker.shared_expert_intermediate_size = 128
    torch.manual_seed(0)
    return _save_seeded(build_model(config, "cpu"), tmp_path_factory.mktemp("omni") / "src")


def test_thinker_and_talker_are_stacks_numbered_after_each_other(omni: Path) -> None:
    raw = json.loads((omni / "config.json").read_text())
    cfg = ModelConfig(raw).at("thinker_config.text_config")  # a nested text config, read
    assert (
        cfg.first_int(("num_experts",)) == 4
        and cfg.at("talker_config.text_config").first_int(("hidden_size",)) == 128
    )
    assert ModelConfig(raw).text_path == ""  # two sub-configs with a text config: the family says which
    with open_checkpoint(omni) as ck:
        det = detect(ck)
        keys = ck.keys()
    naming = det.naming
    assert naming.main == "thinker.model.layers.{L}." and naming.stacks == (("talker.model.layers.{L}.", 2),)
    assert det.moe_layers == [0, 1, 2, 3] and not det.mtp_layers and not det.dense_layers
    assert det.layer_experts == {0: 4, 1: 4, 2: 6, 3: 6} and det.experts_in(3) == 6
    assert det.experts_per_layer == 4 and det.hidden_size == 256  # the main stack's
    thinker, talker = det.stacks
    assert (thinker.config, thinker.hidden_size, thinker.expert_intermediate_size) == (
        "thinker_config.text_config",
        256,
        256,
    )
    assert (talker.prefix, talker.layers, talker.experts) == ("talker.model.layers.{L}.", (2, 3), 6)
    assert (talker.config, talker.hidden_size, talker.expert_intermediate_size) == (
        "talker_config.text_config",
        128,
        128,
    )
    assert naming.split("talker.model.layers.1.mlp.gate.weight") == (3, "mlp.gate.weight")
    assert (
        naming.prefix(3) == "talker.model.layers.1." and naming.stack_of(3) == 1 and naming.stack_of(1) == 0
    )
    # the talker's code predictor and code2wav have layers too, but no experts: other tensors
    assert naming.layer_of("talker.code_predictor.model.layers.0.mlp.up_proj.weight") is None
    assert any(k.startswith("code2wav.") for k in keys)
    assert not det.warnings
    stacks = inspect_report(omni, det)["stacks"]  # `inspect` lists each stack with its own sizes
    assert [(st["prefix"], st["experts"], st["hidden_size"]) for st in stacks] == [
        ("thinker.model.layers.{L}.", 4, 256),
        ("talker.model.layers.{L}.", 6, 128),
    ]


def test_stacks_of_different_sizes_round_trip_and_quantize(omni: Path, tmp_path: Path) -> None:
    """hub -> fused -> hub bit for bit, each stack with its own expert count; w4a16 verifies."""
    fused = load_tensors(_convert(omni, tmp_path / "fused", "hf", layout="fused"))
    assert fused["talker.model.layers.1.mlp.experts.gate_up_proj"].shape == (6, 256, 128)
    assert fused["thinker.model.language_model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 512, 256)
    back = load_tensors(_convert(tmp_path / "fused", tmp_path / "back", "hf", layout="hub"))
    src = load_tensors(omni)
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], v) for k, v in src.items())
    w4 = _convert(omni, tmp_path / "w4a16", "w4a16", group_size=32)
    assert "talker.model.layers.1.mlp.experts.5.down_proj.weight_packed" in load_tensors(w4)
    assert verify(omni, w4).ok


@pytest.mark.parametrize("kt_layout", ["merged", "folders"])
def test_kt_converts_the_main_stack_and_says_which(
    omni: Path, tmp_path: Path, capsys, kt_layout: str
) -> None:
    """kt's layout has one expert size: the thinker's experts become kt's, the talker's (another
    size) stay as stored in the merged form, the run says so in one note, and verify passes."""
    out = tmp_path / "kt"
    # the files do not depend on the CPU (no kt-kernel runs here): --kt-any-cpu where AVX-512 lacks
    notes = _summary(omni, out, "kt-int4", capsys, numa=1, kt_layout=kt_layout, kt_any_cpu=True)["notes"]
    said = [
        n for n in notes if n.startswith("kt: converted the experts of 2 layers (H=256, I=256, 4 experts")
    ]
    assert len(said) == 1 and "'talker.model.layers.{L}.' have other sizes" in said[0], notes
    if kt_layout == "merged":
        stored, src = load_tensors(out), load_tensors(omni)
        name = "talker.model.layers.1.mlp.experts.5.up_proj.weight"
        assert torch.equal(stored[name], src[name])
        assert not any(k.startswith("thinker.model.layers.1.mlp.experts.") for k in stored)
    assert verify(omni, out).ok


def test_gptq_of_several_stacks_is_refused_before_any_work(omni: Path, tmp_path: Path) -> None:
    """Calibration runs one decoder's hidden states through its layers: one line, no output."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([list(range(3, 19))]))
    with pytest.raises(MoeportError, match="several expert stacks .*leave out --method gptq"):
        _convert(
            omni,
            tmp_path / "gptq",
            "w4a16",
            group_size=32,
            method="gptq",
            calibration=str(ids),
            samples=1,
            seq_len=8,
        )
    assert not (tmp_path / "gptq").exists()


def test_a_stack_in_another_layout_is_refused(omni: Path, tmp_path: Path) -> None:
    """Per-expert thinker, fused talker: one checkpoint holds one expert layout."""
    fused = load_tensors(_convert(omni, tmp_path / "fused", "hf", layout="fused"))
    mixed = {k: v for k, v in load_tensors(omni).items() if not k.startswith("talker.model.layers.")}
    mixed |= {k: v for k, v in fused.items() if k.startswith("talker.model.layers.")}
    (tmp_path / "mixed").mkdir()
    save_file(mixed, str(tmp_path / "mixed" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(omni / "config.json", tmp_path / "mixed" / "config.json")
    with open_checkpoint(tmp_path / "mixed") as ck, pytest.raises(MoeportError, match="one expert layout"):
        detect(ck)


def test_a_stack_contradicting_its_own_config_is_refused(omni: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(omni, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["talker_config"]["text_config"]["num_experts"] = 5
    (bad / "config.json").write_text(json.dumps(raw))
    with (
        open_checkpoint(bad) as ck,
        pytest.raises(MoeportError, match=r"talker_config\.text_config.* hold 6"),
    ):
        detect(ck)


def test_layer_naming_numbers_each_stack_after_the_storages_before_it() -> None:
    naming = LayerNaming("model.layers.{L}.", "mtp.layers.{L}.", 4)
    grown = naming.with_stacks(
        ["encoder.layers.{L}.", "decoder.layers.{L}."],
        {"model.layers.{L}.": 4, "mtp.layers.{L}.": 1, "encoder.layers.{L}.": 3},
    )
    assert grown.stacks == (("encoder.layers.{L}.", 5), ("decoder.layers.{L}.", 8))
    assert [grown.prefix(L) for L in (3, 4, 5, 7, 8)] == [
        "model.layers.3.",
        "mtp.layers.0.",
        "encoder.layers.0.",
        "encoder.layers.2.",
        "decoder.layers.0.",
    ]
    assert grown.split("decoder.layers.2.mlp.gate.weight") == (10, "mlp.gate.weight")
    assert [grown.stack_of(L) for L in (0, 4, 5, 9)] == [0, 0, 1, 2]
    assert naming.with_stacks([], {}) == naming  # no stacks: the single-stack naming unchanged
