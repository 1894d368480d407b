"""Step-3.5-Flash (stepfun-ai/Step-3.5-Flash, `step3p5`) under the Hub's own names (zoo/families.py).

The checkpoint is written by transformers' own save of a seeded Step3p7 model whose text config is
the Hub's (tests/public_fixtures.step35_flash): its `step3p7` conversion mapping gives Step-3.5's
`model.layers.{L}.moe.gate_proj.weight` / `up_proj` [E, I, H] and `down_proj` [E, H, I] stacks,
`moe.gate.weight`, `moe.router_bias` and `share_expert.`; an MTP layer is stored as the Hub stores
it, as one more decoder layer `model.layers.{num_hidden_layers}.` with `enorm`/`hnorm`/`eh_proj`
and `transformer.shared_head.*`. transformers loads that save (the oracle for the logits), and the
fused output with its own Step3p7 text model (model_type `step3p5`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors, quantize_fp8_block
from public_fixtures import STEP35_LAYERS, step35_flash, step35_flash_headers
from rich.console import Console
from safetensors import safe_open

from moeport.cli.convert import RunFlags, run_convert
from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.recipes import Options
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.derived import derive_family
from moeport.zoo.families import family_for_model_type

MTP_LAYER = STEP35_LAYERS  # the Hub's MTP layers follow the decoder layers


def _convert(src: Path, dst: Path, to: str, **options) -> Path:
    run_convert(src, dst, to, Options(**options), RunFlags(False, True, True), Console(quiet=True))
    return dst


@pytest.fixture(scope="module")
def step35(tmp_path_factory) -> tuple[Path, Path]:
    """(the hub checkpoint, transformers' save of the same weights as a Step3p7 model)."""
    return step35_flash(tmp_path_factory.mktemp("step35") / "hub")


def test_zoo_entry_is_transformers_step3p7_mapping() -> None:
    """The zoo's Step-3.5 names are those transformers' `step3p7` mapping gives its text model:
    same hub stacks, per-expert linears, router bias and non-expert renames (minus the wrapper's
    `model.language_model.` and vision renames, which Step-3.5's text-only checkpoint has not)."""
    zoo, step3p7 = family_for_model_type("step3p5"), derive_family("step3p7")
    assert zoo.hub == step3p7.hub and zoo.linear == step3p7.linear and zoo.fused == step3p7.fused
    assert set(zoo.fused_renames) <= set(step3p7.fused_renames)
    assert set(zoo.router_bias) == set(step3p7.router_bias) and zoo.router == step3p7.router
    assert zoo.shared_expert == step3p7.shared_expert
    # transformers' own step3p5 (text) model holds the fused layout the zoo converts to
    assert derive_family("step3p5").fused == zoo.fused


def test_inspect_finds_experts_shared_expert_and_mtp_layer(step35) -> None:
    hub, _ = step35
    with open_checkpoint(hub) as ck:
        det = detect(ck)
    assert det.family.name == "step3p5" and det.layout == det.family.hub
    assert (det.experts_per_layer, det.experts_per_token, det.shared_experts) == (4, 2, 1)
    assert det.dense_layers == [0] and det.moe_layers == [1, 2, 3] and det.mtp_layers == [MTP_LAYER]
    assert det.expert_tensors[0] == "model.layers.{L}.moe.gate_proj.weight"


def test_hub_fused_round_trip_and_transformers_logits(step35, tmp_path: Path) -> None:
    """hub -> fused -> hub is bit-identical (MTP layer included); transformers' Step3p7 text model
    on the fused output gives the logits transformers gives on its own save of the same weights."""
    from transformers import Step3p7ForConditionalGeneration, Step3p7TextModel

    hub, saved = step35
    source = load_tensors(hub)
    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    written = load_tensors(fused)
    gate, up = source["model.layers.2.moe.gate_proj.weight"], source["model.layers.2.moe.up_proj.weight"]
    assert torch.equal(written["model.layers.2.mlp.experts.gate_up_proj"], torch.cat([gate, up], dim=1))
    bias = written["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert torch.equal(bias, source["model.layers.2.moe.router_bias"])
    mtp = [k for k in source if k.startswith(f"model.layers.{MTP_LAYER}.")]
    assert any(k.endswith("eh_proj.weight") for k in mtp)
    assert all(torch.equal(written[k], source[k]) for k in mtp)  # carried under its own names
    back = load_tensors(_convert(fused, tmp_path / "back", "hf", layout="hub"))
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in source.items())

    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    reference = Step3p7ForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).eval()
    model, info = Step3p7TextModel.from_pretrained(fused, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] == {"lm_head.weight"}  # a base model
    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight").float()
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        hidden = model.eval()(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(torch.nn.functional.linear(hidden, head), expected)


def test_w4a16_and_kt_int4_verify(step35, tmp_path: Path) -> None:
    """--to w4a16 quantizes every routed expert as a per-expert linear (`moe.experts.{E}.gate_proj`,
    the names of the public per-expert Step-3.5 quantizations) and keeps the MTP layer's tensors;
    --to kt-int4 refuses the split gate/up stacks in one line, and runs from per-expert linears
    (`--layout linear`, which gives the hub stacks back bit for bit)."""
    hub, _ = step35
    w4 = _convert(hub, tmp_path / "w4a16", "w4a16", group_size=32)
    written = load_tensors(w4)
    assert "model.layers.3.moe.experts.3.up_proj.weight_packed" in written
    assert f"model.layers.{MTP_LAYER}.transformer.shared_head.output.weight" in written
    config = json.loads((w4 / "config.json").read_text())
    assert config["model_type"] == "step3p5" and config["quantization_config"]["format"] == "pack-quantized"
    assert verify(hub, w4).ok

    with pytest.raises(MoeportError, match="--to hf --layout linear first") as refused:
        _convert(hub, tmp_path / "kt-refused", "kt-int4", numa=1)
    assert "\n" not in str(refused.value)
    linear = _convert(hub, tmp_path / "linear", "hf", layout="linear")
    assert "model.layers.1.moe.experts.3.down_proj.weight" in load_tensors(linear)
    back = load_tensors(_convert(linear, tmp_path / "back", "hf", layout="hub"))
    source = load_tensors(hub)
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], v) for k, v in source.items())
    kt = _convert(linear, tmp_path / "kt", "kt-int4", numa=1)
    assert f"model.layers.{MTP_LAYER}.eh_proj.weight" in load_tensors(kt)  # the MTP layer is carried
    assert verify(linear, kt).ok


