"""codecs/ggml.py's lossless moves: GGML's MXFP4 rows as one more MXFP4 layout, GGML rows as they
are. gguf-py's `gguf.quants` is the reference for what a GGML block holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeport.codecs import CtMxfp4Codec, Dsv4Mxfp4Codec, GptOssMxfp4Codec
from moeport.codecs.ggml import GgmlCodec, GgmlMxfp4Codec, quant_type
from moeport.convert.encode import Recode, recode_specs
from moeport.errors import MoeportError


def weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("src", [CtMxfp4Codec(), GptOssMxfp4Codec(), Dsv4Mxfp4Codec()], ids=lambda c: c.name)
def test_mxfp4_layouts_move_into_ggml_blocks_and_back(src) -> None:
    import gguf

    parts = src.encode(weight(8, 96, seed=3))
    ggml = GgmlMxfp4Codec()
    rows = ggml.join(*src.split(parts))["weight"]
    assert rows.dtype == torch.uint8 and rows.shape == (8, 96 // 32 * 17)
    # gguf-py reads the same numbers from our blocks
    values = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(values, src.decode(parts).numpy())
    # and the way back gives the source's bytes
    back = src.join(*ggml.split({"weight": rows}))
    assert set(back) == set(parts) and all(torch.equal(back[p], parts[p]) for p in parts)
    # the plan's op, on meta first (shapes) and then on the bytes
    sources = tuple((p, f"w.{p}") for p in parts)
    specs = recode_specs(src, ggml, {p: (tuple(t.shape), t.dtype) for p, t in parts.items()})
    op = Recode(sources, "g.", src, ggml, specs)
    moved = op.move(parts)
    assert torch.equal(moved["weight"], rows)
    assert torch.equal(op.inverse().move(moved)[src.required[0]], parts[src.required[0]])


def test_ggml_rows_are_copied_only_into_their_own_type() -> None:
    q8 = GgmlCodec(quant_type("Q8_0"))
    stored = q8.encode(weight(4, 64, seed=1))
    rows, marker, _ = GgmlCodec().split(stored)
    assert torch.equal(q8.join(rows, marker, None)["weight"], stored["weight"])
    with pytest.raises(MoeportError, match="GGML Q8_0 rows cannot be copied as Q4_0"):
        GgmlCodec(quant_type("Q4_0")).join(rows, marker, None)


def test_ggml_encode_leaves_nonfinite_to_the_caller_without_numpy_noise(recwarn) -> None:
    w = weight(4, 64)
    w[2, 5] = float("nan")
    GgmlCodec(quant_type("Q8_0")).encode(w)  # refused by convert.encode.refuse_nonfinite, naming it
    assert not [r for r in recwarn if issubclass(r.category, RuntimeWarning)]
