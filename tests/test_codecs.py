"""Codecs cross-checked against the real libraries (compressed-tensors, transformers, gguf) or a
float64 reference written from the format descriptions in the codec modules, on seeded random data
of awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeport.codecs import (
    AwqCodec,
    Dsv4Mxfp4Codec,
    FloatCodec,
    Fp8BlockCodec,
    Fp8ScaledCodec,
    GptOssMxfp4Codec,
    GptqCodec,
    Nvfp4Codec,
    PackQuantizedCodec,
)
from moeport.codecs.fp4 import e2m1_decode, e2m1_encode, unpack_nibbles
from moeport.codecs.int_rtn import rtn_quantize
from moeport.codecs.packing import interleave_awq, pack_int32
from moeport.errors import MoeportError


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def hexbytes(t: torch.Tensor) -> str:
    return bytes(t.contiguous().view(torch.uint8).flatten().tolist()).hex()


# ---------------------------------------------------------------- floats
def test_fp32_to_bf16_is_round_to_nearest_even_on_the_bit_pattern() -> None:
    bits = torch.randint(
        0, 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(1), dtype=torch.int64
    )
    bits[:3] = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000])  # spec vectors: ties and a non-tie
    x = bits.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    ours = FloatCodec("bf16").encode(x)["weight"].view(torch.int16).to(torch.int64) & 0xFFFF
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expected = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    assert torch.equal(ours, expected & 0xFFFF)
    assert ours[:3].tolist() == [0x3F80, 0x3F82, 0x3F81]
    assert torch.equal(FloatCodec("bf16").decode({"weight": x.bfloat16()}), x.bfloat16().float())


# ---------------------------------------------------------------- FP8
def _ct_args(**kw):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, **kw)


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (576, 448), (1, 130)])
def test_fp8_block_matches_compressed_tensors_bit_exactly(shape) -> None:
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    w = randn(*shape, seed=2, scale=0.05)
    parts = Fp8BlockCodec().encode(w)
    assert parts["weight_scale_inv"].shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    args = _ct_args(strategy="block", block_structure=[128, 128])
    scale = parts["weight_scale_inv"]
    padded = maybe_pad_tensor_for_block_quant(w, (128, 128))
    codes = quantize(padded, scale, torch.zeros_like(scale), args, dtype=torch.float8_e4m3fn)
    assert hexbytes(codes[: shape[0], : shape[1]]) == hexbytes(parts["weight"])
    ct = dequantize(maybe_pad_tensor_for_block_quant(parts["weight"].float(), (128, 128)), scale, None, args)
    assert torch.equal(ct[: shape[0], : shape[1]], Fp8BlockCodec().decode(parts))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_block_matches_transformers_on_3d_experts(ue8m0) -> None:
    import types

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    w = randn(3, 256, 384, seed=3, scale=0.02)
    cfg = FineGrainedFP8Config(weight_block_size=[128, 128], scale_fmt="ue8m0" if ue8m0 else "float")
    hf = types.SimpleNamespace(quantization_config=cfg)
    tf = Fp8Quantize(hf).convert({"x.weight": w})
    codec = Fp8BlockCodec(ue8m0=ue8m0, scale_dtype=torch.float8_e8m0fnu if ue8m0 else torch.float32)
    ours = codec.encode(w)
    tf_scale, our_scale = tf["x.weight_scale_inv"].float(), ours["weight_scale_inv"].float()
    # TF stores 1/(448/amax), we store amax/448: equal up to one float32 ULP
    assert torch.allclose(tf_scale, our_scale, rtol=2**-23, atol=0)
    mismatch = (tf["x.weight"].view(torch.uint8) != ours["weight"].view(torch.uint8)).float().mean()
    assert mismatch <= 1e-4  # TF multiplies by 448/amax, we divide by amax/448: may differ by one ULP
    tf_back = Fp8Dequantize(hf)._dequantize_one(ours["weight"], ours["weight_scale_inv"], torch.float32)
    assert torch.equal(tf_back, codec.decode(ours))


def test_fp8_spec_vectors() -> None:
    parts = Fp8BlockCodec().encode(torch.tensor([[1.0, -2.0], [0.5, 7.0]]))
    assert hexbytes(parts["weight_scale_inv"]) == "0000803c" and hexbytes(parts["weight"]) == "68f0607e"
    ue = Fp8BlockCodec(ue8m0=True, scale_dtype=torch.float8_e8m0fnu).encode(
        torch.tensor([[1.0, -2.0], [0.5, 7]])
    )
    assert hexbytes(ue["weight_scale_inv"]) == "79" and hexbytes(ue["weight"]) == "68f0607e"
    ch = Fp8ScaledCodec().encode(torch.tensor([[1, -2, 4], [0.25, 0.5, -0.125]]))
    assert hexbytes(ch["weight"]) == "6ef67e767eee"
    assert torch.equal(ch["weight_scale"], torch.tensor([[4 / 448], [0.5 / 448]]))


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_channel_and_tensor_match_compressed_tensors(strategy) -> None:
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    w = randn(33, 70, seed=4)
    codec = Fp8ScaledCodec(strategy=strategy)
    parts = codec.encode(w)
    args = _ct_args(strategy=strategy)
    s = parts["weight_scale"]
    codes = quantize(w, s, torch.zeros_like(s), args, dtype=torch.float8_e4m3fn)
    assert hexbytes(codes) == hexbytes(parts["weight"])
    assert torch.equal(dequantize(parts["weight"].float(), s, None, args), codec.decode(parts))


# ---------------------------------------------------------------- FP4
def test_e2m1_rounding_matches_compressed_tensors() -> None:
    from compressed_tensors.quantization.utils.helpers import FP4_E2M1_DATA

    x = torch.cat(
        [randn(10_000, seed=5, scale=3), torch.arange(-70, 71) / 10, torch.tensor([0.25, 0.75, 5.0])]
    )
    assert torch.equal(e2m1_decode(e2m1_encode(x)), FP4_E2M1_DATA.cast_to_fp4(x).float())


def test_mxfp4_spec_vectors_and_gpt_oss_decode_matches_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    row = torch.tensor([1, -0.5, 6, 3] + [0] * 28)
    parts = GptOssMxfp4Codec().encode(row.reshape(1, 32))
    assert hexbytes(parts["_scales"]) == "7f" and hexbytes(parts["_blocks"]) == "9257" + "00" * 14

    w = randn(2, 70, 96, seed=6, scale=0.1)  # [E, N=2I, K=H], K a multiple of 32 only
    parts = GptOssMxfp4Codec().encode(w)
    assert parts["_blocks"].shape == (2, 70, 3, 16) and parts["_scales"].shape == (2, 70, 3)
    tf = convert_moe_packed_tensors(parts["_blocks"], parts["_scales"], dtype=torch.float32)
    assert torch.equal(tf.transpose(1, 2), GptOssMxfp4Codec().decode(parts))  # TF returns [E, in, out]
    assert ((GptOssMxfp4Codec().decode(parts) - w).norm() / w.norm()) < 0.2


def _to_ggml_mxfp4(packed: torch.Tensor, scale_bytes: torch.Tensor) -> np.ndarray:
    """Repack pair-order nibbles into ggml's block_mxfp4 (byte j = element j | element j+16 << 4)."""
    codes = unpack_nibbles(packed).reshape(-1, 32)
    ggml = codes[:, :16] | (codes[:, 16:] << 4)
    return torch.cat([scale_bytes.reshape(-1, 1).view(torch.uint8), ggml], dim=1).numpy()


