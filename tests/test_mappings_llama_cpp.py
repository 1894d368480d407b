"""llama.cpp's re-arrangements (mappings/llama_cpp.py) invert exactly and match llama.cpp's formulas."""

from __future__ import annotations

import torch
from gguf_support import llama_permute

from moeport.mappings.llama_cpp import PermuteRows, SplitKvB
from moeport.mappings.values import Lazy, realize
from moeport.zoo.gguf_arch import rope_rows


def _value(t: torch.Tensor) -> Lazy:
    return Lazy(tuple(t.shape), t.dtype, produce=lambda: t)


def test_rope_permutation_is_llama_cpps_and_inverts() -> None:
    w = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    op = PermuteRows("q", "q#rope", tuple(rope_rows(32, 4).tolist()))
    permuted = realize(op.apply({"q": _value(w)})["q#rope"])
    assert torch.equal(permuted, llama_permute(w, 4))
    back = realize(op.inverse().apply({"q#rope": _value(permuted)})["q"])
    assert torch.equal(back, w)


def test_kv_b_split_is_llama_cpps_and_inverts() -> None:
    heads, nope, v_dim, lora = 4, 8, 16, 12
    kv_b = torch.randn(heads * (nope + v_dim), lora, generator=torch.Generator().manual_seed(1))
    op = SplitKvB("kv_b", ("k_b", "v_b"), heads, nope)
    out = op.apply({"kv_b": _value(kv_b)})
    k_b, v_b = realize(out["k_b"]), realize(out["v_b"])
    # DeepseekV2Model.modify_tensors (convert_hf_to_gguf.py): view, split at nope, k_b transposed
    ref_k, ref_v = torch.split(kv_b.view(heads, nope + v_dim, lora), [nope, v_dim], dim=1)
    assert torch.equal(k_b, ref_k.transpose(1, 2)) and torch.equal(v_b, ref_v)
    back = op.inverse().apply({"k_b": _value(k_b), "v_b": _value(v_b)})["kv_b"]
    assert torch.equal(realize(back), kv_b)
