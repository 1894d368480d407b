"""GPT-OSS in and out of GGUF (llama.cpp arch `gpt-oss`, zoo/gguf_arch.py).

What the file must hold is stated from llama.cpp's converter (`GptOssModel` in
convert_hf_to_gguf.py: gate_up split by interleaved rows, weights transposed to [E, N, K], biases
`.bias`, sinks `attn_sinks.weight`, MXFP4 experts repacked by `repack_mxfp4`) and gguf-py's tensor
name map; the source is a tiny GptOssForCausalLM written by transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import build_transformers_checkpoint, load_tensors
from gguf_support import dequantized, read_gguf

FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16}


@pytest.fixture(scope="module")
def oss(tmp_path_factory) -> Path:
    return build_transformers_checkpoint("gpt_oss", "hub", tmp_path_factory.mktemp("oss") / "src", seed=11)


def llama_cpp_tensors(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """{GGUF name: float32} as llama.cpp's GptOssModel.modify_tensors writes a BF16 GPT-OSS."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, layers)
    out = {}
    for name, t in tensors.items():
        t = t.float()
        if name.endswith("gate_up_proj"):  # [E, K, 2N], gate and up interleaved
            t = t.transpose(-1, -2)
            pairs = (
                (name.replace("gate_up_proj", "gate_proj.weight"), t[:, ::2]),
                (name.replace("gate_up_proj", "up_proj.weight"), t[:, 1::2]),
            )
        elif name.endswith("gate_up_proj_bias"):
            base = name.removesuffix("_bias")
            pairs = (
                (base.replace("gate_up_proj", "gate_proj.bias"), t[..., ::2]),
                (base.replace("gate_up_proj", "up_proj.bias"), t[..., 1::2]),
            )
        elif name.endswith("down_proj"):
            pairs = ((name + ".weight", t.transpose(-1, -2)),)
        elif name.endswith("down_proj_bias"):
            pairs = ((name.replace("down_proj_bias", "down_proj.bias"), t),)
        elif name.endswith("sinks"):
            pairs = ((name + ".weight", t),)
        else:
            pairs = ((name, t),)
        for n, v in pairs:
            out[names.get_name(n, try_suffixes=(".weight", ".bias"))] = v
    return out


