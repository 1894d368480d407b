"""ERNIE-4.5-VL's expert groups as the real checkpoints have them: text and vision experts of
different widths (the Hub's 28B-A3B: `moe_intermediate_size: [1536, 512]`), one per-expert list of
2E on the Hub, transformers' `text_moe` / `vision_moe` stacks in memory. A tiny model of that shape
is saved by transformers itself; the fused output must load in transformers with the source's
logits on tokens routed to both groups, and come back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from test_zoo_derived import _convert, _save_seeded

from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.tiny import EXPERTS, build_model, text_overrides, tiny_config

WIDTHS = [48, 32]  # text, vision: unequal, as the Hub's checkpoints
LAYER = "model.language_model.layers.1.mlp."


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """transformers' tiny ERNIE-4.5-VL with unequal groups, seeded, saved with its hub names."""
    config = tiny_config("ernie4_5_vl_moe", {**text_overrides(), "moe_intermediate_size": WIDTHS})
    torch.manual_seed(0)
    return _save_seeded(build_model(config, "cpu"), tmp_path_factory.mktemp("ernie") / "hub")


def _logits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits on text-only tokens and on tokens half routed to the vision experts."""
    from transformers import AutoConfig

    cls = type(build_model(AutoConfig.from_pretrained(path), "meta"))
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(v for k, v in info.items() if k != "error_msgs"), info
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    vision = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1]])
    with torch.no_grad():
        text = model.eval()(input_ids=ids, use_cache=False).logits
        mixed = model(input_ids=ids, moe_mm_token_type_ids=vision, use_cache=False).logits
    return text, mixed


def test_unequal_groups_fuse_into_transformers_stacks_and_back(hub: Path, tmp_path: Path) -> None:
    with open_checkpoint(hub) as ck:
        det = detect(ck)
    assert det.layout.kind == "per-expert" and det.experts_per_layer == 2 * EXPERTS
    assert det.family.fused.groups == ("text_moe", "vision_moe")
    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    stacks = load_tensors(fused)
    source = load_tensors(hub)
    for g, (group, width) in enumerate(zip(det.family.fused.groups, WIDTHS, strict=True)):
        gate_up = stacks[f"{LAYER}{group}.experts.gate_up_proj"]
        assert gate_up.shape == (EXPERTS, 2 * width, 64)
        for e in range(EXPERTS):  # hub expert g*E + e is expert e of group g: gate rows, then up
            hub_expert = f"model.layers.1.mlp.experts.{g * EXPERTS + e}."
            assert torch.equal(gate_up[e, :width], source[hub_expert + "gate_proj.weight"])
            assert torch.equal(gate_up[e, width:], source[hub_expert + "up_proj.weight"])
    # routers and score biases converted on load: carried as the Hub stores them
    assert stacks[LAYER + "gate.weight_1"].shape == (64, EXPERTS)
    assert stacks[LAYER + "moe_statics.e_score_correction_bias"].shape == (2, EXPERTS)
    back = load_tensors(_convert(fused, tmp_path / "back", "hf", layout="hub"))
    assert sorted(back) == sorted(source)
    assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in source.items())

    expected, got = _logits(hub), _logits(fused)
    assert not torch.equal(expected[0], expected[1])  # the vision tokens do reach other experts
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_quantizing_targets_on_unequal_groups(hub: Path, tmp_path: Path) -> None:
    """w4a16 quantizes each expert at its own width, from the hub or the fused layout; kt-kernel's
    one MoE size per layer refuses them in one line, naming an expert."""
    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    for src in (hub, fused):
        out = _convert(src, tmp_path / f"w4a16-{src.name}", "w4a16", group_size=16)
        assert verify(hub, out).ok
        assert load_tensors(out)["model.layers.1.mlp.experts.7.down_proj.weight_shape"].tolist() == [64, 32]
    with pytest.raises(MoeportError, match=r"experts\.4\.gate_proj\.weight: shape \[32, 64\]"):
        _convert(hub, tmp_path / "kt", "kt-int4", numa=1)


def test_hub_config_states_expert_counts_per_group(hub: Path, tmp_path: Path) -> None:
    """The Hub's config.json lists `moe_num_experts` and `moe_intermediate_size` per group
    ([64, 64], [1536, 512]); transformers' says 64 and the list. Both count 2E experts per layer,
    and a count the tensors contradict is refused in one line."""
    for counts, ok in (([EXPERTS, EXPERTS], True), ([EXPERTS, EXPERTS - 1], False)):
        src = tmp_path / f"hub-{counts[1]}"
        src.mkdir()
        for f in hub.glob("*.safetensors"):
            (src / f.name).symlink_to(f)
        config = json.loads((hub / "config.json").read_text())
        config["text_config"]["moe_num_experts"] = counts
        (src / "config.json").write_text(json.dumps(config))
        with open_checkpoint(src) as ck:
            if ok:
                assert detect(ck).experts_per_layer == 2 * EXPERTS
            else:
                with pytest.raises(MoeportError, match="config.json says 7 experts per layer"):
                    detect(ck)


def test_a_missing_expert_group_is_refused_in_one_line(hub: Path, tmp_path: Path) -> None:
    """A fused checkpoint without its vision group's gate_up stack: named, before any work."""
    from safetensors.torch import save_file

    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    broken = tmp_path / "broken"
    broken.mkdir()
    kept = {k: v for k, v in load_tensors(fused).items() if k != LAYER + "vision_moe.experts.gate_up_proj"}
    save_file(kept, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "config.json").write_text((fused / "config.json").read_text())
    with (
        open_checkpoint(broken) as ck,
        pytest.raises(MoeportError, match="no 'gate_up_proj' of expert group 'vision_moe'"),
    ):
        detect(ck)


def test_the_public_checkpoints_own_config(hub: Path, tmp_path: Path) -> None:
    """baidu/ERNIE-4.5-VL-*-PT ship a remote-code config.json: `model_type: ernie4_5_moe_vl`, the
    text fields at the top, per-group lists. Its tensors are transformers' hub names, so it is read
    as the derived `ernie4_5_vl_moe` and converts both ways bit for bit."""
    src = tmp_path / "pt"
    src.mkdir()
    for f in hub.glob("*.safetensors"):
        (src / f.name).symlink_to(f)
    config = json.loads((hub / "config.json").read_text())
    flat = {**config.pop("text_config"), **config, "model_type": "ernie4_5_moe_vl"}
    flat |= {"moe_num_experts": [EXPERTS, EXPERTS], "moe_intermediate_size": WIDTHS}
    (src / "config.json").write_text(json.dumps(flat))
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert det.model_type == "ernie4_5_moe_vl" and det.family.name == "ernie4_5_vl_moe"
    assert det.experts_per_layer == 2 * EXPERTS and det.experts_per_token == flat["moe_k"]
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    assert LAYER + "vision_moe.experts.down_proj" in load_tensors(fused)
    back = load_tensors(_convert(fused, tmp_path / "back", "hf", layout="hub"))
    source = load_tensors(hub)
    assert sorted(back) == sorted(source) and all(torch.equal(back[k], v) for k, v in source.items())
