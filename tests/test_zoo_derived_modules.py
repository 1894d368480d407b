"""Experts held as separate modules (zoo/derived_modules.py): Switch Transformers' `wi`/`wo` and
NLLB-MoE's biased `fc1`/`fc2`, one module per expert named `experts.expert_{E}`, in the encoder and
in the decoder; VitPose+'s experts, each one bare linear `experts.{E}`. The per-type end to end
checks (inspect, round trip, logits, w4a16, kt's refusal) are test_zoo_derived's; these are the
layouts read off transformers' models, the names of the real Hub checkpoints, and transformers
loading our W4A16 output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from test_zoo_derived import _assert_identical, _convert, _save_seeded, _save_tiny

from moeport.detect import detect
from moeport.sources import open_checkpoint
from moeport.verify.run import verify
from moeport.zoo.derived import _revert, derive_family
from moeport.zoo.derived_experts import NotDerivable
from moeport.zoo.derived_modules import module_experts
from moeport.zoo.families import ExpertLayout
from moeport.zoo.tiny import EXPERTS, build_model, tiny_config

SWITCH = ExpertLayout("per-expert", "mlp", {"up": "wi", "down": "wo"}, index_prefix="expert_")
NLLB = ExpertLayout("per-expert", "ffn", {"up": "fc1", "down": "fc2"}, index_prefix="expert_")
VITPOSE = ExpertLayout("per-expert", "mlp", {"down": ""})  # VitPose+: `mlp.experts.{E}.weight`


@pytest.mark.parametrize(
    ("model_type", "layout", "templates"),
    [
        ("switch_transformers", SWITCH, ["encoder.block.{L}.layer.1.", "decoder.block.{L}.layer.2."]),
        ("nllb-moe", NLLB, ["encoder.layers.{L}.", "decoder.layers.{L}."]),
    ],
)
def test_separate_expert_modules_are_up_down_layouts_in_two_stacks(
    model_type: str, layout: ExpertLayout, templates: list[str]
) -> None:
    """Each expert module's two linears are up [I, H] and down [H, I]; the encoder's experts are the
    main stack, the decoder's another; Switch's sub-layer (`layer.1.` in the encoder, `layer.2.` in
    the decoder) goes into each stack's layer template so that one layout names both."""
    model = build_model(tiny_config(model_type, small_vision=False), "meta")
    state = model.state_dict()
    hidden = int(model.config.d_model)
    found, keys = module_experts(model_type, state, _revert(model, state), hidden, EXPERTS, NotDerivable("-"))
    assert found["layout"] == layout
    assert found["templates"] + found["stack_templates"] == templates
    parts = 4 if model_type == "nllb-moe" else 2  # NLLB-MoE's expert linears carry biases
    assert len(keys) == 2 * EXPERTS * parts and set(keys) <= set(state)
    for template in templates:  # every MoE layer of both stacks holds what the layout names
        layer = template.replace("{L}", "1")
        for name in layout.templates(layer):
            assert name.replace("{E}", str(EXPERTS - 1)) in state, name


def test_vitpose_experts_are_one_linear_each_without_a_router() -> None:
    """VitPose+'s experts are bare linears (`mlp.experts.3.weight` [part, K], with a bias), picked by
    the caller's dataset index: one role, down, with no projection name, and no router; a model
    with no expert modules at all keeps the reason no fused stacks were found, unchanged."""
    model = build_model(tiny_config("vitpose_backbone", small_vision=False), "meta")
    state = model.state_dict()
    hub = _revert(model, state)
    found, keys = module_experts("vitpose_backbone", state, hub, 64, EXPERTS, NotDerivable("-"))
    assert found["layout"] == VITPOSE and found["layout"].roles == ("down",)
    assert found["templates"] == ["encoder.layer.{L}."] and found["layers"] == [0, 1]
    assert len(keys) == 2 * EXPERTS * 2 and set(keys) <= set(state)  # weight and bias, two layers
    assert VITPOSE.templates("encoder.layer.1.") == ["encoder.layer.1.mlp.experts.{E}.weight"]
    family = derive_family("vitpose_backbone")
    assert family.hub == family.fused == VITPOSE and family.router == ()
    why = NotDerivable("vitpose_backbone: experts are separate modules")
    bare = {k: v for k, v in state.items() if ".experts." not in k}
    with pytest.raises(NotDerivable) as refused:
        module_experts("vitpose_backbone", bare, _revert(model, bare), 64, EXPERTS, why)
    assert refused.value is why