def test_deepseek_v4_fp4_decode_matches_gguf() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = randn(48, 128, seed=7, scale=0.3)
    parts = Dsv4Mxfp4Codec().encode(w)
    assert parts["weight"].dtype == torch.int8 and parts["scale"].dtype == torch.float8_e8m0fnu
    ref = dequantize(_to_ggml_mxfp4(parts["weight"], parts["scale"]), GGMLQuantizationType.MXFP4)
    assert np.array_equal(ref.reshape(48, 128), Dsv4Mxfp4Codec().decode(parts).numpy())


def test_nvfp4_spec_vectors_and_decode_matches_gguf() -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    parts = Nvfp4Codec().encode(
        torch.stack([torch.tensor([6, -3, 1.5, 0.5] + [0] * 12), torch.full((16,), 0.1)])
    )
    assert hexbytes(parts["weight_scale"]) == "7e4f"
    assert hexbytes(parts["weight"]) == "d713" + "00" * 6 + "77" * 8
    assert Nvfp4Codec().decode(parts)[1, 0].item() == pytest.approx(0.10044643, abs=1e-8)

    w = randn(8, 128, seed=8)
    parts = Nvfp4Codec().encode(w)
    codes = unpack_nibbles(parts["weight"]).reshape(-1, 4, 16)
    qs = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(-1, 32)
    scales = parts["weight_scale"].view(torch.uint8).reshape(-1, 4) & 0x7F
    ggml = torch.cat([scales, qs], dim=1).numpy()
    ref = dequantize(ggml, GGMLQuantizationType.NVFP4).reshape(8, 128) * parts["weight_scale_2"].item()
    ours = Nvfp4Codec().decode(parts).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- GPTQ / AWQ
