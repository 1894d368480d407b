"""Issue 21: public checkpoints' own names (DeepSeek-V4 `attn.kv_norm`, MTP under `mtp.*`) convert
to every layout and verify; each test builds its checkpoint from a transformers-made fixture."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fixtures import load_tensors
from public_fixtures import deepseek_v4_fp4, with_public_names
from rich.console import Console

from moeport.cli.convert import RunFlags, run_convert
from moeport.recipes import Options
from moeport.verify.run import verify


def convert(src: Path, dst: Path, to: str = "hf", **options) -> dict[str, torch.Tensor]:
    run_convert(src, dst, to, Options(**options), RunFlags(quiet=True), Console(quiet=True))
    return load_tensors(dst)


def assert_verified(src: Path, out: Path) -> None:
    report = verify(src, out)
    assert report.ok, [(r.name, r.flags) for r in report.flagged()][:5] or (report.missing, report.extra)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{path}: {kind} {sorted(info[kind])[:5]}"
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_deepseek_v4_public_kv_norm_converts_to_fused_and_back(checkpoint, tmp_path) -> None:
    """Public DeepSeek-V4 names its attention KV norm `attn.kv_norm` (transformers saves `attn.norm`);
    both are `self_attn.kv_norm` in transformers' fused layout, MTP block included."""
    src = with_public_names(checkpoint("deepseek_v4", "hub"), tmp_path / "pub", "deepseek_v4")
    fused = convert(src, tmp_path / "fused", layout="fused")
    assert "mtp.0.self_attn.kv_norm.weight" in fused and "model.layers.0.self_attn.kv_norm.weight" in fused
    assert torch.equal(_load(tmp_path / "fused"), _load(src))
    assert_verified(src, tmp_path / "fused")
    # a hub -> hub conversion keeps the source's spelling (vLLM/SGLang load the public names)
    hub = convert(src, tmp_path / "hub", dtype="fp32")
    assert "model.layers.0.attn.kv_norm.weight" in hub and "mtp.0.attn.kv_norm.weight" in hub
    assert_verified(src, tmp_path / "hub")


def _storage_fields(config: dict) -> list:
    where = [config, config.get("quantization_config") or {}]
    return [c["expert_dtype"] for c in where if "expert_dtype" in c]


def test_deepseek_v4_expert_dtype_says_what_the_output_stores(checkpoint, tmp_path) -> None:
    """`expert_dtype` describes the experts' storage: kept by a re-layout, rewritten (fp8) or
    dropped (bf16, INT4) when the experts are stored otherwise."""
    pub = with_public_names(checkpoint("deepseek_v4", "hub"), tmp_path / "pub", "deepseek_v4", mtp=False)
    src = deepseek_v4_fp4(pub, tmp_path / "fp4")
    cases = [
        ("keep", "hf", {"layout": "fused"}, ["fp4"]),
        ("bf16", "hf", {"dtype": "bf16"}, []),
        ("w4a16", "w4a16", {"group_size": 32}, []),
        ("fp8-block", "fp8-block", {}, ["fp8"]),
    ]
    for name, to, options, expected in cases:
        out = tmp_path / name
        convert(src, out, to, **options)
        config = json.loads((out / "config.json").read_text())
        assert _storage_fields(config) == expected, (name, config.get("quantization_config"))
