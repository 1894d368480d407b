"""Several expert stacks read off transformers' own models (zoo/derived_stacks.py): Qwen3-Omni's
thinker and talker, DiffusionGemma's decoder (its encoder's experts are the decoder's, tied)."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures import load_tensors
from test_zoo_derived import _convert, _load, _save_tiny

from moeport.detect import detect
from moeport.sources import open_checkpoint
from moeport.zoo.derived import derive_family
from moeport.zoo.families import Stack


def test_qwen3_omni_thinker_is_the_main_stack_and_its_talker_another() -> None:
    family = derive_family("qwen3_omni_moe")
    # the Hub's names first (Qwen/Qwen3-Omni-30B-A3B-Instruct: thinker.model.layers.{L}.mlp.experts.{E}...)
    assert family.layer_prefixes == ("thinker.model.layers.{L}.", "thinker.model.language_model.layers.{L}.")
    assert family.stacks == (Stack(("talker.model.layers.{L}.",), "talker_config.text_config"),)
    assert family.config == "thinker_config.text_config"
    assert family.hub.kind == "per-expert" and family.fused.kind == "fused"


def test_diffusion_gemma_decoder_is_the_stack_its_checkpoint_holds(tmp_path: Path) -> None:
    """transformers ties the encoder's layers to the decoder's and saves the decoder's only."""
    family = derive_family("diffusion_gemma")
    assert family.layer_prefixes == ("model.decoder.layers.{L}.",)
    assert family.stacks == (Stack(("model.encoder.language_model.layers.{L}.",), "text_config"),)
    src = _save_tiny("diffusion_gemma", tmp_path / "src")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert det.naming.stacks == () and det.moe_layers == [0, 1]  # the encoder keeps buffers only
    assert any(k.startswith("model.encoder.language_model.layers.") for k in load_tensors(src))


def test_qwen3_omni_thinker_and_talker_run_alike_on_the_fused_output(tmp_path: Path) -> None:
    """The wrapper has no forward of its own: its thinker's logits and its talker's hidden states,
    each through its own converted experts, equal those of the source."""
    src = _save_tiny("qwen3_omni_moe", tmp_path / "src")
    fused = _convert(src, tmp_path / "fused", "hf", layout="fused")
    assert "talker.model.layers.1.mlp.experts.gate_up_proj" in load_tensors(fused)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))
    outputs = []
    for path in (src, fused):
        model, info = _load(path)
        assert not info, info
        with torch.no_grad():
            thinker = model.thinker(input_ids=ids, use_cache=False).logits
            talker = model.talker.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        outputs.append((thinker, talker))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])