def _fp8_experts(src: Path, out: Path) -> Path:
    """`src` with its routed expert stacks in FP8 blocks of 128 x 128 (`weight` E4M3 +
    `weight_scale_inv` [E, N/128, K/128]), quantized by transformers' own Fp8Quantize: the names
    transformers' step3p7 mapping reads (`moe.down_proj.weight_scale_inv`)."""

    def stacks(key: str, _) -> bool:
        return ".moe." in key and key.endswith("_proj.weight")

    return quantize_fp8_block(src, out, stacks, block=[128, 128])


def test_fp8_block_expert_stacks_round_trip_and_quantize(step35, tmp_path: Path) -> None:
    """FP8-block expert stacks: found with their scales, fused into transformers' `gate_up_proj` /
    `gate_up_proj_scale_inv` and back bit for bit, and decoded per weight for --to w4a16."""
    fp8 = _fp8_experts(step35[0], tmp_path / "fp8")
    with open_checkpoint(fp8) as ck:
        det = detect(ck)
    assert det.expert_format.name == "fp8-block" and det.layout == det.family.hub
    assert "model.layers.{L}.moe.up_proj.weight_scale_inv" in det.expert_tensors
    fused = load_tensors(_convert(fp8, tmp_path / "fused", "hf", layout="fused"))
    assert fused["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].shape == (4, 4, 2)
    back = load_tensors(_convert(tmp_path / "fused", tmp_path / "back", "hf", layout="hub"))
    source = load_tensors(fp8)
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in source.items())
    w4 = _convert(fp8, tmp_path / "w4a16", "w4a16", group_size=32)
    assert verify(fp8, w4).ok


def test_full_size_headers_inspect_and_plan(tmp_path: Path) -> None:
    """Step-3.5-Flash at its real sizes (sparse files: headers only): 288 routed experts, 8 per
    token, 1 shared, dense layers 0-2, MoE 3-44, MTP 45-47 (199.3B parameters, 371 GiB in BF16:
    the Hub's 196.8B and ~372 GB, MTP layers included); the fused conversion is planned in full
    before any data is read."""
    from typer.testing import CliRunner

    from moeport.cli.app import app

    src = step35_flash_headers(tmp_path / "full")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert (det.experts_per_layer, det.experts_per_token, det.shared_experts) == (288, 8, 1)
    assert det.dense_layers == [0, 1, 2] and det.moe_layers == list(range(3, 45))
    assert det.mtp_layers == [45, 46, 47] and det.expert_intermediate_size == 1280
    result = CliRunner().invoke(
        app,
        [
            "convert",
            str(src),
            str(tmp_path / "fused"),
            "--to",
            "hf",
            "--layout",
            "fused",
            "--dry-run",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] and plan["bytes_in"] == (src / "model.safetensors").stat().st_size - _header(src)
    assert not (tmp_path / "fused").exists()


def _header(folder: Path) -> int:
    """The bytes of a safetensors file before its data: the 8-byte length and the JSON header."""
    with open(folder / "model.safetensors", "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")
