"""Detection on real transformers checkpoints of every fixture family, compared with their configs."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import FAMILY_CONFIGS, tiny_config, tiny_model
from typer.testing import CliRunner

from moeport.cli.app import app
from moeport.zoo.derived import lookup_family

runner = CliRunner()


def inspect_json(path) -> dict:
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("fmt", ["bf16", "fp8-block"])
@pytest.mark.parametrize("layout", ["hub", "fused"])
@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_inspect_matches_model_config(checkpoint, model_type: str, layout: str, fmt: str) -> None:
    report = inspect_json(checkpoint(model_type, layout, fmt))
    cfg = tiny_config(model_type).get_text_config()
    family = lookup_family([model_type])[0]  # the zoo's, else derived from transformers

    assert report["family"] == family.name
    assert report["model_type"] == model_type
    n_experts = next(
        getattr(cfg, f)
        for f in ("n_routed_experts", "num_experts", "num_local_experts")
        if getattr(cfg, f, None) is not None
    )
    assert report["experts"]["per_layer"] == n_experts
    assert report["experts"]["per_token"] == cfg.num_experts_per_tok
    assert report["experts"]["hidden_size"] == cfg.hidden_size

    first_dense = cfg.first_k_dense_replace if family.fields.first_dense else 0
    assert report["layers"]["num_hidden_layers"] == cfg.num_hidden_layers
    assert report["layers"]["dense"] == list(range(first_dense))
    assert report["layers"]["moe"] == list(range(first_dense, cfg.num_hidden_layers))
    assert report["layers"]["mtp"] == []
    shared = getattr(cfg, "n_shared_experts", None) or (
        1 if getattr(cfg, "shared_expert_intermediate_size", 0) else 0
    )
    assert report["experts"]["shared"] == (shared if family.shared_expert else 0)

    expected_layout = family.hub if layout == "hub" else family.fused
    assert report["experts"]["layout"] == expected_layout.kind
    assert report["experts"]["gate_up_interleaved"] == (model_type == "gpt_oss")
    fmt_report = report["expert_format"]
    assert fmt_report["name"] == fmt
    if fmt == "fp8-block":
        assert fmt_report["block"] == [32, 32] and fmt_report["scale"] == "weight_scale_inv"
        assert any(t.endswith("scale_inv") for t in report["expert_tensors"])
    assert report["warnings"] == []

    by = report["bytes"]
    assert by["experts"] + by["non_expert"] == by["total"]
    assert sum(v["experts"] for v in by["per_layer"].values()) == by["experts"]
    assert all(by["per_layer"][str(L)]["experts"] > 0 for L in report["layers"]["moe"])


def test_expert_bytes_match_the_model_parameters(checkpoint) -> None:
    """Bytes reported for experts equal what transformers' module holds for them."""
    from transformers import AutoModelForCausalLM

    path = checkpoint("qwen3_moe", "fused")
    report = inspect_json(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    assert report["bytes"]["experts"] == expert_bytes


def test_zoo_fused_layout_is_what_transformers_holds() -> None:
    """Every fixture family's declared fused layout names the parameters of transformers' own modules."""
    for model_type in FAMILY_CONFIGS:
        family = lookup_family([model_type])[0]
        names = set(tiny_model(model_type).state_dict())
        held = [
            p
            for p in family.layer_prefixes
            if all(t.replace("{L}", "1") in names for t in family.fused.templates(p))
        ]
        assert held, (model_type, family.fused.templates(family.layer_prefixes[-1]))


def test_mtp_layer_after_the_last_layer_is_reported_as_mtp(checkpoint, tmp_path) -> None:
    """DeepSeek-V3 ships its MTP module as layer num_hidden_layers (with extra enorm/hnorm/eh_proj)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = checkpoint("deepseek_v3", "hub", "fp8-block"), tmp_path / "with-mtp"
    dst.mkdir()
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    last = tiny_config("deepseek_v3").num_hidden_layers
    mtp = {
        k.replace(f"layers.{last - 1}.", f"layers.{last}."): v.clone()
        for k, v in tensors.items()
        if f"layers.{last - 1}." in k
    }
    g = torch.Generator().manual_seed(3)
    mtp[f"model.layers.{last}.enorm.weight"] = torch.randn(64, generator=g).bfloat16()
    mtp[f"model.layers.{last}.eh_proj.weight"] = torch.randn(64, 128, generator=g).bfloat16()
    save_file({**tensors, **mtp}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())

    report = inspect_json(dst)
    assert report["layers"]["mtp"] == [last]
    assert report["layers"]["moe"] == list(range(1, last))
    assert report["bytes"]["per_layer"][str(last)]["experts"] == report["bytes"]["per_layer"]["1"]["experts"]


def test_deepseek_v4_raw_names_without_model_prefix(checkpoint, tmp_path) -> None:
    """DeepSeek-V4 hub checkpoints use DeepSeek's own names: `layers.{L}.ffn.experts.{E}.w1.weight`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = checkpoint("deepseek_v4", "hub"), tmp_path / "dsv4-raw"
    dst.mkdir()
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        tensors = {k.removeprefix("model."): h.get_tensor(k) for k in h.keys()}
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    report = inspect_json(dst)
    assert report["expert_tensors"][0] == "layers.{L}.ffn.experts.{E}.w1.weight"
    assert report["layers"]["moe"] == [0, 1, 2] and report["experts"]["shared"] == 1