def _pose_estimation(out: Path) -> Path:
    """What the Hub holds of VitPose+ (usyd-community/vitpose-plus-*): transformers'
    VitPoseForPoseEstimation, config.json `model_type: vitpose` with the experts' model in
    `backbone_config`, tensors under `backbone.` beside the heatmap `head.`; tiny and seeded."""
    from transformers import VitPoseConfig, VitPoseForPoseEstimation

    backbone = tiny_config("vitpose_backbone", small_vision=False).to_dict()
    return _save_seeded(VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone)), out, seed=4)


def test_hub_vitpose_plus_converts_and_transformers_reads_our_w4a16(tmp_path: Path) -> None:
    """The Hub's VitPose+ form: its experts are found under `backbone.` (sizes from
    `backbone_config`), `--to hf` gives every tensor back; W4A16 quantizes every expert linear
    (K = hidden_features; fc1/fc2 and the head kept), biases carried exact, verified; transformers
    (compressed-tensors, dequantizing: its VitPose `_init_weights` reads `weight` of every linear,
    which compressed modules lack) loads it with no missing keys, and each dataset's heatmaps and
    expert weights are close to the source's."""
    from transformers import CompressedTensorsConfig, VitPoseForPoseEstimation

    src = _pose_estimation(tmp_path / "src")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert det.family.name == "vitpose_backbone" and det.layer_prefix == "backbone.encoder.layer.{L}."
    assert det.moe_layers == [0, 1] and det.experts_per_layer == EXPERTS and det.hidden_size == 64
    _assert_identical(load_tensors(src), load_tensors(_convert(src, tmp_path / "hub", "hf", layout="hub")))
    out = _convert(src, tmp_path / "w4a16", "w4a16", group_size=32)
    with open_checkpoint(out) as ck:
        packed = sorted(k for k in ck.keys() if k.endswith("weight_packed"))
    base = "backbone.encoder.layer"
    want = (f"{base}.{L}.mlp.experts.{e}.weight_packed" for L in (0, 1) for e in range(EXPERTS))
    assert packed == sorted(want)
    assert verify(src, out).ok
    ref = VitPoseForPoseEstimation.from_pretrained(src, dtype=torch.float32).eval()
    dequantize = CompressedTensorsConfig(dequantize=True)
    model, info = VitPoseForPoseEstimation.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True, quantization_config=dequantize
    )
    assert not {k: v for k, v in info.items() if v and k != "error_msgs"}
    pixels = torch.randn(EXPERTS, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        index = torch.arange(EXPERTS)  # each image through its own expert
        want, got = (m.eval()(pixels, dataset_index=index).heatmaps for m in (ref, model))
    assert 0 < (got - want).norm() / want.norm() < 0.05
    for L in (0, 1):
        for e in range(EXPERTS):
            module, loaded = (m.backbone.encoder.layer[L].mlp.experts[e] for m in (ref, model))
            err = (loaded.weight - module.weight).norm() / module.weight.norm()
            assert 0 < err < 0.15, (L, e, err)
            assert torch.equal(loaded.bias, module.bias), (L, e)


def _seq2seq(model_type: str, out: Path) -> Path:
    """transformers' conditional-generation model of `model_type`, tiny and seeded, as it saves it."""
    from transformers import AutoModelForSeq2SeqLM

    return _save_seeded(AutoModelForSeq2SeqLM.from_config(tiny_config(model_type)), out, seed=2)


@pytest.mark.parametrize(
    ("model_type", "expert"),
    [
        # switch-base-8's names: the conditional-generation class holds both stacks itself
        ("switch_transformers", "decoder.block.1.layer.2.mlp.experts.expert_3.wi.weight"),
        # a fine-tuned NLLB-MoE: its base model under `model.` (nllb-moe-54b's index has none)
        ("nllb-moe", "model.decoder.layers.1.ffn.experts.expert_3.fc1.bias"),
    ],
)
def test_conditional_generation_saves_convert_with_both_stacks(
    tmp_path: Path, model_type: str, expert: str
) -> None:
    """What the Hub and fine-tunes hold, saved by transformers' conditional-generation class: both
    stacks' experts are found, `--to hf` gives every tensor back, w4a16 quantizes every expert of
    both stacks and verifies against the source."""
    src = _seq2seq(model_type, tmp_path / "src")
    with open_checkpoint(src) as ck:
        det = detect(ck)
        assert expert in ck.keys()
    assert [s.experts for s in det.stacks] == [EXPERTS, EXPERTS] and det.moe_layers == [1, 3]
    assert det.hidden_size == 64 and det.num_layers == 2  # config.json's `d_model`, the encoder's depth
    assert expert.replace(".1.", ".{L}.", 1).startswith(det.stacks[1].prefix)  # the decoder's stack
    _assert_identical(load_tensors(src), load_tensors(_convert(src, tmp_path / "hub", "hf", layout="hub")))
    out = _convert(src, tmp_path / "w4a16", "w4a16", group_size=16)
    with open_checkpoint(out) as ck:
        packed = [k for k in ck.keys() if k.endswith("weight_packed")]
    assert len(packed) == 2 * 2 * EXPERTS  # two linears per expert, two MoE layers: nothing else
    report = verify(src, out)
    assert report.ok, [r.name for r in report.flagged][:5]


def test_transformers_reads_our_nllb_moe_w4a16(tmp_path: Path) -> None:
    """transformers (compressed-tensors) loads the W4A16 output with no missing keys and runs it
    close to the source; each expert linear of both stacks decompresses to its source weight within
    int4 rounding, biases exact. (Switch's W4A16 is not loaded here: transformers 5.24's
    SwitchTransformers `_init_weights` reads `wi.weight` of every expert, which compressed-tensors'
    compressed modules do not have, whoever wrote the checkpoint.)"""
    from transformers import NllbMoeModel

    src = _save_tiny("nllb-moe", tmp_path / "src")
    out = _convert(src, tmp_path / "w4a16", "w4a16", group_size=16)
    ref = NllbMoeModel.from_pretrained(src, dtype=torch.float32).eval()
    model, info = NllbMoeModel.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not {k: v for k, v in info.items() if v and k != "error_msgs"}
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # its first forward decompresses the model (compressed-tensors)
        want, got = (m.eval()(input_ids=ids, decoder_input_ids=ids).last_hidden_state for m in (ref, model))
    assert (got - want).norm() / want.norm() < 0.05
    experts = [(n, m) for n, m in ref.named_modules() if ".experts.expert_" in n and n[-3:] in ("fc1", "fc2")]
    assert len(experts) == 2 * 2 * EXPERTS
    loaded = dict(model.named_modules())
    for name, module in experts:
        err = (loaded[name].weight - module.weight).norm() / module.weight.norm()
        assert 0 < err < 0.15, (name, err)
        assert torch.equal(loaded[name].bias, module.bias), name


def test_experts_in_the_encoder_only_and_gptq_refuses_an_encoder_decoder(tmp_path: Path) -> None:
    """NLLB-MoE with a dense decoder (`decoder_sparse_step` 0): one stack, the encoder's, found and
    quantized; `--method gptq` walks a decoder-only model's layers, so it refuses an encoder-decoder
    before any work, in one line (RTN's `--to w4a16` is the way)."""
    import json

    from transformers import NllbMoeConfig, NllbMoeModel

    from moeport.errors import MoeportError

    config = NllbMoeConfig(**{**tiny_config("nllb-moe").to_dict(), "decoder_sparse_step": 0})
    model = NllbMoeModel(config).to(torch.bfloat16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    src = tmp_path / "src"
    model.save_pretrained(src)
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert det.moe_layers == [1] and not det.naming.stacks and len(det.stacks) == 1
    assert verify(src, _convert(src, tmp_path / "w4a16", "w4a16", group_size=16)).ok
    calibration = tmp_path / "ids.json"
    calibration.write_text(json.dumps([[5 + (i * 7 + j) % 150 for j in range(16)] for i in range(2)]))
    options = dict(method="gptq", calibration=str(calibration), samples=2, seq_len=16)
    with pytest.raises(MoeportError, match="is an encoder-decoder; calibration walks") as refused:
        _convert(src, tmp_path / "gptq", "w4a16", group_size=16, **options)
    assert "\n" not in str(refused.value) and not (tmp_path / "gptq").exists()
