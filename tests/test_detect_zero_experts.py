"""LongCat-Flash's zero-compute experts: the Hub's form (E weighted experts) converts to
transformers' fused stacks (E + Z gate/up rows) and back bit for bit, and runs in transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from safetensors.torch import save_file
from test_zoo_derived import _assert_identical, _convert, _load, _logits, _save_tiny

from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.sources import open_checkpoint
from moeport.zoo.tiny import EXPERTS

ZERO_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def _hub_form(saved: Path, out: Path, keep=lambda e: e < EXPERTS) -> Path:
    """transformers' save of LongCat-Flash without the zero-compute experts' tensors: what
    meituan-longcat/LongCat-Flash-Chat stores (its loaders build E weighted experts)."""
    out.mkdir()
    tensors = {
        k: v for k, v in load_tensors(saved).items() if not (m := ZERO_EXPERT.search(k)) or keep(int(m[1]))
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((saved / "config.json").read_text())
    return out


def test_hub_form_fuses_with_zero_rows_runs_in_transformers_and_comes_back(tmp_path: Path) -> None:
    saved = _save_tiny("longcat_flash", tmp_path / "saved")
    zero = json.loads((saved / "config.json").read_text())["zero_expert_num"]
    with open_checkpoint(saved) as ck:
        det = detect(ck)
    assert det.experts_per_layer == EXPERTS and det.zero_experts == zero
    assert any("zero-compute experts" in w and "left out" in w for w in det.warnings)
    hub = _hub_form(saved, tmp_path / "hub")
    with open_checkpoint(hub) as ck:
        assert detect(ck).warnings == []
    fused = _convert(hub, tmp_path / "fused", "hf", layout="fused")
    stacks = {k: v for k, v in load_tensors(fused).items() if k.endswith("experts.gate_up_proj")}
    reference, _ = _load(saved)
    for name, stack in stacks.items():
        assert stack.shape[0] == EXPERTS + zero and not stack[EXPERTS:].any()  # never read: zeros
        memory = reference.get_parameter(name).to(stack.dtype)
        assert torch.equal(stack[:EXPERTS], memory[:EXPERTS])
    model, info = _load(fused)
    assert not info and torch.equal(_logits(model), _logits(reference))
    _assert_identical(load_tensors(hub), load_tensors(_convert(fused, tmp_path / "back", "hf", layout="hub")))


def test_an_extra_expert_that_is_not_a_zero_compute_one_is_refused(tmp_path: Path) -> None:
    saved = _save_tiny("longcat_flash", tmp_path / "saved")
    config = json.loads((saved / "config.json").read_text())
    config["n_routed_experts"] = EXPERTS - 1  # expert 3 has a down_proj: not a zero-compute expert
    hub = _hub_form(saved, tmp_path / "hub")
    (hub / "config.json").write_text(json.dumps(config))
    with open_checkpoint(hub) as ck, pytest.raises(MoeportError) as e:
        detect(ck)
    assert f"expert {EXPERTS - 1} has ['down_proj', 'gate_proj', 'up_proj']" in str(e.value)
    assert f"indices {EXPERTS - 1}..{EXPERTS + config['zero_expert_num'] - 2}" in str(e.value)
