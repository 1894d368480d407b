"""LongCat-Flash's zero-compute experts: the Hub's form (E weighted experts) converts to
transformers' fused stacks (E + Z gate/up rows) and back bit for bit, and runs in transformers;
kt and w4a16 from the fused stacks leave the Z rows out (kt-kernel's own bytes for the E experts)."""

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


def test_kt_and_w4a16_from_the_fused_form_leave_the_zero_compute_experts_out(tmp_path: Path) -> None:
    """From transformers' fused save (gate_up [E + Z, 2I, H], the Z rows never read), in BF16 and
    FP8 blocks, kt-int4 and w4a16 write the bytes they write from the Hub's form (E experts): the
    Z rows (and their scales) are cut, as `--layout hub` does; verify passes."""
    from fixtures import quantize_fp8_block
    from test_public_names import assert_verified

    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    hub = _hub_form(saved, tmp_path / "hub")
    model, _ = _load(saved)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fused", save_original_format=False)
    stack = load_tensors(tmp_path / "fused")["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.shape[0] > EXPERTS and stack[EXPERTS:].any()  # what transformers holds: E + Z
    fp8 = [quantize_fp8_block(p, tmp_path / f"{p.name}-fp8") for p in (hub, tmp_path / "fused")]
    cases = [(hub, tmp_path / "fused", "kt-int4", {}), (hub, tmp_path / "fused", "w4a16", {"group_size": 32})]
    for src_hub, src_fused, to, options in [*cases, (*fp8, "kt-int4", {})]:
        out = tmp_path / f"{src_fused.name}-{to}"
        want = load_tensors(_convert(src_hub, tmp_path / f"{src_hub.name}-{to}", to, **options))
        got = load_tensors(_convert(src_fused, out, to, **options))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), out
        assert_verified(src_fused, out)


def test_kt_int4_from_the_fused_form_is_what_kt_kernel_writes_for_the_routed_experts(
    monkeypatch, tmp_path: Path
) -> None:
    """kt-kernel itself, given the E routed experts of transformers' fused stacks (the first E of
    gate_up's E + Z), writes the files moeport writes from that fused checkpoint."""
    from kt_support import kt_write_folder

    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    model, _ = _load(saved)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fused", save_original_format=False)
    stacks = load_tensors(tmp_path / "fused")
    gate_up = stacks["model.layers.0.mlp.experts.gate_up_proj"][:EXPERTS]
    gate, up = gate_up.chunk(2, dim=1)  # transformers' gate_up: gate rows, then up
    down = stacks["model.layers.0.mlp.experts.down_proj"]
    theirs = kt_write_folder(monkeypatch, tmp_path / "kt-kernel", gate, up, down, "AMXINT4", 1)
    ours = _convert(tmp_path / "fused", tmp_path / "kt", "kt-int4", kt_layout="folders")
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    written = sorted(p.relative_to(ours) for p in ours.rglob("_layer_*/**/*") if p.is_file())
    assert files and written == files  # no file for a zero-compute expert
    assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
