"""`--to mxfp4 --flavor gpt-oss`: GPT-OSS's fused `_blocks`/`_scales` experts, read back by
transformers' GptOss (its Mxfp4 quantizer dequantizes on the CPU).

- from BF16: RTN, the bytes of GPT-OSS's published layout written independently (public_fixtures'
  `gpt_oss_mxfp4`: the codec on transposed stacks); transformers loads it with no missing keys and
  its logits stay within the RTN error of the BF16 model;
- from GPT-OSS MXFP4: the same bytes in every tensor, verify bit-exact;
- from compressed-tensors MXFP4 (`--flavor compressed-tensors`): codes and scales move, verify bit-exact;
- other families are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import load_tensors
from public_fixtures import gpt_oss_mxfp4
from test_convert_fp4 import here, raw
from test_convert_gpu import load, logits, rel

from moeport.errors import MoeportError
from moeport.verify.run import verify


@pytest.fixture(scope="module")
def gpt_oss(checkpoint, tmp_path_factory):
    bf16 = checkpoint("gpt_oss", "hub")
    root = tmp_path_factory.mktemp("gptoss")
    here(bf16, root / "rtn", "mxfp4", flavor="gpt-oss")
    return {"bf16": bf16, "rtn": root / "rtn", "published": gpt_oss_mxfp4(bf16, root / "published")}


def test_rtn_from_bf16_is_gpt_oss_layout_and_transformers_loads_it(gpt_oss) -> None:
    out, published = gpt_oss["rtn"], gpt_oss["published"]
    ours, theirs = load_tensors(out), load_tensors(published)
    assert sorted(ours) == sorted(theirs)
    assert any(k.endswith("mlp.experts.gate_up_proj_blocks") for k in ours)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((published / "config.json").read_text())["quantization_config"]
    reference = logits(load(gpt_oss["bf16"]))
    got = logits(load(out))  # no missing/unexpected keys (load asserts it)
    assert torch.equal(got, logits(load(published)))
    assert 0 < rel(got, reference) < 0.1


def test_gpt_oss_mxfp4_source_gives_the_same_bytes(gpt_oss, tmp_path) -> None:
    published = gpt_oss["published"]
    here(published, tmp_path / "out", "mxfp4", flavor="gpt-oss")
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(published)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():  # every tensor's bytes (the file header carries our metadata)
        assert ours[name].dtype == t.dtype and torch.equal(raw(ours[name]), raw(t)), name
    report = verify(published, tmp_path / "out", lossless=True)
    assert report.ok and report.tensors and all(r.exact for r in report.tensors)


def test_compressed_tensors_mxfp4_moves_without_requantizing(gpt_oss, tmp_path) -> None:
    ct, out = tmp_path / "ct", tmp_path / "out"
    here(gpt_oss["bf16"], ct, "mxfp4")  # per-expert weight_packed/weight_scale, CT's scale choice
    here(ct, out, "mxfp4", flavor="gpt-oss")
    report = verify(ct, out, lossless=True)
    experts = [r for r in report.tensors if ".experts." in r.name]
    assert report.ok and experts and all(r.exact for r in experts)
    assert "gate_up_proj_blocks" in " ".join(load_tensors(out))


def test_other_families_and_options_are_refused(checkpoint, tmp_path) -> None:
    with pytest.raises(MoeportError, match="GPT-OSS only, not Qwen3"):
        here(checkpoint("qwen3_moe"), tmp_path / "q", "mxfp4", flavor="gpt-oss")
    with pytest.raises(MoeportError, match="--flavor gpt-oss: .* drop --targets"):
        here(checkpoint("gpt_oss"), tmp_path / "g", "mxfp4", flavor="gpt-oss", targets="all-linear")
    assert not (tmp_path / "q").exists() and not (tmp_path / "g").exists()
