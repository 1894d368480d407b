"""Flat expert stacks (DBRX's `ffn.experts.mlp.w1` [E * I, H]): the ops, and DBRX's experts as
per-expert linears checked against transformers' own DbrxExperts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import load_tensors
from test_zoo_derived import _assert_identical, _convert, _load, _save_tiny

from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.mappings.flat import Flatten, Unflatten
from moeport.mappings.values import Lazy, realize
from moeport.sources import open_checkpoint
from moeport.zoo.tiny import EXPERTS


def test_unflatten_is_a_view_and_flatten_its_inverse() -> None:
    flat = torch.randn(3 * 5, 4, generator=torch.Generator().manual_seed(0))
    op = Unflatten("w", "w#stack", 3)
    stack = realize(op.apply({"w": flat})["w#stack"])
    assert stack.shape == (3, 5, 4) and torch.equal(stack[1], flat[5:10])
    back = realize(op.inverse().apply({"w#stack": stack})["w"])
    assert torch.equal(back, flat)
    planned = op.apply({"w": Lazy((15, 4), torch.bfloat16, meta=True)})["w#stack"]
    assert planned.shape == (3, 5, 4) and planned.meta  # plans on meta like every op


def test_unflatten_refuses_rows_that_do_not_split_into_experts() -> None:
    with pytest.raises(MoeportError, match=r"^w1: shape \[14, 4\], expected \[3 \* N, K\]"):
        Unflatten("w1", "w1#stack", 3).apply({"w1": torch.randn(14, 4)})
    with pytest.raises(MoeportError, match=r"^s: shape \[2, 5, 4\], expected a stack of 3 experts"):
        Flatten("s", "s#flat", 3).apply({"s": torch.randn(2, 5, 4)})


def test_dbrx_experts_as_per_expert_linears_compute_what_transformers_computes(tmp_path: Path) -> None:
    """`--layout linear` gives per-expert w1 (gate), v1 (up), w2 (down, [H, I]: w2's rows
    e*I:(e+1)*I transposed) linears; each expert's SwiGLU on them equals transformers' DbrxExperts
    routing every token to that expert, and fusing the linears gives the Hub's parameters back."""
    src = _save_tiny("dbrx", tmp_path / "src")
    with open_checkpoint(src) as ck:
        det = detect(ck)
    assert det.family.name == "dbrx" and det.layout.flat and det.experts_per_layer == EXPERTS
    assert det.router_tensors == ["transformer.blocks.{L}.ffn.router.layer.weight"]
    linear = load_tensors(_convert(src, tmp_path / "linear", "hf", layout="linear"))
    model, _ = _load(src)
    experts = model.transformer.blocks[1].ffn.experts
    x = torch.randn(5, experts.hidden_size, generator=torch.Generator().manual_seed(3))
    for e in range(EXPERTS):
        with torch.no_grad():
            want = experts(x, torch.full((5, 1), e), torch.ones(5, 1)).reshape(5, -1)
        w1, v1, w2 = (
            linear[f"transformer.blocks.1.ffn.experts.mlp.{e}.{p}.weight"].float() for p in ("w1", "v1", "w2")
        )
        assert w2.shape == (experts.hidden_size, experts.ffn_hidden_size)
        torch.testing.assert_close((F.silu(x @ w1.T) * (x @ v1.T)) @ w2.T, want)
    back = _convert(tmp_path / "linear", tmp_path / "back", "hf", layout="hub")
    _assert_identical(load_tensors(src), load_tensors(back))
