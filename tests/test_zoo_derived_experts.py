"""Expert structures read off transformers' module tree (zoo/derived_experts.py) beyond the
per-expert gate/up/down linears: non-gated experts (Nemotron-H's up/down), stacks the Hub keeps as
a block's own modules (Granite's `input_linear.weight`), stacks with biases. The per-type end to
end checks are test_zoo_derived's; these are the quantize targets where that module's tiny sizes
do not fit one of these models, and the layouts themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_zoo_derived import _convert, _record, _save_tiny

from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.derived import _revert
from moeport.zoo.derived_experts import fused_experts, hub_experts
from moeport.zoo.families import ExpertLayout
from moeport.zoo.support import support
from moeport.zoo.tiny import build_model, tiny_config


def test_non_gated_experts_quantize_and_kt_refuses_in_one_line(tmp_path: Path) -> None:
    """Nemotron-H's experts are up/down only: w4a16 writes per-expert up_proj/down_proj that verify
    against the source; kt-kernel (SwiGLU only) is refused before any work, saying why."""
    src = _save_tiny("nemotron_h", tmp_path / "src", hidden=64, inter=64, dense=64)
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert not det.layout.gated and det.layout.kind == "per-expert"
    out = _convert(src, tmp_path / "w4a16", "w4a16", group_size=32)
    with open_checkpoint(out) as ck:
        names = ck.keys()
    assert "backbone.layers.1.mixer.experts.3.up_proj.weight_packed" in names
    assert not any(".experts.3.gate_proj" in n for n in names)
    report = verify(src, out)
    assert report.ok, [r.name for r in report.flagged][:5]
    with pytest.raises(MoeportError, match=r"up/down only \(no gate\); kt-kernel runs gated") as refused:
        _convert(src, tmp_path / "kt", "kt-int4", numa=1)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "kt").exists()
    # README's table (bench/families_table.py runs this module too): built here at its own sizes
    # (test_zoo_derived's 256-wide matrix model is over its parameter limit)
    _record("nemotron_h", "build", "ok")
    _record("nemotron_h", "w4a16", "ok")
    _record("nemotron_h", "kt-int4", "refused (not gated)")


def test_non_gated_round_trip_stacks_each_role(tmp_path: Path) -> None:
    """hub -> fused stacks each role's experts ([E, I, H] up, [E, H, I] down), nothing concatenated."""
    src = _save_tiny("nemotron_h", tmp_path / "src")
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    with open_checkpoint(src) as a, open_checkpoint(fused) as b:
        up = b.read("model.layers.1.mixer.experts.up_proj")
        for e in range(up.shape[0]):
            assert torch.equal(up[e], a.read(f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"))


@pytest.mark.parametrize("model_type", ["granitemoe", "jetmoe", "aria_text"])
def test_hub_stacks_are_the_memory_stacks_renamed(model_type: str) -> None:
    """Granite (`block_sparse_moe.input_linear.weight`), JetMoE (the same in memory) and Aria
    (`experts.fc1.weight`, [E, H, 2I]) keep fused stacks on the Hub: read as the tensors
    transformers' reverted mapping hands back, the same objects the model holds."""
    model = build_model(tiny_config(model_type, small_vision=False), "meta")
    state = model.state_dict()
    hidden = int(model.config.get_text_config().hidden_size)
    fused, keys = fused_experts(model_type, state, hidden)
    hub, _, hub_keys = hub_experts(model_type, model, state, _revert(model, state), fused, keys)
    assert hub.kind == "fused" and hub.dotted and len(hub_keys) == len(keys)
    expected = {
        "granitemoe": ExpertLayout(
            "fused",
            "block_sparse_moe",
            {"gate_up": "input_linear", "down": "output_linear"},
            container="",
            dotted=True,
        ),
        "jetmoe": fused["layout"],
        "aria_text": ExpertLayout(
            "fused", "mlp", {"gate_up": "fc1", "down": "fc2"}, transposed=True, dotted=True
        ),
    }[model_type]
    assert hub == expected
    assert hub.templates("model.layers.{L}.")[0].endswith(f"{hub.projs['gate_up']}.weight")


def test_experts_directly_in_the_layer_and_biased_stacks_are_derived() -> None:
    """Mistral-Large-4's hub experts sit in the layer (`layers.{L}.experts.{E}.w1`); Gemma-4 holds its
    stacks there too; openai_privacy_filter's stacks carry biases (GPT-OSS-like, not interleaved)."""
    mistral = support("mistral_large4_text").family
    assert mistral is not None and mistral.hub.block == "" and mistral.hub.base == "experts."
    gemma = support("gemma4_text").family
    assert gemma is not None and gemma.fused.block == "" and gemma.router == ("router.proj.weight",)
    biased = support("openai_privacy_filter").family
    assert biased is not None and biased.hub.transposed and not biased.hub.gate_up_interleaved
