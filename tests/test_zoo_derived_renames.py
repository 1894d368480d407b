"""Renames of derived families: segment pairs that hold for every layer of a real checkpoint, and
tensors transformers converts on load carried where its loader still converts them.

The oracle is transformers' own key renaming (`rename_source_key`, what `from_pretrained` applies),
asked about layer and block indices the tiny model does not have.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from safetensors.torch import save_file
from test_zoo_derived import _convert, _load, _logits, _save_tiny
from transformers import CONFIG_MAPPING

from moeport.detect import detect
from moeport.detect.layout import match_layout
from moeport.errors import MoeportError
from moeport.mappings.rename import Rename
from moeport.sources import open_checkpoint
from moeport.zoo.derived import _revert, derive_family
from moeport.zoo.derived_renames import segment_renames
from moeport.zoo.support import support
from moeport.zoo.tiny import build_model, tiny_config

# one type per kind of rename this module derives (Laguna's and Sarvam-MoE's: the tests below)
TYPES = {
    "bailing_hybrid": "conv1d stack on load; `attention.A_log` -> `self_attn.forget_gate.A_log`",
    "inkling2": "layer L's query at index L - 1: `attn_queries.*` -> `layers.*+1.attention_input.query`",
    "mistral_large4": "wrapper prefix before text layers named as in its vision tower (`attention.wo`)",
    "minimax_m3_vl": "wrapper swap `language_model.model` -> `model.language_model`",
    "qwen3_omni_moe_thinker": "towers moved under `model.`, the text model under `model.language_model`",
    "unlimited_ocr": "SAM blocks `blocks.{N}.norm1` -> `layers.{N}.layer_norm1` (a '*' pair)",
}


def _transformers_names(model_type: str) -> tuple[Rename, dict[str, str]]:
    """Our derived rename, and transformers' own name (before any converter) for each hub key of
    the tiny model, with every stack index moved past the tiny model's (layer 1 -> 41, block 3 -> 43)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    model = build_model(tiny_config(model_type, small_vision=False), "meta")
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    family = derive_family(model_type)
    hub = list(_revert(model, model.state_dict()))
    found = [match_layout(hub, family.hub, p) for p in family.layer_prefixes]
    experts = {k for m in found if m for le in m.layers.values() for k in le.keys}
    names = {}
    for key in hub:
        if key in experts:  # moved by the expert re-layout, not renamed
            continue
        far = re.sub(r"(layers|blocks|queries)\.(\d+)\b", lambda m: f"{m[1]}.{int(m[2]) + 40}", key)
        names[far] = rename_source_key(far, renamings, [])[0]
    return Rename(family.fused_renames), names


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_derived_renames_are_transformers_renames_at_any_index(model_type: str) -> None:
    rename, names = _transformers_names(model_type)
    wrong = {k: (rename(k), v) for k, v in names.items() if rename(k) != v}
    assert not wrong, list(wrong.items())[:3]
    rename.check(names, model_type)


def test_a_shorter_pair_grows_context_only_where_it_would_misfire() -> None:
    """Laguna: `experts` -> `gate` alone would turn `mlp.gate.weight` into `mlp.experts.weight` on
    the way back; the pair keeps the one segment that tells them apart, and nothing more."""
    mlp = "model.layers.1.mlp"
    moved = {
        f"{mlp}.experts.e_score_correction_bias": f"{mlp}.gate.e_score_correction_bias",
        f"{mlp}.gate.weight": f"{mlp}.gate.weight",
        f"{mlp}.shared_expert.up_proj.weight": f"{mlp}.shared_experts.up_proj.weight",
    }
    assert segment_renames(moved) == (
        ("experts.e_score_correction_bias", "gate.e_score_correction_bias"),
        ("shared_expert", "shared_experts"),
    )


