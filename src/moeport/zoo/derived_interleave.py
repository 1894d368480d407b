"""Hub expert stacks whose gate/up rows alternate (Inkling's `mlp.experts.w13_weight`).

transformers holds gate_up_proj as the gate rows then the up rows, and builds it on load from a hub
stack whose rows alternate gate, up, gate, up (an `Interleave` converter; GPT-OSS's hub stacks are
laid out the same way). That is a re-ordering moeport does itself (ExpertLayout.gate_up_interleaved,
mappings.ops Concat/Split), so such a converter is accepted, but only where it is exactly that: a
seeded stack run through transformers' own revert must come out byte for byte as moeport's
interleave of its gate and up halves. Any other converter stays refused, with its name.
"""

from __future__ import annotations

import torch

from moeport.codecs.format import ROWS
from moeport.mappings.ops import Concat
from moeport.mappings.values import realize
from moeport.zoo.derived_experts import NotDerivable


def interleaved_stacks(
    model_type: str, model, state: dict, hub_state: dict, missing: set[str]
) -> dict[str, str]:
    """In-memory gate_up keys of `missing` -> the hub key transformers saves them under, rows
    interleaved; NotDerivable naming the first key whose hub form is something else."""
    from transformers.core_model_loading import revert_weight_conversion

    new = {k for k, v in hub_state.items() if id(v) not in {id(t) for t in state.values()}}
    out: dict[str, str] = {}
    for key in sorted(missing):
        shape = tuple(state[key].shape)
        if not key.endswith("gate_up_proj") or len(shape) != 3 or shape[1] % 2:
            raise NotDerivable(f"{model_type}: transformers converts '{key}' (not a rename) on save")
        stack = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        try:
            saved = revert_weight_conversion(model, {key: stack})
        except Exception as e:  # transformers' own revert failing on a real tensor: its reason
            raise NotDerivable(f"{model_type}: transformers cannot revert '{key}' ({e})") from e
        if len(saved) != 1 or next(iter(saved)) not in new:
            raise NotDerivable(f"{model_type}: transformers saves '{key}' as {sorted(saved)}, not one stack")
        ((hub_key, hub_value),) = saved.items()
        if not torch.equal(hub_value, _interleave(stack)):
            why = f"saves '{key}' as '{hub_key}' converted otherwise than by interleaving gate/up rows"
            raise NotDerivable(f"{model_type}: transformers {why}")
        out[key] = hub_key
    return out


def _interleave(stack: torch.Tensor) -> torch.Tensor:
    """moeport's own interleave (the op its plans run) of a [E, 2I, H] stack's gate and up halves."""
    rows = stack.shape[1] // 2
    gate, up = stack[:, :rows], stack[:, rows:]
    op = Concat(("gate", "up"), "gate_up", ROWS, (rows, rows), interleave=True)
    return realize(op.apply({"gate": gate, "up": up})["gate_up"])
