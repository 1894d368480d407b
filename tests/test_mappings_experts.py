"""Expert re-layouts between fused forms that order gate and up otherwise: Step-3.7's separate gate
and up stacks, Inkling's interleaved rows. Each goes to transformers' gate_up_proj and back bit for
bit, companions (block scales) following their rows."""

from __future__ import annotations

import pytest
import torch

from moeport.codecs import Fp8BlockCodec
from moeport.detect.formats import ExpertFormat
from moeport.errors import MoeportError
from moeport.mappings.experts import LayerNames, Parts, relayout_experts
from moeport.mappings.values import realize
from moeport.zoo.families import FUSED_V5, ExpertLayout

GEN = torch.Generator().manual_seed(0)
E, INTER, H = 3, 32, 48
STEP3P7 = ExpertLayout(
    "fused", "moe", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, dotted=True
)
INKLING = ExpertLayout(
    "fused", "mlp", {"gate_up": "w13_weight", "down": "w2_weight"}, gate_up_interleaved=True
)
FLOAT = ExpertFormat("bf16", {})


def _relayout(values: dict[str, torch.Tensor], src, dst, fmt: ExpertFormat) -> dict[str, torch.Tensor]:
    """Run the ops taking every tensor of `values` (named as `src`) to `dst` names."""
    parts: Parts = {}
    for role in src.layout.fused_roles:
        stem = src.fused(role, "weight")
        parts[(-1, role)] = {
            "weight_scale_inv" if name != stem else "weight": name for name in values if name.startswith(stem)
        }
    ops = relayout_experts(
        parts, E, src, dst, fmt, lambda n: tuple(values[n].shape), lambda g: values[g["weight"]].shape[-2]
    )
    out: dict[str, torch.Tensor] = {}
    for op in ops:
        out |= {k: realize(v).clone() for k, v in op.apply({i: values[i] for i in op.inputs}).items()}
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), (
            name
        )


def test_separate_gate_and_up_stacks_join_with_their_block_scales_and_split_back() -> None:
    codec = Fp8BlockCodec(block=(16, 16))
    experts = [{r: codec.encode(torch.randn(n, k, generator=GEN)) for r, n, k in _shapes()} for _ in range(E)]
    hub = LayerNames(STEP3P7, "model.layers.1.")
    values = {
        hub.fused(role, part): torch.stack([x[role][part] for x in experts])
        for role in ("gate", "up", "down")
        for part in ("weight", "weight_scale_inv")
    }
    fmt = ExpertFormat("fp8-block", {"block": [16, 16], "scale": "weight_scale_inv"})
    fused = LayerNames(FUSED_V5, "model.layers.1.")
    out = _relayout(values, hub, fused, fmt)
    gate_up = {p: out[fused.fused("gate_up", p)][1] for p in ("weight", "weight_scale_inv")}
    want = torch.cat([codec.decode(experts[1]["gate"]), codec.decode(experts[1]["up"])])
    assert torch.equal(codec.decode(gate_up), want)  # expert 1's gate rows, then its up rows
    _assert_same(_relayout(out, fused, hub, fmt), values)


def _shapes() -> list[tuple[str, int, int]]:
    return [("gate", INTER, H), ("up", INTER, H), ("down", H, INTER)]


def test_interleaved_gate_up_rows_reorder_to_gate_then_up_and_back() -> None:
    hub = LayerNames(INKLING, "model.layers.0.")
    gate, up = torch.randn(E, INTER, H, generator=GEN), torch.randn(E, INTER, H, generator=GEN)
    values = {
        hub.fused("gate_up", "weight"): torch.stack([gate, up], dim=2)
        .flatten(1, 2)
        .bfloat16(),  # g0 u0 g1 u1..
        hub.fused("down", "weight"): torch.randn(E, H, INTER, generator=GEN).bfloat16(),
    }
    fused = LayerNames(FUSED_V5, "model.layers.0.")
    out = _relayout(values, hub, fused, FLOAT)
    assert torch.equal(out[fused.fused("gate_up", "weight")], torch.cat([gate, up], dim=1).bfloat16())
    assert torch.equal(out[fused.fused("down", "weight")], values[hub.fused("down", "weight")])
    _assert_same(_relayout(out, fused, hub, FLOAT), values)


def test_interleaving_block_scaled_rows_is_refused_in_one_line() -> None:
    codec = Fp8BlockCodec(block=(16, 16))
    fused = LayerNames(FUSED_V5, "model.layers.0.")
    stacks = {
        role: [codec.encode(torch.randn(n, H, generator=GEN)) for _ in range(E)]
        for role, n in (("gate_up", 2 * INTER), ("down", H))
    }
    values = {
        fused.fused(role, part): torch.stack([x[part] for x in stacks[role]])
        for role in stacks
        for part in ("weight", "weight_scale_inv")
    }
    fmt = ExpertFormat("fp8-block", {"block": [16, 16], "scale": "weight_scale_inv"})
    with pytest.raises(MoeportError, match="interleaved fusing needs equal, unpacked row counts"):
        _relayout(values, fused, LayerNames(INKLING, "model.layers.0."), fmt)


def test_per_expert_names_with_a_word_before_the_index() -> None:
    """Switch / NLLB-MoE spell expert 3 `experts.expert_3.` (switch-base-8, nllb-moe-54b): the
    layout's templates, its key regex and the per-expert names agree, biases are companions, and
    plain numbered names are not taken for it; verify groups the experts as peers."""
    from moeport.detect.layout import match_layout
    from moeport.verify.flags import role

    layout = ExpertLayout("per-expert", "ffn", {"up": "fc1", "down": "fc2"}, index_prefix="expert_")
    assert layout.templates("encoder.layers.{L}.") == [
        "encoder.layers.{L}.ffn.experts.expert_{E}.fc1.weight",
        "encoder.layers.{L}.ffn.experts.expert_{E}.fc2.weight",
    ]
    names = LayerNames(layout, "encoder.layers.3.")
    keys = [names.per_expert(e, r, p) for e in range(E) for r in layout.roles for p in ("weight", "bias")]
    assert keys[:2] == [
        "encoder.layers.3.ffn.experts.expert_0.fc1.weight",
        "encoder.layers.3.ffn.experts.expert_0.fc1.bias",
    ]
    found = match_layout([*keys, "encoder.layers.3.ffn.experts.0.fc1.weight"], layout, "encoder.layers.{L}.")
    assert found is not None and sorted(found.layers[3].keys) == sorted(keys)
    assert found.layers[3].experts == set(range(E))
    assert found.layers[3].parts[(2, "fc2")] == {"weight": keys[-2], "bias": keys[-1]}
    assert role(keys[-1]) == "encoder.layers.*.ffn.experts.*.fc2.bias"
