"""LongCat-Flash's MTP layer under its public names (`model.mtp.layers.0.`, a dense layer, and
`model.mtp.embed_tokens` / `model.mtp.norm` beside it; see public_fixtures.LONGCAT_MTP): inspect
counts it as an MTP layer and every target carries it, verified against the source."""

from __future__ import annotations

from pathlib import Path

import torch
from fixtures import load_tensors, quantize_fp8_block
from public_fixtures import LONGCAT_MTP, with_public_names
from test_detect_zero_experts import _hub_form
from test_public_names import assert_verified, convert, inspect_json
from test_zoo_derived import _load, _logits, _save_tiny

from moeport.verify.run import verify


def _mtp(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("model.mtp.")}


def test_longcat_mtp_layer_is_counted_and_carried_by_every_target(tmp_path: Path) -> None:
    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    src = with_public_names(_hub_form(saved, tmp_path / "hub"), tmp_path / "pub", "longcat_flash")
    source = load_tensors(src)
    mtp = _mtp(source)
    assert f"{LONGCAT_MTP}transformer_layer.mlp.down_proj.weight" in mtp and "model.mtp.norm.weight" in mtp
    report = inspect_json(src)
    assert report["layers"]["moe"] == [0] and report["layers"]["mtp"] == [1]
    layer = report["bytes"]["per_layer"]["1"]  # the MTP layer: dense, its bytes its own
    assert layer["experts"] == 0 and layer["total"] == sum(
        v.nbytes for k, v in mtp.items() if k.startswith(LONGCAT_MTP)
    )
    fused = convert(src, tmp_path / "fused", layout="fused")
    assert inspect_json(tmp_path / "fused")["layers"]["mtp"] == [1]
    reference, _ = _load(saved)  # transformers ignores `model.mtp.*`: the same logits without it
    model, info = _load(tmp_path / "fused")
    assert not info and torch.equal(_logits(model), _logits(reference))
    hub = convert(tmp_path / "fused", tmp_path / "back", layout="hub")
    assert sorted(hub) == sorted(source) and all(torch.equal(hub[k], v) for k, v in source.items())
    outputs = {
        "fused": fused,
        "w4a16": convert(src, tmp_path / "w4a16", "w4a16", group_size=32),
        "kt-int4": convert(src, tmp_path / "kt-int4", "kt-int4"),
    }
    for name, out in outputs.items():
        assert _mtp(out).keys() == mtp.keys(), name  # carried as stored (BF16: no expert in it)
        assert all(torch.equal(out[k], v) for k, v in mtp.items()), name
        assert_verified(src, tmp_path / name)


def test_longcat_fp8_mtp_layer_keeps_or_dequantizes_with_the_others(tmp_path: Path) -> None:
    """LongCat-Flash-Chat-FP8 stores the MTP layer's linears in FP8 blocks too (`eh_proj.weight_scale_inv`
    beside `eh_proj.weight`, as vLLM's loader maps them): `--dtype keep` carries them as stored,
    `--dtype bf16` dequantizes them with every other weight, kt-int4 carries them; each verifies."""
    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    pub = with_public_names(_hub_form(saved, tmp_path / "hub"), tmp_path / "pub", "longcat_flash")
    src = quantize_fp8_block(pub, tmp_path / "fp8")
    source = _mtp(load_tensors(src))
    assert source[f"{LONGCAT_MTP}eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert f"{LONGCAT_MTP}eh_proj.weight_scale_inv" in source
    assert inspect_json(src)["layers"]["mtp"] == [1]
    kept = _mtp(convert(src, tmp_path / "fused", layout="fused"))
    assert kept.keys() == source.keys() and all(torch.equal(kept[k], v) for k, v in source.items())
    bf16 = _mtp(convert(src, tmp_path / "bf16", dtype="bf16"))
    assert not [k for k in bf16 if k.endswith("_scale_inv")]
    assert {v.dtype for v in bf16.values()} == {torch.bfloat16}
    kt = _mtp(convert(src, tmp_path / "kt-int4", "kt-int4"))
    assert kt.keys() == source.keys()
    for name in ("fused", "kt-int4"):
        assert_verified(src, tmp_path / name)
    # verify's block-ratio check flags one main-layer attention weight of this tiny FP8 -> BF16
    # (q_b_proj [64, 32], without MTP as well): the MTP layer's own tensors are checked here
    report = verify(src, tmp_path / "bf16")
    assert not report.missing and not report.extra
    mtp = [t for t in report.tensors if t.name.startswith("model.mtp.")]
    assert {t.name for t in mtp} == bf16.keys() and not [t for t in mtp if t.problem]
    assert all(t.rel_l2 < 1e-2 for t in mtp)
