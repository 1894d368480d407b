"""Hub gate/up stacks that transformers converts into its gate_up_proj on load.

transformers holds gate_up_proj as each expert's gate rows then its up rows. Some hub checkpoints
store that otherwise, and transformers converts on load: Inkling's `mlp.experts.w13_weight` has the
rows alternating gate, up, gate, up (an `Interleave` converter; GPT-OSS's hub stacks are laid out
the same way), Step-3.7's `moe.gate_proj.weight` and `moe.up_proj.weight` are two stacks [E, I, H]
(a `Concatenate`). Both are re-orderings moeport does itself (ExpertLayout.gate_up_interleaved,
a fused layout with separate gate and up stacks; mappings.ops Concat/Split), so such a converter is
accepted, but only where it is exactly that: a seeded stack run through transformers' own revert
must come out byte for byte as moeport's interleave of its halves, or as the halves themselves.
Any other converter stays refused, naming the tensor.
"""

from __future__ import annotations

import torch

from moeport.codecs.format import ROWS
from moeport.errors import MoeportError
from moeport.mappings.ops import Concat
from moeport.mappings.values import realize

INTERLEAVED, SPLIT = "interleaved", "split"


def converted_gate_up(
    model_type: str, model, state: dict, hub_state: dict, missing: set[str]
) -> tuple[dict[str, dict[str, str]], str]:
    """In-memory gate_up keys of `missing` -> {role: hub key} ('gate_up' for an interleaved stack,
    'gate' and 'up' for separate stacks), and which of the two the hub does; MoeportError naming
    the first key whose hub form is something else."""
    from transformers.core_model_loading import revert_weight_conversion

    held = {id(t) for t in state.values()}
    new = {k for k, v in hub_state.items() if id(v) not in held}
    out: dict[str, dict[str, str]] = {}
    kinds: set[str] = set()
    for key in sorted(missing):
        shape = tuple(state[key].shape)
        if not key.endswith("gate_up_proj") or len(shape) != 3 or shape[1] % 2:
            raise MoeportError(f"{model_type}: transformers converts '{key}' (not a rename) on save")
        stack = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        try:
            saved = revert_weight_conversion(model, {key: stack})
        except Exception as e:  # transformers' own revert failing on a real tensor: its reason
            raise MoeportError(f"{model_type}: transformers cannot revert '{key}' ({e})") from e
        if not set(saved) <= new:
            raise MoeportError(f"{model_type}: transformers saves '{key}' as {sorted(saved)}")
        rows = shape[1] // 2
        gate, up = stack[:, :rows], stack[:, rows:]
        if len(saved) == 1 and torch.equal(next(iter(saved.values())), _interleave(gate, up)):
            out[key], how = {"gate_up": next(iter(saved))}, INTERLEAVED
        elif len(saved) == 2 and _halves(saved, gate, up):
            out[key], how = _halves(saved, gate, up), SPLIT
        else:
            why = f"saves '{key}' as {sorted(saved)}, neither its gate/up rows interleaved nor its halves"
            raise MoeportError(f"{model_type}: transformers {why}")
        kinds.add(how)
    if len(kinds) != 1:
        raise MoeportError(f"{model_type}: transformers saves gate_up_proj stacks both {' and '.join(kinds)}")
    return out, kinds.pop()


def _halves(saved: dict[str, torch.Tensor], gate: torch.Tensor, up: torch.Tensor) -> dict[str, str]:
    """{'gate': key, 'up': key} where the two saved tensors are the gate and up halves, else {}."""
    found = {}
    for name, value in saved.items():
        role = "gate" if torch.equal(value, gate) else "up" if torch.equal(value, up) else None
        if role is None or role in found:
            return {}
        found[role] = name
    return found


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """moeport's own interleave (the op its plans run) of a [E, 2I, H] stack's gate and up halves."""
    rows = gate.shape[1]
    op = Concat(("gate", "up"), "gate_up", ROWS, (rows, rows), interleave=True)
    return realize(op.apply({"gate": gate, "up": up})["gate_up"])
