"""kt-kernel AMXINT4 / AMXINT8 codec: byte-exact against kt-kernel's own output, and vs the spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from kt_support import kt_write_folder, tp_slices

from moeport.codecs import kt_amx as K
from moeport.errors import MoeportError
from moeport.sinks import kt_layout as L


def _experts(seed: int, e: int, i: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 gate/up [E, I, H], down [E, H, I] with edge rows: all zero, tiny, huge, ties."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(e, i, h, generator=g).bfloat16() for _ in range(2))
    down = torch.randn(e, h, i, generator=g).bfloat16()
    gate[0, 5] = 0  # d = 0 -> q = 0
    down[e - 1, 7] = 0
    gate[e - 1, 3] *= 1e-36  # tiny scale (double division, reciprocal near the float range)
    up[0, 2] *= 1e30
    down[0, 1] = torch.randint(-8, 9, (i,), generator=g).bfloat16() / 4  # many exact .5 quotients
    return gate, up, down


CASES = [  # bits, tp, E, I, H
    (4, 1, 3, 256, 256),
    (4, 2, 2, 512, 3840),  # gate/up k = H > K_BLOCK = 3584 (two k-blocks), down n = 3840
    (8, 1, 4, 192, 256),
    (8, 2, 2, 256, 3712),
]


@pytest.mark.parametrize("bits,tp,e,i,h", CASES)
def test_bytes_equal_kt_kernel(monkeypatch, tmp_path: Path, bits, tp, e, i, h):
    gate, up, down = _experts(bits * 100 + tp, e, i, h)
    out = kt_write_folder(monkeypatch, tmp_path / "kt", gate, up, down, K.method_name(bits), tp)
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected: set[str] = set()
    for x in range(e):
        for t, mats in enumerate(tp_slices(gate[x], up[x], down[x], tp)):
            for proj, m in zip(L.PROJS, mats, strict=True):
                q, s = K.kt_quantize(m, bits)
                qpath, spath = L.folder_paths(0, proj, x, t, *m.shape, bits)
                expected |= {qpath, spath}
                assert (out / qpath).read_bytes() == q.numpy().tobytes(), f"{qpath} differs"
                assert (out / spath).read_bytes() == s.numpy().tobytes(), f"{spath} differs"
                if (x, t, proj) == (0, 0, "gate"):  # torch fallback path gives the same bytes
                    q2, s2 = K.kt_quantize(m, bits, use_numba=False)
                    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert written == expected


def _reference_roundtrip(w: np.ndarray, bits: int) -> np.ndarray:
    """The spec in float64: products of two float32 values are exact there, so casting back to
    float32 rounds once, as float32 arithmetic does."""
    x = w.astype(np.float64)
    amax = np.abs(x).max(1)
    if bits == 8:
        d = (amax * np.float64(np.float32(1.0) / np.float32(127.0))).astype(np.float32)
    else:
        d = (amax / 112.0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (1.0 / d.astype(np.float64)).astype(np.float32)
        prod = (x * inv.astype(np.float64)[:, None]).astype(np.float32).astype(np.float64)
    q = np.clip(np.rint(np.where(d[:, None] == 0, 0.0, prod)), -128, 127)
    if bits == 4:
        q = np.sign(q) * ((np.abs(q).astype(np.int64) + 8) // 16)
        q = q * 16
    return (q * d.astype(np.float64)[:, None]).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k", [(128, 256), (256, 3584 + 256)])
def test_roundtrip_matches_spec_reference(bits, n, k):
    gate, _, _ = _experts(7, 1, n, k)
    w = gate[0]
    q, s = K.kt_quantize(w, bits)
    assert q.dtype == torch.int8 and q.shape == (K.quant_nbytes(n, k, bits),)
    assert s.dtype == torch.float32 and s.shape == (n,)
    assert s[5] == 0
    got = K.kt_dequantize(q, s, n, k, bits)
    want = _reference_roundtrip(w.float().numpy(), bits)
    assert np.array_equal(got.numpy(), want)
    if bits == 4:  # codes in [-7, 7]: -8 is never produced
        codes = K._unpack_int4(K.from_tile_order(q, n, k, bits))
        assert codes.min() == -7 and codes.max() == 7


def _spec_offsets(n: int, kb: int, bits: int) -> np.ndarray:
    """Byte offset in kt's image of each row-major code byte [n, kb], from the spec's loop nest."""
    nb, kblk = K.N_BLOCK[bits], K.K_BLOCK * bits // 8
    r = np.arange(n)[:, None]
    c = np.arange(kb)[None, :]
    nbb = r // nb * nb
    nbs = np.minimum(nb, n - nbb)
    n0, i = (r - nbb) // 32 * 32, r % 32
    kbb = c // kblk * kblk
    kbs = np.minimum(kblk, kb - kbb)
    k0, j = (c - kbb) // 64 * 64, c % 64
    tile = nbb * kb + kbb * nbs + n0 * kbs + k0 * 32
    return tile + (i // 16) * 1024 + (j // 4) * 64 + (i % 16) * 4 + j % 4


@pytest.mark.parametrize("bits,n,kb", [(8, 96, 3584 + 64), (4, 160, 1792 + 128), (4, 256, 64)])
def test_tile_order_matches_spec_loop_nest(bits, n, kb):
    """Includes a tail n-block (n not a multiple of N_BLOCK), which kt itself never accepts."""
    q = torch.randint(-128, 128, (n, kb), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    image = K.to_tile_order(q, bits)
    want = np.empty(n * kb, dtype=np.int8)
    want[_spec_offsets(n, kb, bits).ravel()] = q.numpy().ravel()
    assert np.array_equal(image.numpy(), want)
    assert torch.equal(K.from_tile_order(image, n, kb * 8 // bits, bits), q)


def test_int4_nibbles_in_a_tile():
    """Byte j of a tile row holds k = j (low nibble) and k = 64 + j (high nibble), two's complement."""
    w = torch.zeros(128, 128)
    w[:, 0] = -7.0  # amax 7 -> d = 1/16 -> q8 = -112 -> q4 = -7
    w[:, 64] = 3.0  # q8 = 48 -> q4 = 3
    w[:, 1] = 7.0
    q, s = K.kt_codes(w.bfloat16(), 4)
    assert torch.all(s == np.float32(7.0 / 112.0))
    assert q[0, 0].item() == np.int8(np.uint8(0x39)) and q[0, 1].item() == 7