def test_gpt_oss_gguf_holds_what_llama_cpp_converter_would(main, oss, tmp_path):
    import gguf

    code, _, err = main("convert", oss, tmp_path / "g", "--to", "gguf", "--quiet")
    assert code == 0, err
    config = json.loads((oss / "config.json").read_text())
    want = llama_cpp_tensors(load_tensors(oss), config["num_hidden_layers"])
    ours = read_gguf(tmp_path / "g" / "model.gguf")
    assert set(ours) == set(want)
    assert {"blk.0.attn_sinks.weight", "blk.2.ffn_gate_exps.bias", "blk.1.post_attention_norm.weight"} <= set(
        ours
    )
    for name, (kind, data) in ours.items():
        # llama.cpp's converter: 1-D tensors, biases and the router in F32, the rest in BF16
        f32 = len(want[name].shape) == 1 or name.endswith(".bias") or "ffn_gate_inp" in name
        assert kind == ("F32" if f32 else "BF16"), name
        got = (
            torch.from_numpy(np.ascontiguousarray(data)).view(FLOATS[kind]).float().reshape(want[name].shape)
        )
        assert torch.equal(got, want[name]), name

    kv = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "g" / "model.gguf").fields.items()}
    assert kv["general.architecture"] == "gpt-oss"
    assert kv["gpt-oss.attention.sliding_window"] == config["sliding_window"]
    assert kv["gpt-oss.expert_feed_forward_length"] == config["intermediate_size"]
    assert kv["gpt-oss.expert_count"] == config["num_local_experts"]
    assert kv["gpt-oss.rope.scaling.type"] == "yarn"
    assert kv["gpt-oss.rope.scaling.factor"] == config["rope_parameters"]["factor"]
    assert kv["gpt-oss.rope.scaling.original_context_length"] == 4096

    # and back: moeport's GGUF source gives transformers' tensors and config again
    assert main("convert", tmp_path / "g" / "model.gguf", tmp_path / "hf", "--to", "hf", "--quiet")[0] == 0
    code, out, err = main("verify", oss, tmp_path / "hf", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(out)
    assert not report["missing"] and not report["extra"] and all(t["exact"] for t in report["tensors"])
    back = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field in (
        "sliding_window",
        "num_local_experts",
        "num_experts_per_tok",
        "head_dim",
        "intermediate_size",
    ):
        assert back[field] == config[field], field
    assert back["rope_parameters"] == config["rope_parameters"]  # YaRN, truncate False as GPT-OSS has it


def repack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """llama.cpp's GptOssModel.repack_mxfp4 (transform_nibble_layout, then scales first)."""
    t = ((blocks & 0x0F) << 4) | ((blocks & 0xF0) >> 4)
    blk_a, blk_b = t.chunk(2, dim=-1)
    blk_a = torch.stack(((blk_a & 0xF0).view(-1, 1), (blk_a << 4).view(-1, 1)), dim=2).view(t.shape)
    blk_b = torch.stack(((blk_b >> 4).view(-1, 1), (blk_b & 0x0F).view(-1, 1)), dim=2).view(t.shape)
    out = blk_a | blk_b
    out = ((out & 0xF0) >> 4) | ((out & 0x0F) << 4)
    data = torch.cat((scales.unsqueeze(-1), out), dim=-1)
    return data.reshape(data.shape[0], data.shape[1], -1).numpy()


def test_gpt_oss_mxfp4_experts_go_in_as_llama_cpp_repacks_them(main, oss, tmp_path):
    assert main("convert", oss, tmp_path / "mx", "--to", "mxfp4", "--flavor", "gpt-oss", "--quiet")[0] == 0
    code, out, err = main(
        "convert", tmp_path / "mx", tmp_path / "g", "--to", "gguf", "--gguf-type", "mxfp4", "--dry-run"
    )
    assert code == 0, err
    assert (
        "copied as stored (mxfp4-gpt-oss -> MXFP4, no requantizing): blk.*.ffn_down_exps.weight"
        in " ".join(out.split())
    )
    assert (
        main("convert", tmp_path / "mx", tmp_path / "g", "--to", "gguf", "--gguf-type", "mxfp4", "--quiet")[0]
        == 0
    )
    source = load_tensors(tmp_path / "mx")
    ours = read_gguf(tmp_path / "g" / "model.gguf")
    for layer in range(3):
        prefix = f"model.layers.{layer}.mlp.experts."
        gate_up = source[prefix + "gate_up_proj_blocks"], source[prefix + "gate_up_proj_scales"]
        want = {
            "ffn_gate_exps": repack_mxfp4(gate_up[0][:, ::2], gate_up[1][:, ::2]),
            "ffn_up_exps": repack_mxfp4(gate_up[0][:, 1::2], gate_up[1][:, 1::2]),
            "ffn_down_exps": repack_mxfp4(
                source[prefix + "down_proj_blocks"], source[prefix + "down_proj_scales"]
            ),
        }
        for proj, data in want.items():
            kind, got = ours[f"blk.{layer}.{proj}.weight"]
            assert kind == "MXFP4" and np.array_equal(got, data), proj
        bias = source[prefix + "gate_up_proj_bias"].float()
        assert torch.equal(torch.from_numpy(ours[f"blk.{layer}.ffn_up_exps.bias"][1]), bias[..., 1::2])
    # the GGUF's own experts decode to what the MXFP4 checkpoint holds
    assert (
        main(
            "convert",
            tmp_path / "g" / "model.gguf",
            tmp_path / "hf",
            "--to",
            "hf",
            "--dtype",
            "fp32",
            "--quiet",
        )[0]
        == 0
    )
    code, out, err = main("verify", tmp_path / "mx", tmp_path / "hf", "--json", "--quiet")
    assert code == 0, err
    experts = [t for t in json.loads(out)["tensors"] if ".experts." in t["name"]]
    assert experts and all(t["exact"] for t in experts)
    kind, data = ours["blk.0.ffn_down_exps.weight"]
    assert dequantized(kind, data).shape == (4, 64, 32)
