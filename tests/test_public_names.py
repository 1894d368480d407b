"""Issue 21: public checkpoints' own names (DeepSeek-V4 `attn.kv_norm`, MTP under `mtp.*`) convert
to every layout and verify; each test builds its checkpoint from a transformers-made fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from public_fixtures import MTP, deepseek_v4_fp4, gpt_oss_mxfp4, with_public_names
from rich.console import Console

from moeport.cli.convert import RunFlags, run_convert
from moeport.errors import MoeportError
from moeport.recipes import Options
from moeport.verify.run import verify


def convert(src: Path, dst: Path, to: str = "hf", **options) -> dict[str, torch.Tensor]:
    run_convert(src, dst, to, Options(**options), RunFlags(quiet=True), Console(quiet=True))
    return load_tensors(dst)


def assert_verified(src: Path, out: Path) -> None:
    report = verify(src, out)
    assert report.ok, [(r.name, r.problem) for r in report.flagged][:5] or (report.missing, report.extra)


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


def inspect_json(path: Path) -> dict:
    from typer.testing import CliRunner

    from moeport.cli.app import app

    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def assert_mtp_experts(report: dict, layout: str, mtp: int = 3) -> None:
    """Layer `mtp` is reported as MTP, its experts counted as expert bytes, in the one `layout`."""
    assert report["layers"]["mtp"] == [mtp] and report["experts"]["layout"] == layout
    per_layer = report["bytes"]["per_layer"]
    assert per_layer[str(mtp)]["experts"] == per_layer[str(mtp - 1)]["experts"] > 0


@pytest.mark.parametrize(
    "model_type,layout",
    [("qwen3_next", "hub"), ("qwen3_5_moe", "fused"), ("deepseek_v4", "hub"), ("glm4_moe", "hub")],
)
def test_mtp_stored_apart_is_detected_and_converted_like_the_main_layers(
    checkpoint, tmp_path, model_type, layout
) -> None:
    """MTP under `mtp.layers.0.` / `mtp.0.` (or GLM's `model.layers.{N}`): reported as an MTP
    layer, its experts re-laid out with the main layers' (never one checkpoint in two layouts)
    and quantized with them."""
    src = with_public_names(checkpoint(model_type, layout), tmp_path / "pub", model_type)
    assert_mtp_experts(inspect_json(src), "per-expert" if layout == "hub" else "fused")
    other = "fused" if layout == "hub" else "hub"
    out = convert(src, tmp_path / other, layout=other)
    assert_mtp_experts(inspect_json(tmp_path / other), "per-expert" if other == "hub" else "fused")
    mtp = MTP[model_type][1]
    assert any(k.startswith(mtp) and ".experts." in k for k in out)
    assert_verified(src, tmp_path / other)
    int4 = convert(src, tmp_path / "w4a16", "w4a16", group_size=32)
    mtp_experts = {k.rsplit(".", 1)[0] for k in int4 if k.startswith(mtp) and ".experts." in k}
    assert mtp_experts and all(f"{m}.weight_packed" in int4 for m in mtp_experts)
    ignore = json.loads((tmp_path / "w4a16" / "config.json").read_text())["quantization_config"]["ignore"]
    assert not [m for m in ignore if ".experts." in m]
    assert_verified(src, tmp_path / "w4a16")


def test_deepseek_v4_fp4_mtp_experts_keep_their_storage(checkpoint, tmp_path) -> None:
    """`--dtype keep` re-lays out DeepSeek-V4's FP4 MTP experts as FP4, like the other layers'."""
    pub = with_public_names(checkpoint("deepseek_v4", "hub"), tmp_path / "pub", "deepseek_v4")
    src = deepseek_v4_fp4(pub, tmp_path / "fp4")
    out = convert(src, tmp_path / "fused", layout="fused")
    for prefix in ("model.layers.0.", "mtp.0."):
        assert out[f"{prefix}mlp.experts.gate_up_proj"].dtype == torch.int8
        assert f"{prefix}mlp.experts.gate_up_proj_scale" in out
    assert_verified(src, tmp_path / "fused")
    # and back: the same FP4 bytes under DeepSeek's own names (`w1.scale`), MTP included
    source, hub = load_tensors(src), convert(tmp_path / "fused", tmp_path / "hub")
    experts = [k for k in source if ".experts." in k]
    assert "mtp.0.ffn.experts.3.w2.scale" in experts
    assert all(torch.equal(hub[k].view(torch.uint8), source[k].view(torch.uint8)) for k in experts)


def test_kt_converts_mtp_experts_stored_apart(tmp_path) -> None:
    """kt-int4 puts Qwen3-Next's `mtp.layers.0` experts in kt's layer files (layer 3), none in the
    base shards, and verify reads them back."""
    from fixtures import COMMON, FAMILY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeport.sinks import kt_layout as L
    from moeport.sinks.sharded import INDEX_NAME

    over = {"hidden_size": 128, "moe_intermediate_size": 128, "num_hidden_layers": 2}
    cfg = AutoConfig.for_model("qwen3_next", **{**COMMON, **FAMILY_CONFIGS["qwen3_next"], **over})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "tf")
    src = with_public_names(tmp_path / "tf", tmp_path / "pub", "qwen3_next")
    convert(src, tmp_path / "kt", "kt-int4")
    weight_map = json.loads((tmp_path / "kt" / INDEX_NAME).read_text())["weight_map"]
    assert L.merged_key(2, "down", 3, 0, "scale") in weight_map
    assert not [k for k in weight_map if ".experts." in k]
    assert_verified(src, tmp_path / "kt")


def test_int4_experts_re_laid_out_to_fused_carry_weight_shape(checkpoint, tmp_path) -> None:
    """compressed-tensors INT4 experts in Kimi-K2's scheme (pack-quantized, symmetric, group 32,
    BF16 scales; written here by --to w4a16, whose bytes equal compressed-tensors' compressor, see
    test_codecs) re-laid out to the fused layout keep codes and scales, and `weight_shape` says
    each fused tensor's rows; back to hub is byte-identical, and the fused INT4 is still carried
    bit-exact into --to w4a16 --group-size 32."""
    int4 = convert(checkpoint("qwen3_moe", "hub"), tmp_path / "int4", "w4a16", group_size=32)
    fused = convert(tmp_path / "int4", tmp_path / "fused", layout="fused")
    shape = fused["model.layers.0.mlp.experts.gate_up_proj_shape"]
    gate = int4["model.layers.0.mlp.experts.0.gate_proj.weight_shape"]
    assert shape.shape == (4, 2) and shape[0].tolist() == [2 * gate[0].item(), gate[1].item()]
    assert fused["model.layers.0.mlp.experts.down_proj_shape"][3].tolist() == (
        int4["model.layers.0.mlp.experts.3.down_proj.weight_shape"].tolist()
    )
    report = verify(tmp_path / "int4", tmp_path / "fused")
    assert report.ok and all(t.exact for t in report.tensors)
    hub = convert(tmp_path / "fused", tmp_path / "hub", layout="hub")
    assert sorted(hub) == sorted(int4) and all(torch.equal(hub[k], int4[k]) for k in int4)
    carried = convert(tmp_path / "fused", tmp_path / "carried", "w4a16", group_size=32)
    assert all(torch.equal(carried[k], int4[k]) for k in int4 if ".experts." in k)


def test_gpt_oss_fused_experts_to_gpu_formats(checkpoint, tmp_path) -> None:
    """GPT-OSS's fused experts (transposed, gate/up interleaved, biases; BF16 or MXFP4 `_blocks`/
    `_scales`) become per-expert 2-D linears with their biases in every GPU format; an --targets
    all-linear whose --group-size does not divide some K is refused naming the size that fits."""
    from moeport.codecs import PackQuantizedCodec

    bf16 = checkpoint("gpt_oss", "hub")
    source = load_tensors(bf16)
    out = convert(bf16, tmp_path / "w8a16", "w8a16", group_size=32)
    codec = PackQuantizedCodec(bits=8, group_size=32)
    for e, role, rows in ((1, "gate", slice(0, None, 2)), (2, "up", slice(1, None, 2))):
        name = f"model.layers.1.mlp.experts.{e}.{role}_proj."
        parts = {p: out[name + p] for p in ("weight_packed", "weight_scale", "weight_shape")}
        want = source["model.layers.1.mlp.experts.gate_up_proj"][e][:, rows].float().T
        got = codec.decode(parts)
        assert ((got - want).norm() / want.norm()).item() < 1e-2, name
        assert torch.equal(
            out[name + "bias"], source["model.layers.1.mlp.experts.gate_up_proj_bias"][e][rows]
        )
    assert_verified(bf16, tmp_path / "w8a16")
    mxfp4 = gpt_oss_mxfp4(bf16, tmp_path / "mxfp4")
    for to, options in (("w4a16", {"group_size": 32}), ("fp8", {})):
        out = convert(mxfp4, tmp_path / to, to, **options)
        assert "model.layers.0.mlp.experts.3.down_proj.bias" in out
        assert not [k for k in out if k.endswith(("_blocks", "_scales"))]
        assert_verified(mxfp4, tmp_path / to)
    # into compressed-tensors MXFP4 the codes move as they are (no requantizing), biases beside them
    moved = convert(mxfp4, tmp_path / "ct-mxfp4", "mxfp4")
    assert "model.layers.0.mlp.experts.3.down_proj.bias" in moved
    report = verify(mxfp4, tmp_path / "ct-mxfp4")
    assert report.ok and all(t.exact for t in report.tensors)
    with pytest.raises(
        MoeportError, match=r"--group-size 128: .*k_proj.weight has 64 input col.*use --group-size 32,"
    ):
        convert(bf16, tmp_path / "all", "w4a16", targets="all-linear")
