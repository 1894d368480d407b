"""Input Hessians of one decoder layer's targeted Linears, accumulated from its calibration inputs.

Routed experts are fused 3-D parameters in transformers v5 (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`): a forward pre-hook on the experts module sees the hidden states and
the routing, so each expert's gate/up Hessian is built from the tokens routed to it (or, with
`all_experts`, from every token, as llmcompressor's MoE calibration does) and its down Hessian
from act(gate) * up of those tokens. Gate and up share one Hessian (same input); with
`all_experts` every expert shares it too. Other Linears (--targets all-linear) get a pre-hook each.
Memory: K x K float32 per distinct Hessian; a pass may take a subset of the experts (`experts`) so
that a layer's Hessians are built a chunk of experts at a time (an expert's inputs do not depend
on the other experts, so chunks give the same Hessians as one pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moeport.errors import MoeportError
from moeport.zoo.families import ExpertLayout


@dataclass
class Slot:
    """Where one output weight [N, K] lives in the layer module: param[index] (rows sliced)."""

    param: nn.Parameter
    index: tuple

    def get(self) -> torch.Tensor:
        return self.param.data[self.index]

    def set(self, w: torch.Tensor) -> None:
        self.param.data[self.index] = w.to(self.param.dtype)


@dataclass
class Accumulator:
    """sum of x x^T over n tokens; the GPTQ Hessian is 2/n times it."""

    sum: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2 / max(self.tokens, 1))


class LayerHessians:
    """The targeted weights of one layer (`wanted`, output names), their slots and Hessians."""

    def __init__(
        self,
        module: nn.Module,
        prefix: str,
        layout: ExpertLayout,
        wanted: set[str],
        all_experts: bool,
        experts: range | None = None,  # the experts this pass calibrates (None: all)
        linears: bool = True,  # whether this pass calibrates the other targeted Linears
    ):
        self.prefix, self.all_experts = prefix, all_experts
        self.slots: dict[str, Slot] = {}
        self.acc: dict[str, Accumulator] = {}
        self.covered: set[str] = set()  # the wanted weights this pass calibrates
        self.expert_names: list[dict[str, str]] = []
        self._hooks: list[tuple[nn.Module, object]] = []
        found = _experts_module(module)
        if found is not None:
            self._add_experts(found[1], layout)
            self._chunk = experts if experts is not None else range(len(self.expert_names))
            self.covered |= {n for e in self._chunk for n in self.expert_names[e].values()} & wanted
        for path, lin in module.named_modules():
            name = f"{prefix}{path}.weight"
            if isinstance(lin, nn.Linear) and name in wanted and name not in self.slots:
                self.slots[name] = Slot(lin.weight, (slice(None),))
                if linears:
                    self._hooks.append((lin, self._linear_hook(name)))
                    self.covered.add(name)
        missing = sorted(wanted - set(self.slots))
        if missing:
            raise MoeportError(f"{missing[0]}: no such weight in transformers' {type(module).__name__}")

    def _add_experts(self, mod: nn.Module, layout: ExpertLayout) -> None:
        gate_up, down = mod.gate_up_proj, mod.down_proj
        inter = down.shape[-1]
        base = f"{self.prefix}{layout.base}"
        for e in range(gate_up.shape[0]):
            names = {r: f"{base}{e}.{layout.projs[r]}.weight" for r in ("gate", "up", "down")}
            self.expert_names.append(names)
            self.slots[names["gate"]] = Slot(gate_up, (e, slice(0, inter)))
            self.slots[names["up"]] = Slot(gate_up, (e, slice(inter, 2 * inter)))
            self.slots[names["down"]] = Slot(down, (e,))
        self._experts = mod
        self._hooks.append((mod, self._experts_hook))

    def _accumulator(self, key: str, k: int, like: torch.Tensor) -> Accumulator:
        if key not in self.acc:
            self.acc[key] = Accumulator(torch.zeros(k, k, dtype=torch.float32, device=like.device))
        return self.acc[key]

    def _linear_hook(self, name: str):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["input"]
            self._accumulator(name, x.shape[-1], x).add(x.detach())

        return hook

    def _experts_hook(self, mod, args, kwargs):
        values = list(args) + [
            kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs
        ]
        hidden, index = values[0].detach(), values[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        if self.all_experts:
            self._accumulator("all", hidden.shape[-1], hidden).add(hidden)
        for e in self._chunk:
            names = self.expert_names[e]
            x = hidden if self.all_experts else hidden[(index == e).any(-1)]
            if x.shape[0] == 0:
                continue
            if not self.all_experts:
                self._accumulator(names["gate"], x.shape[-1], x).add(x)
            gate, up = nn.functional.linear(x.float(), mod.gate_up_proj[e].float()).chunk(2, dim=-1)
            h = mod.act_fn(gate) * up
            self._accumulator(names["down"], h.shape[-1], h).add(h)

    def hessian_of(self, name: str) -> tuple[torch.Tensor | None, int]:
        """(H, tokens) of an output weight; (None, 0) when no calibration token reached it."""
        key = name
        for names in self.expert_names:
            if name in (names["gate"], names["up"]):
                key = "all" if self.all_experts else names["gate"]
        acc = self.acc.get(key)
        return (None, 0) if acc is None else (acc.hessian(), acc.tokens)

    def release(self) -> None:
        """Drop the Hessians, slots and hooks now. The hooks are bound methods of this object, a
        reference cycle: without this, `del` leaves a whole float32 layer (the slots' parameters)
        and its Hessians alive until Python's cycle collector runs, i.e. sometimes two layers at
        once (measured: the peak then varied by a layer from one layer to the next)."""
        self._hooks.clear()
        self.slots.clear()
        self.acc.clear()
        self.__dict__.pop("_experts", None)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(h, with_kwargs=True) for m, h in self._hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def expert_count(module: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a layer's fused routed experts; (0, 0, 0) in a dense layer."""
    found = _experts_module(module)
    if found is None:
        return 0, 0, 0
    e, hidden, inter = found[1].down_proj.shape
    return e, hidden, inter


def _experts_module(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The fused routed-experts module of a layer (None in a dense layer)."""
    for path, mod in module.named_modules():
        gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3:
            if getattr(mod, "is_transposed", False) or getattr(mod, "has_bias", False):
                raise MoeportError(
                    f"{type(mod).__name__}: transposed or biased experts (GPT-OSS) are not supported by "
                    "--method gptq yet; use the RTN default"
                )
            return path, mod
    return None