def test_alignment_errors_suggest_tp():
    K.check_alignment(2048, 1408, 1, 4)
    K.check_alignment(2048, 1408, 2, 8)  # 704 % 64 == 0
    with pytest.raises(MoeportError, match=r"AMXINT4 with --numa 2: .*704.*use --numa 1"):
        K.check_alignment(2048, 1408, 2, 4)
    with pytest.raises(MoeportError, match=r"not divisible by 3.*use --numa 2"):
        K.check_alignment(2048, 1024, 3, 8)
    with pytest.raises(MoeportError, match="no --numa value works"):
        K.check_alignment(2000, 1024, 1, 4)
    assert K.suggest_tp(2048, 1408, 4, want=4) == 1
    assert K.suggest_tp(7168, 2048, 4, want=4) == 4
    assert K.suggest_tp(7168, 2048, 4, want=3) == 2
    assert K.suggest_tp(2000, 2048, 4) is None


def test_bad_inputs_name_the_tensor():
    with pytest.raises(MoeportError, match=r"blk.0.up: shape \[96, 256\].*multiple of 128"):
        K.kt_quantize(torch.randn(96, 256).bfloat16(), 4, where="blk.0.up")
    w = torch.randn(64, 128)
    w[3, 9] = float("nan")
    for use_numba in (True, False):
        with pytest.raises(MoeportError, match="w: row 3 contains NaN"):
            K.kt_quantize(w, 8, where="w", use_numba=use_numba)
    q, s = K.kt_quantize(torch.randn(128, 128), 8)
    with pytest.raises(MoeportError, match="w.weight: 16384 bytes, expected 8192"):
        K.kt_dequantize(q, s, 128, 128, 4, where="w")
    with pytest.raises(MoeportError, match="bits 5"):
        K.kt_quantize(torch.randn(64, 128), 5)


def test_names():
    assert L.merged_key(3, "down", 17, 1, "scale") == "blk.3.ffn_down_exps.17.numa.1.scale"
    assert L.folder_paths(3, "up", 5, 1, 256, 7168, 4) == (
        "_layer_3/_numa_1/INT4_up_5_917504Byte_quant_.kt",
        "_layer_3/_numa_1/INT4_up_5_1024Byte_scale_.kt",
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [(128, 128), (1, 32), (64, 96)])
def test_fp8_block_fused_kernel_equals_decode_then_quantize(bits, block):
    """The fused FP8-block -> kt kernel gives the bytes of decoding to bf16 then kt_quantize, for
    every E4M3 code (subnormals, both zeros, the largest), block shapes that do not divide the
    matrix, scales down to the subnormal range and up to where products round past bf16."""
    from moeport.codecs.fp8 import Fp8BlockCodec

    n, k = 256, 384
    g = torch.Generator().manual_seed(bits * 7 + block[1])
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    codes[codes & 0x7F == 0x7F] = 0x11  # no NaN codes here
    codes[3] = torch.arange(k) % 8  # zeros and subnormals only
    codes[4, : k // 2] = 0x80  # -0
    codes[5] = 0  # an all-zero row: d = 0
    w = codes.view(torch.float8_e4m3fn)
    gn, gk = -(-n // block[0]), -(-k // block[1])
    scale = torch.exp2(torch.randint(-20, 10, (gn, gk), generator=g).float()) * (
        1 + torch.rand(gn, gk, generator=g)
    )
    scale[0, 0] = 2.0**-130  # products in the float32 subnormal range
    codec = Fp8BlockCodec(block=block)
    parts = {"weight": w, "weight_scale_inv": scale}
    want = K.kt_quantize(codec.decode(parts).bfloat16(), bits)
    got = K.kt_quantize_fp8_block(w, scale, block, bits, "x")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[1].abs().sum() > 0 and got[0].abs().sum() > 0  # not a trivial all-zero output


def test_fp8_block_fused_kernel_refuses_nan_and_overflow():
    w = torch.randint(0, 0x70, (128, 128), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    w = w.to(torch.uint8)
    w[9, 4] = 0xFF  # a NaN code
    with pytest.raises(MoeportError, match=r"up_proj: row 9 contains NaN codes"):
        K.kt_quantize_fp8_block(w.view(torch.float8_e4m3fn), torch.ones(1, 1), (128, 128), 4, "up_proj")
    w[9, 4] = 0x10
    with pytest.raises(MoeportError, match=r"row 0 .*beyond bf16"):
        K.kt_quantize_fp8_block(w.view(torch.float8_e4m3fn), torch.full((1, 1), 3e38), (128, 128), 4, "up")
