"""Mapping primitives: every op's inverse gives the inputs back, companions follow their weight."""

from __future__ import annotations

import pytest
import torch

from moeport.codecs import AwqCodec, Fp8BlockCodec, GptqCodec
from moeport.detect.formats import ExpertFormat
from moeport.errors import MoeportError
from moeport.mappings.ops import Chain, Concat, Op, Split, Stack, Transpose
from moeport.mappings.rename import Rename
from moeport.mappings.rules import REPLICATED, RowRule, row_rules
from moeport.mappings.values import realize
from moeport.zoo.families import DSV4_RENAMES

GEN = torch.Generator().manual_seed(0)


def run(op: Op, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: realize(v).clone() for k, v in op.apply(dict(values)).items()}


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def assert_round_trip(op: Op, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = run(op, values)
    back = run(op.inverse(), out)
    assert sorted(back) == sorted(values)
    for k, v in values.items():
        assert torch.equal(back[k], v), k
    return out


def test_concat_split_and_stack_round_trip_with_block_scales() -> None:
    codec = Fp8BlockCodec(block=(16, 16))
    experts = [(codec.encode(rand(32, 48)), codec.encode(rand(32, 48))) for _ in range(3)]
    fmt = ExpertFormat("fp8-block", {"block": [16, 16], "scale": "weight_scale_inv"})
    rules = row_rules(fmt, {"weight": (32, 48), "weight_scale_inv": (2, 3)}, "w")
    assert rules["weight_scale_inv"] == RowRule(-2, 16)
    values, ops = {}, []
    for part, rule in rules.items():
        concats = []
        for e, (gate, up) in enumerate(experts):
            values[f"g{e}.{part}"], values[f"u{e}.{part}"] = gate[part], up[part]
            concats.append(Concat((f"g{e}.{part}", f"u{e}.{part}"), f"gu{e}.{part}", rule, (32, 32)))
        ops.append(Chain((*concats, Stack(tuple(c.target for c in concats), f"gate_up.{part}"))))
    out = assert_round_trip(Chain(tuple(ops)), values)
    assert out["gate_up.weight_scale_inv"].shape == (3, 4, 3)
    # the fused tensor decodes to the concatenation of the decoded pieces
    e1 = {p: out[f"gate_up.{p}"][1] for p in rules}
    want = torch.cat([codec.decode(experts[1][0]), codec.decode(experts[1][1])])
    assert torch.equal(codec.decode(e1), want)


def test_split_refuses_rows_that_end_inside_a_block() -> None:
    split = Split("gu", ("g", "u"), RowRule(-2, 16), (24, 24))
    with pytest.raises(MoeportError, match="not aligned to its 16-row blocks"):
        split.apply({"gu": rand(3, 4)})


@pytest.mark.parametrize("codec_cls", [GptqCodec, AwqCodec])
def test_packed_int4_companions_concat_on_their_own_axis(codec_cls) -> None:
    """GPTQ/AWQ keep N last; AWQ packs 8 columns of N per int32 in qweight, both do in qzeros."""
    codec = codec_cls(group_size=32)
    name = "gptq" if codec_cls is GptqCodec else "awq"
    gate, up = codec.encode(rand(24, 64)), codec.encode(rand(40, 64))
    shapes = {p: tuple(t.shape) for p, t in gate.items()}
    rules = row_rules(ExpertFormat(name, {}), shapes, "w")
    fused = {}
    for part, rule in rules.items():
        op = Concat((f"g.{part}", f"u.{part}"), f"gu.{part}", rule, (24, 40))
        out = assert_round_trip(op, {f"g.{part}": gate[part], f"u.{part}": up[part]})
        fused[part] = out[f"gu.{part}"]
    got = codec.decode({p: fused[p] for p in gate})
    assert torch.equal(got, torch.cat([codec.decode(gate), codec.decode(up)]))


def test_interleaved_gate_up_alternates_rows() -> None:
    gate, up = rand(2, 8, 5), rand(2, 8, 5)
    op = Concat(("g", "u"), "gu", RowRule(-2), (8, 8), interleave=True)
    out = assert_round_trip(op, {"g": gate, "u": up})["gu"]
    assert torch.equal(out[:, 0::2], gate) and torch.equal(out[:, 1::2], up)


def test_scalar_scales_duplicate_on_split_and_must_agree_on_merge() -> None:
    s = torch.rand((), generator=GEN)
    out = run(Split("gu", ("g", "u"), REPLICATED, (4, 4)), {"gu": s})
    assert torch.equal(out["g"], s) and torch.equal(out["u"], s)
    assert torch.equal(run(Concat(("g", "u"), "gu", REPLICATED, (4, 4)), out)["gu"], s)
    with pytest.raises(MoeportError, match="u: differs from g"):
        Concat(("g", "u"), "gu", REPLICATED, (4, 4)).apply({"g": s, "u": s + 1})


def test_transpose_and_stack_invert() -> None:
    assert_round_trip(Transpose("a", "b"), {"a": rand(3, 4, 5)})
    assert_round_trip(Stack(("a", "b"), "ab"), {"a": rand(4, 5), "b": rand(4, 5)})


def test_rename_inverts_and_refuses_what_does_not() -> None:
    dsv4 = Rename(DSV4_RENAMES)
    keys = [
        "head.weight",
        "model.norm.weight",
        "model.hc_head.hc_fn",
        "model.layers.3.attn.norm.weight",
        "model.layers.3.attn.compressor.norm.weight",
        "model.layers.3.attn.wq_a.weight",
        "model.layers.3.hc_attn_fn",
        "model.layers.3.ffn.gate.bias",
    ]
    assert [dsv4(k) for k in keys] == [
        "lm_head.weight",
        "model.norm.weight",
        "model.hc_head.hc_fn",
        "model.layers.3.self_attn.kv_norm.weight",
        "model.layers.3.self_attn.compressor.kv_norm.weight",
        "model.layers.3.self_attn.q_a_proj.weight",
        "model.layers.3.attn_hc.fn",
        "model.layers.3.mlp.gate.e_score_correction_bias",
    ]
    dsv4.check(keys, "ck")
    assert [dsv4.inverse()(dsv4(k)) for k in keys] == keys
    # prefix move: fine for a text-only checkpoint, refused when a vision tower would not round-trip
    move = Rename((("model.language_model", "model"),))
    text = ["model.language_model.layers.0.mlp.gate.weight", "model.language_model.embed_tokens.weight"]
    move.check(text, "ck")
    assert move(text[0]) == "model.layers.0.mlp.gate.weight"
    with pytest.raises(MoeportError, match="does not invert"):
        move.check([*text, "model.visual.blocks.0.attn.qkv.weight"], "ck")


def test_rename_wildcard_carries_any_index_both_ways() -> None:
    """'*' stands for an index: one pair renames every block of a stack, and gives it back."""
    sam = Rename((("sam.blocks", "sam.layers"), ("sam.blocks.*.norm1", "sam.layers.*.ln1")))
    keys = ["m.sam.blocks.37.norm1.bias", "m.sam.blocks.2.attn.qkv.weight", "m.sam.blocks.x.norm1"]
    assert [sam(k) for k in keys] == [
        "m.sam.layers.37.ln1.bias",
        "m.sam.layers.2.attn.qkv.weight",
        "m.sam.layers.x.norm1",  # '*' matches an index only
    ]
    sam.check(keys, "ck")
    with pytest.raises(ValueError, match="number of"):
        Rename((("blocks.*.norm1", "layers.norm1"),))


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_pack_quantized_gate_and_up_fuse_exactly(bits):
    """Zero points are packed along N, 32/bits rows per int32: fusing gate and up concatenates
    them in those units, and the fused parts decode to the two weights stacked."""
    from moeport.codecs import PackQuantizedCodec
    from moeport.mappings.values import realize

    codec = PackQuantizedCodec(bits=bits, group_size=32, symmetric=False)
    g = torch.Generator().manual_seed(bits)
    gate, up = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    pg, pu = codec.encode(gate), codec.encode(up)
    fmt = ExpertFormat("ct-pack-quantized", {"num_bits": bits, "group_size": 32, "symmetric": False})
    rules = row_rules(fmt, {p: tuple(t.shape) for p, t in pg.items() if p != "weight_shape"}, "gate")
    fused = {}
    for part, rule in rules.items():
        op = Concat((f"g.{part}", f"u.{part}"), f"gu.{part}", rule, (16, 16))
        fused[part] = realize(op.apply({f"g.{part}": pg[part], f"u.{part}": pu[part]})[f"gu.{part}"])
    fused["weight_shape"] = torch.tensor([32, 64], dtype=torch.int32)
    want = torch.cat([codec.decode(pg), codec.decode(pu)])
    assert torch.equal(codec.decode(fused), want)


def test_rename_with_a_shifted_index_inverts_and_leaves_the_unshifted_alone() -> None:
    rename = Rename((("attn_res.attn_queries.*", "layers.*+1.attention_input.query"),))
    assert rename("llm.attn_res.attn_queries.4") == "llm.layers.5.attention_input.query"
    assert rename.inverse()("llm.layers.5.attention_input.query") == "llm.attn_res.attn_queries.4"
    # index 0 has no index before the shift: the shifted pair does not fire on it
    assert rename.inverse()("llm.layers.0.attention_input.query") == "llm.layers.0.attention_input.query"
    keys = ["llm.attn_res.attn_queries.0", "llm.attn_res.attn_queries.9", "llm.layers.3.norm.weight"]
    rename.check(keys, "test")
    with pytest.raises(ValueError, match="number of"):
        Rename((("attn_queries.*", "layers.1.query"),))