def _gptq_reference(parts, k: int, v1: bool) -> torch.Tensor:
    """float64 transcription of the spec's dequant formula, one element at a time (slow, tiny shapes)."""
    qw, qz, s, g_idx = (parts[n] for n in ("qweight", "qzeros", "scales", "g_idx"))
    n = qw.shape[1]
    out = torch.empty(n, k, dtype=torch.float64)
    for kk in range(k):
        g = int(g_idx[kk])
        for nn in range(n):
            q = (int(qw[kk // 8, nn]) >> (4 * (kk % 8))) & 0xF
            z = (int(qz[g, nn // 8]) >> (4 * (nn % 8))) & 0xF
            out[nn, kk] = float(s[g, nn]) * (q - (z + 1 if v1 else z))
    return out


@pytest.mark.parametrize(("sym", "fmt"), [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_gptq_decode_matches_float64_reference_including_act_order(sym, fmt) -> None:
    w = randn(16, 64, seed=9)
    w[3, :32] = w[3, :32].abs()  # an all-positive group: asym true zero 0, the v1 overflow trap
    codec = GptqCodec(group_size=32, sym=sym, checkpoint_format=fmt)
    parts = codec.encode(w)
    if sym:
        assert (parts["qzeros"] == 0x77777777).all()
    ref = _gptq_reference(parts, 64, v1=fmt == "gptq")
    assert torch.equal(codec.decode(parts).double(), ref)
    assert ((ref.float() - w).norm() / w.norm()) < 0.15
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    act_order = {**parts, "g_idx": (perm // 32).to(torch.int32)}  # desc_act: non-monotone groups
    assert torch.equal(codec.decode(act_order).double(), _gptq_reference(act_order, 64, v1=fmt == "gptq"))


def test_gptq_and_awq_spec_vectors() -> None:
    codes = torch.tensor([[(8 * k + n) % 16 for n in range(8)] for k in range(8)])
    assert [w & 0xFFFFFFFF for w in pack_int32(codes, 4, dim=0)[0].tolist()] == [
        0x80808080,
        0x91919191,
        0xA2A2A2A2,
        0xB3B3B3B3,
        0xC4C4C4C4,
        0xD5D5D5D5,
        0xE6E6E6E6,
        0xF7F7F7F7,
    ]
    # AWQ: one row, columns 0..7 holding codes 0..7 -> one word in the 0,2,4,6,1,3,5,7 nibble order
    assert pack_int32(interleave_awq(torch.arange(8).reshape(1, 8)), 4).item() == 0x75316420


def test_awq_decode_matches_float64_reference() -> None:
    w = randn(16, 64, seed=10)
    parts = AwqCodec(group_size=32).encode(w)
    qw, qz, s = parts["qweight"], parts["qzeros"], parts["scales"]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    ref = torch.empty(16, 64, dtype=torch.float64)
    for kk in range(64):
        for nn in range(16):
            slot = order.index(nn % 8)
            q = (int(qw[kk, nn // 8]) >> (4 * slot)) & 0xF
            z = (int(qz[kk // 32, nn // 8]) >> (4 * slot)) & 0xF
            ref[nn, kk] = float(s[kk // 32, nn]) * (q - z)
    assert torch.equal(AwqCodec(group_size=32).decode(parts).double(), ref)


# ---------------------------------------------------------------- compressed-tensors / RTN
@pytest.mark.parametrize(
    ("bits", "group", "sym"),
    [(4, 32, True), (4, 32, False), (8, None, True), (4, None, False), (8, 64, False)],
)
def test_rtn_and_pack_quantized_match_compressed_tensors(bits, group, sym) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = randn(44, 128, seed=11)
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy, group_size=group)
    g = w.reshape(44, -1, group or 128)
    ct_scale, ct_zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q = rtn_quantize(w, bits, group, sym, scale_dtype=torch.float32)
    assert torch.equal(q.scale, ct_scale)
    if not sym:
        assert torch.equal(q.zero.to(ct_zp.dtype), ct_zp)
    ct_codes = quantize(w, ct_scale, ct_zp, args, dtype=torch.int8)
    assert torch.equal(q.codes, ct_codes)

    codec = PackQuantizedCodec(bits=bits, group_size=group, symmetric=sym, scale_dtype=torch.float32)
    parts = codec.encode(w)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    ct = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": ct_scale, "weight_zero_point": ct_zp}, scheme
    )
    for name in parts:
        assert torch.equal(ct[name], parts[name]), name
    back = PackedQuantizationCompressor.decompress(dict(parts), scheme)
    assert torch.equal(back["weight"].float(), codec.decode(parts))


def test_int_rtn_error_is_bounded_by_half_a_step_of_the_stored_bf16_scale() -> None:
    w = randn(64, 256, seed=12).bfloat16()
    codec = PackQuantizedCodec(bits=4, group_size=128)
    parts = codec.encode(w)
    assert parts["weight_scale"].dtype == torch.bfloat16
    step = parts["weight_scale"].float().repeat_interleave(128, dim=1)
    err = (codec.decode(parts) - w.float()).abs()
    # rounding costs <= step/2; amax/7.5 maps +amax to 7.5, clamped to 7 (also step/2); bf16 scale adds 2^-8
    assert (err <= step * (0.5 + 7.5 * 2**-8)).all()
    assert (err > 0).any()


# ---------------------------------------------------------------- bad parts
@pytest.mark.parametrize(
    ("codec", "damage", "message"),
    [
        (Fp8BlockCodec(), lambda p: p.pop("weight_scale_inv"), r"needs tensor\(s\) \['weight_scale_inv'\]"),
        (
            Fp8BlockCodec(),
            lambda p: p.update(weight_scale_inv=p["weight_scale_inv"][:1]),
            r"weight_scale_inv: shape \[1, 3\], expected \[2, 3\]",
        ),
        (Fp8BlockCodec(), lambda p: p.update(weight=p["weight"].float()), "weight: dtype float32, expected"),
        (Fp8BlockCodec(), lambda p: p["weight_scale_inv"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (GptOssMxfp4Codec(), lambda p: p["_scales"].__setitem__((0, 0), 255), "NaN or Inf"),
        (GptqCodec(group_size=64), lambda p: p.update(scales=p["scales"][:, :3]), "scales: shape"),
        (PackQuantizedCodec(group_size=64), lambda p: p.pop("weight_shape"), "weight_shape"),
        (Nvfp4Codec(), lambda p: p["weight_scale_2"].fill_(float("inf")), "weight_scale_2: 1 scale"),
    ],
)
def test_bad_parts_are_clear_errors_naming_the_tensor(codec, damage, message) -> None:
    parts = dict(codec.encode(randn(200, 320, seed=13)))
    damage(parts)
    with pytest.raises(MoeportError, match=message) as err:
        codec.decode(parts, where="model.layers.3.mlp.experts.7.up_proj")
    assert "model.layers.3.mlp.experts.7.up_proj" in str(err.value)


# ---------------------------------------------------------------- CPU kernels vs the torch path
@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [
        (4, 128, True, torch.bfloat16),
        (4, 32, False, torch.float32),
        (8, 64, True, torch.bfloat16),
        (8, 128, False, torch.float32),
    ],
)
def test_numba_kernels_are_byte_identical_to_the_torch_path(
    monkeypatch, bits, group, sym, scale_dtype
) -> None:
    from moeport.codecs import cpu_kernels

    assert cpu_kernels.AVAILABLE
    w = randn(96, 256, seed=14).bfloat16()
    w[5] = 0  # an all-zero group takes the eps scale
    w[6] = -w[6].abs()  # groups with no positive value
    w[7, :128] = -0.0
    w[8] *= 1e-38  # bf16 subnormals
    w[9, 1::2] = w[9, ::2]  # repeated maxima
    codec = PackQuantizedCodec(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    fp8 = Fp8BlockCodec()
    fast, fp8_parts = codec.encode(w), fp8.encode(randn(200, 300, seed=15))
    fast_decode = fp8.decode(fp8_parts)
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    slow = codec.encode(w)
    assert slow.keys() == fast.keys()
    for name in fast:
        assert fast[name].dtype == slow[name].dtype and torch.equal(fast[name], slow[name]), name
    assert torch.equal(fp8.decode(fp8_parts), fast_decode)


@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [(4, 128, True, torch.bfloat16), (4, 32, False, torch.float32), (8, 64, False, torch.bfloat16)],
)
def test_fused_fp8_block_transcode_equals_decode_then_encode(bits, group, sym, scale_dtype) -> None:
    from moeport.codecs.transcode import transcode

    w = randn(256, 384, seed=16, scale=0.02)
    w[:128, :128] = -w[:128, :128].abs()  # a block with no positive value
    w[130, :] = 0  # an all-zero row
    fp8 = Fp8BlockCodec()
    parts = fp8.encode(w)
    dst = PackQuantizedCodec(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    fused, plain = transcode(fp8, parts, dst), dst.encode(fp8.decode(parts))
    assert fused.keys() == plain.keys()
    for name in plain:
        assert torch.equal(fused[name], plain[name]), name
    parts["weight"].view(torch.uint8)[3, 5] = 0x7F
    with pytest.raises(MoeportError, match="experts.1.down_proj.weight: FP8 weight contains NaN codes"):
        transcode(fp8, parts, dst, where="experts.1.down_proj")


@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [(4, 128, True, torch.bfloat16), (4, 64, False, torch.float32), (8, 128, True, torch.float32)],
)
def test_fused_fp8_block_transcode_every_e4m3_byte(bits, group, sym, scale_dtype) -> None:
    """The fused kernel decodes E4M3 bytes arithmetically: every non-NaN byte (subnormals, -0 among
    them) in random groups, groups of subnormals only, of one sign only, and all-zero groups."""
    from moeport.codecs.transcode import transcode

    g = torch.Generator().manual_seed(17)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    raw = codes[torch.randint(len(codes), (256, 512), generator=g)]
    raw[0] = codes[torch.arange(512) % len(codes)]
    raw[1:9] = torch.randint(8, (8, 512), generator=g, dtype=torch.uint8)  # subnormals and +0
    raw[9:17] = raw[1:9] | 0x80  # negative subnormals and -0
    raw[17:25] &= 0x7F  # positive only
    raw[25:33] |= 0x80  # negative only
    raw[33] = 0x80
    raw[34] = 0
    block_scale = torch.rand(2, 4, generator=g) * 1e-3 + 1e-5
    parts = {"weight": raw.view(torch.float8_e4m3fn), "weight_scale_inv": block_scale}
    fp8 = Fp8BlockCodec()
    dst = PackQuantizedCodec(bits=bits, group_size=group, symmetric=sym, scale_dtype=scale_dtype)
    fused, plain = transcode(fp8, parts, dst), dst.encode(fp8.decode(parts))
    assert fused.keys() == plain.keys()
    for name in plain:
        assert fused[name].dtype == plain[name].dtype and torch.equal(fused[name], plain[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_decode_into_equals_decode_then_cast(dtype) -> None:
    """The CPU path decodes FP8 straight into the output tensor (no float32 temporary); its values
    are those of decode(...).to(dtype): every E4M3 byte, scales that make bf16 ties and overflow."""
    g = torch.Generator().manual_seed(18)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    raw = codes[torch.randint(len(codes), (300, 520), generator=g)]
    raw[0, : len(codes)] = codes
    block_scale = torch.rand(3, 5, generator=g) * 2.0 + 1e-6
    block_scale[1, 2] = 1.0 + 2.0**-8  # products land on bf16 rounding ties
    block_scale[2, 4] = 3.0e38  # products overflow float32 to +-inf
    parts = {"weight": raw.view(torch.float8_e4m3fn), "weight_scale_inv": block_scale}
    fp8 = Fp8BlockCodec()
    out = torch.empty(300, 520, dtype=dtype)
    assert fp8.decode_into(parts, out, "w")
    expected = fp8.decode(parts).to(dtype)
    assert torch.equal(
        out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    parts["weight"].view(torch.uint8)[7, 9] = 0xFF
    with pytest.raises(MoeportError, match="^w.*NaN"):
        fp8.decode_into(parts, out, "w")


def test_bf16_rtn_kernel_leaves_nonfinite_rows_to_torch(monkeypatch) -> None:
    """A row holding Inf or NaN is not the fused kernel's to judge: the torch path encodes the
    weight (the caller refuses the resulting scales unless --allow-nonfinite)."""
    from moeport.codecs import cpu_kernels, rtn_kernels

    w = randn(64, 256, seed=19).bfloat16()
    w[3, 17], w[40, 200] = float("inf"), float("nan")
    assert rtn_kernels.bf16_to_int(w, 4, 128, True, torch.bfloat16) is None
    codec = PackQuantizedCodec(bits=4, group_size=128, symmetric=True, scale_dtype=torch.bfloat16)
    fast = codec.encode(w)
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    slow = codec.encode(w)
    for name in fast:
        assert torch.equal(fast[name].view(torch.uint8), slow[name].view(torch.uint8)), name


def test_gptq_encodes_a_single_group_per_row() -> None:
    """K equal to the group size: one scale row, qzeros packed from a [1, N] transpose (a size-1
    dim torch may give any stride); decodes back within half a step."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    parts = GptqCodec(group_size=128, sym=True).encode(w)
    assert parts["qzeros"].shape == (1, 8) and bool((parts["qzeros"] == 0x77777777).all())
    step = parts["scales"].float().T  # [N, 1]
    assert bool(((GptqCodec(group_size=128).decode(parts) - w).abs() <= step / 2 + 1e-3).all())


def test_mxfp4_encode_under_flush_to_zero() -> None:
    """kt-kernel's import turns on flush-to-zero; an all-zero MXFP4 group (scale 2^-127, a float32
    subnormal) must still encode, to the same bytes as without it."""
    from moeport.codecs.fp4 import mx_encode

    w = randn(16, 128, seed=20)
    w[3, :32] = 0.0
    w[5, 64:96] = -0.0
    expected = mx_encode(w)
    torch.set_flush_denormal(True)
    try:
        got = mx_encode(w)
    finally:
        torch.set_flush_denormal(False)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
