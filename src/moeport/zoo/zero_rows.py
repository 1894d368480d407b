"""Whether the installed transformers' fused gate_up stack holds a family's zero-compute experts.

LongCat-Flash routes to Z identity experts that have no weights. transformers 5.24 allocates its
`gate_up_proj` as [E + Z, 2I, H] anyway (the Z rows never read); 5.25 allocates [E, 2I, H], as the
Hub stores the experts. The fused layout moeport writes is the one the installed transformers
loads, so it is read off transformers' own class on `meta` rather than assumed from a version.
"""

from __future__ import annotations

from functools import cache

from moeport.errors import MoeportError
from moeport.zoo.tiny import build_model, tiny_config


@cache
def fused_holds_zero_experts(model_type: str) -> bool:
    """True where transformers' fused `gate_up_proj` of `model_type` has more rows than its
    `down_proj` (the zero-compute experts' rows after the routed ones); False where they agree.
    A model type the installed transformers cannot build keeps the 5.24 form (True)."""
    try:
        state = build_model(tiny_config(model_type), "meta").state_dict()
    except MoeportError:
        return True
    rows = {}
    for key, value in state.items():
        for name in ("gate_up_proj", "down_proj"):
            if key.endswith(f"experts.{name}"):
                rows.setdefault(name, value.shape[0])
    return len(rows) == 2 and rows["gate_up_proj"] > rows["down_proj"]
