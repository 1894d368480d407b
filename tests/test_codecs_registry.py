"""The format registry agrees with the codecs it names: what a codec encodes is recognised as its
format, decoded_shape gives back the encoded weight's shape, the detected parameters rebuild a codec
that reads the parts as the encoder meant, and a codec that claims to take stacks really does.

Every declared format with a codec must have an entry in CASES (a new format fails here until it
has one). Seeded random weights, never zeros.
"""

from __future__ import annotations

import pytest
import torch

from moeport.codecs import (
    AwqCodec,
    CtMxfp4Codec,
    CtNvfp4Codec,
    Dsv4Mxfp4Codec,
    FloatCodec,
    Fp8BlockCodec,
    Fp8ScaledCodec,
    GptOssMxfp4Codec,
    GptqCodec,
    Nvfp4Codec,
    PackQuantizedCodec,
)
from moeport.codecs.base import Codec
from moeport.codecs.format import ExpertFormat, Part
from moeport.codecs.ggml import GgmlCodec, quant_type
from moeport.codecs.registry import FORMATS, classify, codec_for, decoded_shape, format_of, row_rule
from moeport.dtypes import safetensors_name_of
from moeport.errors import MoeportError

N, K, EXPERTS = 48, 256, 3  # N != K catches a transposed shape; K a multiple of every group/block

CT_W4 = {
    "quant_method": "compressed-tensors",
    "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32, "symmetric": True}}},
}
CT_W8_ASYM = {
    "quant_method": "compressed-tensors",
    "config_groups": {"group_0": {"weights": {"num_bits": 8, "group_size": 64, "symmetric": False}}},
}

# (name, variant) -> cases of (codec that encodes, quantization_config the producer writes)
CASES: dict[tuple[str, str | None], list[tuple[Codec, dict]]] = {
    ("bf16", None): [(FloatCodec("bf16"), {})],
    ("fp16", None): [(FloatCodec("fp16"), {})],
    ("fp32", None): [(FloatCodec("fp32"), {})],
    ("fp8-tensor", None): [(Fp8ScaledCodec("tensor"), {})],
    ("fp8-channel", None): [
        (Fp8ScaledCodec("channel"), {}),
        (Fp8ScaledCodec("channel", scale_dtype=torch.bfloat16), {"quant_method": "compressed-tensors"}),
    ],
    ("fp8-block", None): [
        (Fp8BlockCodec(block=(128, 128)), {}),
        (Fp8BlockCodec(block=(32, 64)), {"quant_method": "fp8", "weight_block_size": [32, 64]}),
        (Fp8BlockCodec(ue8m0=True, scale_dtype=torch.float8_e8m0fnu), {"quant_method": "fp8"}),
    ],
    ("mxfp4", "gpt-oss"): [(GptOssMxfp4Codec(), {"quant_method": "mxfp4"})],
    ("mxfp4", None): [(Dsv4Mxfp4Codec(), {})],
    ("nvfp4", None): [(Nvfp4Codec(), {"quant_method": "modelopt"})],
    ("gptq", None): [
        (GptqCodec(group_size=32), {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}),
        (
            GptqCodec(group_size=64, sym=False, checkpoint_format="gptq_v2"),
            {"quant_method": "gptq", "group_size": 64, "sym": False, "checkpoint_format": "gptq_v2"},
        ),
    ],
    ("awq", None): [(AwqCodec(group_size=32), {"quant_method": "awq", "bits": 4, "group_size": 32})],
    ("ct-nvfp4", None): [(CtNvfp4Codec(), {"quant_method": "compressed-tensors"})],
    ("ct-mxfp4", None): [(CtMxfp4Codec(), {"quant_method": "compressed-tensors"})],
    ("gguf", None): [(GgmlCodec(quant_type(t)), {}) for t in ("Q8_0", "Q4_0", "MXFP4")],
    ("ct-pack-quantized", None): [
        (PackQuantizedCodec(bits=4, group_size=32), CT_W4),
        (PackQuantizedCodec(bits=8, group_size=64, symmetric=False), CT_W8_ASYM),
    ],
}
FLAT = [
    pytest.param(key, codec, quant, id=f"{key[0]}-{key[1] or ''}-{i}")
    for key, cases in CASES.items()
    for i, (codec, quant) in enumerate(cases)
]


def weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def headers(parts: dict[str, torch.Tensor]) -> dict[str, Part]:
    return {p: Part(safetensors_name_of(t.dtype), tuple(t.shape)) for p, t in parts.items()}