def test_a_tensor_converted_on_load_is_carried_and_transformers_converts_it(tmp_path: Path) -> None:
    """Sarvam-MoE's `attention.query_key_value` is split into q/k/v by transformers on load: the
    fused output keeps it whole under `self_attn.query_key_value`, transformers' loader splits it
    (same logits as the source), and the hub layout gets the Hub's name back."""
    src = _save_tiny("sarvam_moe", tmp_path / "src")
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    tensors = load_tensors(fused)
    qkv = "model.layers.1.self_attn.query_key_value.weight"
    assert torch.equal(tensors[qkv], load_tensors(src)["model.layers.1.attention.query_key_value.weight"])
    assert not any(k.endswith("self_attn.q_proj.weight") for k in tensors)
    model, info = _load(fused)
    assert not info
    assert torch.equal(_logits(model), _logits(_load(src)[0]))


def test_a_shifted_index_rename_holds_in_every_layer(tmp_path: Path) -> None:
    """Inkling-2 keeps layer L's attention query at `attn_queries.{L-1}` (layer 0 has none): on a
    4-layer model, the fused output has transformers' own names at every layer, loads with the
    source's logits, and the hub layout comes back bit-identical."""
    from transformers import AutoConfig

    src = _save_tiny("inkling2_text", tmp_path / "src", layers=4)
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    expected = {k for k in build_model(AutoConfig.from_pretrained(src), "meta").state_dict()}
    queries = sorted(k for k in load_tensors(fused) if "attention_input" in k)
    assert queries == sorted(k for k in expected if "attention_input" in k) and len(queries) == 3
    model, info = _load(fused)
    assert not info
    assert torch.equal(_logits(model), _logits(_load(src)[0]))
    back = _convert(fused, tmp_path / "hub", "hf", layout="hub")
    assert load_tensors(back).keys() == load_tensors(src).keys()


@pytest.mark.skipif("ergo" not in CONFIG_MAPPING, reason="Ergo comes with transformers 5.25")
def test_a_router_converted_on_load_is_found_beside_either_layouts_stacks(tmp_path: Path) -> None:
    """Ergo's Hub router `feed_forward.gate_kernel` is [H, E], transposed by transformers on load
    into `mlp.gate.linear.weight`: the derived family names it as the Hub stores it, and `inspect`
    finds it beside the hub stacks and beside the fused `mlp.experts.*` (carried bit for bit, where
    transformers' loader still transposes it); a layer without it is refused naming both places.
    Its ReLU² experts are up-only stacks, [E, H, I] on the Hub as in memory."""
    family = derive_family("ergo")
    assert "gate_kernel" in family.router and family.hub.roles == ("up", "down") and family.hub.transposed
    assert "feed_forward.up_proj [E, H, I]" in support("ergo").why
    src = _save_tiny("ergo", tmp_path / "src")
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    for path, prefix in ((src, ""), (fused, "model.")):
        with open_checkpoint(path) as ck:
            det = detect(ck)
        assert det.router_tensors[0] == f"{prefix}layers.{{L}}.feed_forward.gate_kernel", path
    hub, out = load_tensors(src), load_tensors(fused)
    router = hub["layers.1.feed_forward.gate_kernel"]
    assert router.shape == (64, 4) and torch.equal(out["model.layers.1.feed_forward.gate_kernel"], router)
    assert "model.layers.1.mlp.experts.up_proj" in out
    assert not any(k.endswith("gate.linear.weight") for k in out)

    broken = tmp_path / "no-router"
    broken.mkdir()
    save_file({k: v for k, v in out.items() if "gate_kernel" not in k}, str(broken / "model.safetensors"))
    shutil.copy(fused / "config.json", broken / "config.json")
    with open_checkpoint(broken) as ck, pytest.raises(MoeportError) as refused:
        detect(ck)
    assert "MoE layer 1 has no router tensor" in str(refused.value) and "\n" not in str(refused.value)
    assert "'model.layers.1.feed_forward.gate_kernel'" in str(refused.value)
