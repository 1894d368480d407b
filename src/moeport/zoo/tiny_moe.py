"""Config switches that give a tiny model at least one MoE layer.

Some configs put their dense layers first by default (Beam: three, Flint: `mlp_only_layers`
[0, 1]) or keep the MoE block off unless asked (Gemma-4's `enable_moe_block`, Doge's `is_moe`):
with the tiny models' two layers they build no expert at all. Only a config that would build
none is switched, so every other tiny model stays as it is.
"""

from __future__ import annotations

from typing import Any


def moe_switches(text: Any, per_token: int) -> dict[str, Any]:
    """Overrides for the text config `text` that turn its last layer into a MoE layer (routing
    `per_token` experts per token); {} when it has one already."""
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    out: dict[str, Any] = {}
    kinds = getattr(text, "mlp_layer_types", None)
    if isinstance(kinds, list) and kinds and set(kinds) == {"dense"}:
        out["mlp_layer_types"] = ["dense"] * (layers - 1) + ["sparse"]
    only = getattr(text, "mlp_only_layers", None)
    if isinstance(only, list) and layers and set(range(layers)) <= set(only):
        out["mlp_only_layers"] = list(range(layers - 1))
    if getattr(text, "enable_moe_block", None) is False:
        out |= {"enable_moe_block": True, "top_k_experts": per_token}
    if getattr(text, "is_moe", None) is False:
        out["is_moe"] = True
    return out
