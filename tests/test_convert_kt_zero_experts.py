"""kt from LongCat-Flash's fused stacks: transformers 5.24's gate_up_proj holds E + Z rows (Z
zero-compute experts, never read; 5.25's holds E, as down_proj). kt's layout holds the E routed
experts: the Z rows are cut, as `--layout hub` does, and the bytes are kt-kernel's own."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures import load_tensors, quantize_fp8_block
from test_detect_zero_experts import _hub_form
from test_public_names import assert_verified
from test_zoo_derived import _convert, _load, _save_tiny

from moeport.zoo.tiny import EXPERTS

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


def _fused(tmp_path: Path) -> tuple[Path, Path]:
    """(the Hub's form, transformers' fused save) of a tiny LongCat-Flash saved by transformers."""
    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    model, _ = _load(saved)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "fused", save_original_format=False)
    return _hub_form(saved, tmp_path / "hub"), tmp_path / "fused"


def test_kt_and_w4a16_from_the_fused_form_leave_the_zero_compute_experts_out(tmp_path: Path) -> None:
    """From transformers' fused save, in BF16 and FP8 blocks, kt-int4 and w4a16 write the bytes
    they write from the Hub's form (E experts): the Z rows and their scales are cut; verify passes."""
    hub, fused = _fused(tmp_path)
    stack = load_tensors(fused)[GATE_UP]
    assert stack.shape[0] >= EXPERTS and (stack.shape[0] == EXPERTS or stack[EXPERTS:].any())
    fp8 = [quantize_fp8_block(p, tmp_path / f"{p.name}-fp8") for p in (hub, fused)]
    cases = [(hub, fused, "kt-int4", {}), (hub, fused, "w4a16", {"group_size": 32}), (*fp8, "kt-int4", {})]
    for src_hub, src_fused, to, options in cases:
        out = tmp_path / f"{src_fused.name}-{to}"
        want = load_tensors(_convert(src_hub, tmp_path / f"{src_hub.name}-{to}", to, **options))
        got = load_tensors(_convert(src_fused, out, to, **options))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), out
        assert_verified(src_fused, out)


def test_kt_int4_from_the_fused_form_is_what_kt_kernel_writes_for_the_routed_experts(
    monkeypatch, tmp_path: Path
) -> None:
    """kt-kernel itself, given the E routed experts of transformers' fused stacks (the first E of
    gate_up's rows), writes the files moeport writes from that fused checkpoint."""
    from kt_support import kt_write_folder

    _, fused = _fused(tmp_path)
    stacks = load_tensors(fused)
    gate, up = stacks[GATE_UP][:EXPERTS].chunk(2, dim=1)  # transformers' gate_up: gate rows, then up
    down = stacks["model.layers.0.mlp.experts.down_proj"]
    theirs = kt_write_folder(monkeypatch, tmp_path / "kt-kernel", gate, up, down, "AMXINT4", 1)
    ours = _convert(fused, tmp_path / "kt", "kt-int4", kt_layout="folders")
    files = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file())
    written = sorted(p.relative_to(ours) for p in ours.rglob("_layer_*/**/*") if p.is_file())
    assert files and written == files  # no file for a zero-compute expert
    assert all((ours / f).read_bytes() == (theirs / f).read_bytes() for f in files)