def encode_stack(codec: Codec, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parts of each weight of `w` [B, N, K], stacked along a new dim 0 (as fused experts store them)."""
    each = [codec.encode(w[i]) for i in range(w.shape[0])]
    return {p: torch.stack([e[p] for e in each]) for p in each[0]}


def test_every_format_with_a_codec_has_a_case() -> None:
    declared = {(f.name, f.variant) for f in FORMATS if f.codec is not None}
    assert declared == set(CASES)


def test_declarations_are_unique_and_complete() -> None:
    keys = [(f.name, f.variant) for f in FORMATS]
    assert len(keys) == len(set(keys))
    for f in FORMATS:
        assert f.codec is None or f.decoded_shape is not None, f"{f.name}: a codec but no decoded_shape"


@pytest.mark.parametrize(("key", "codec", "quant"), FLAT)
def test_encoded_parts_are_recognised_and_shaped_as_the_weight(key, codec: Codec, quant: dict) -> None:
    w = weight(N, K)
    parts = codec.encode(w)
    fmt = classify(headers(parts), quant, "w")
    assert (fmt.name, format_of(fmt).variant) == key
    assert decoded_shape(fmt, {p: tuple(t.shape) for p, t in parts.items()}, "w") == (N, K)
    rebuilt = codec_for(fmt)
    assert torch.equal(rebuilt.decode(parts, "w"), codec.decode(parts, "w"))


@pytest.mark.parametrize(("key", "codec", "quant"), FLAT)
def test_stacked_experts_are_recognised_and_shaped_as_the_stack(key, codec: Codec, quant: dict) -> None:
    """Fused experts: every part carries a leading expert dim; the format and [E, N, K] follow."""
    parts = encode_stack(codec, weight(EXPERTS, N, K, seed=1))
    fmt = classify(headers(parts), quant, "w")
    assert (fmt.name, format_of(fmt).variant) == key
    assert decoded_shape(fmt, {p: tuple(t.shape) for p, t in parts.items()}, "w") == (EXPERTS, N, K)


@pytest.mark.parametrize(("key", "codec", "quant"), FLAT)
def test_a_codec_that_takes_stacks_gives_what_it_gives_one_by_one(key, codec: Codec, quant: dict) -> None:
    w = weight(EXPERTS, N, K, seed=2)
    one_by_one = encode_stack(codec, w)
    if codec.stacked_encode:
        stacked = codec.encode(w)
        assert set(stacked) == set(one_by_one)
        for p, t in one_by_one.items():
            assert torch.equal(stacked[p], t), p
    if codec.stacked_decode:
        want = torch.stack([codec.decode({p: t[i] for p, t in one_by_one.items()}) for i in range(EXPERTS)])
        assert torch.equal(codec.decode(one_by_one), want)


def test_stack_flags_are_the_ones_the_gpu_paths_rely_on() -> None:
    assert Fp8BlockCodec().stacked_decode and Fp8BlockCodec().stacked_encode
    assert PackQuantizedCodec().stacked_encode
    assert Fp8ScaledCodec("channel").stacked_encode and not Fp8ScaledCodec("tensor").stacked_encode


@pytest.mark.parametrize(
    ("parts", "name"),
    [
        ({"weight": Part("F64", (N, K))}, "fp64"),
    ],
)
def test_recognised_formats_without_a_codec_say_so(parts: dict[str, Part], name: str) -> None:
    fmt = classify(parts, {}, "w")
    assert fmt.name == name
    with pytest.raises(MoeportError, match=f"no decoder for expert format {name}"):
        codec_for(fmt)


def test_marker_parts_outrank_the_dtype_of_a_weight() -> None:
    """Recognition order: a `qweight` group stays GPTQ even with a float `weight` beside it."""
    parts = headers(GptqCodec(group_size=32).encode(weight(N, K))) | {"weight": Part("BF16", (N, K))}
    assert classify(parts, {}, "w").name == "gptq"


def test_row_rules_come_from_the_format() -> None:
    fmt = ExpertFormat("fp8-block", {"scale": "weight_scale_inv", "block": [32, 64]})
    assert row_rule(fmt, "weight_scale_inv", (2, 4), "w").per == 32
    assert row_rule(fmt, "weight", (N, K), "w").axis == -2
    assert row_rule(ExpertFormat("awq"), "qweight", (K, N // 8), "w").per == 8
    assert row_rule(ExpertFormat("gptq"), "qweight", (K // 8, N), "w").per == 1
    with pytest.raises(MoeportError, match="unfused shape"):
        row_rule(ExpertFormat("bf16"), "weight_shape", (2,), "w")
