"""How the routed experts of one MoE layer are named and stored: `ExpertLayout`, as data.

Kept apart from the zoo's families (zoo/families.py, which re-exports it) so that each module holds
one job: this one the naming rules that detection, the re-layout ops and derivation share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertLayout:
    """How routed experts of one MoE layer are named.

    per-expert: `{layer}{block}.experts.{E}.{proj}.<companion>` with one proj name per role
    (`experts.{index_prefix}{E}.`: Switch / NLLB-MoE spell the index `expert_{E}`); an expert
    that is one linear has one role, "down", named "" (VitPose+: `mlp.experts.{E}.weight`).
    fused: `{layer}{block}.experts.{gate_up}<suffix>` [E, 2I, H] and `{down}<suffix>` [E, H, I]
    (or one stack per role: `{gate}` and `{up}` [E, I, H], or `{up}` alone where not gated).
    `block` may be "" (experts directly in the layer: Mistral-Large-4's hub, Gemma-4) and
    `container` "" (stacks that are the block's own modules: Granite's `input_linear.weight`);
    `dotted` fused names are module parameters, `{gate_up}.weight`, companions `{gate_up}.<part>`.
    `groups` (fused only): modules of the block that each hold the stacks of one contiguous, equal
    range of the layer's experts, in order (ERNIE-4.5-VL: `mlp.text_moe.experts.gate_up_proj` for
    the hub's experts 0..E-1, `mlp.vision_moe.experts.gate_up_proj` for E..2E-1).
    """

    kind: str  # "per-expert" | "fused"
    block: str  # module holding experts/router: "mlp", "block_sparse_moe", "ffn", or ""
    projs: dict[str, str]  # per-expert: role -> proj name; fused: "gate_up"/"down" -> tensor name
    gate_up_interleaved: bool = False  # GPT-OSS: fused rows alternate gate, up
    transposed: bool = False  # GPT-OSS unquantized: [E, H, 2I] / [E, I, H]
    container: str = "experts"  # the module of the experts inside the block ("" : the block itself)
    dotted: bool = False  # fused tensors named `{name}.weight` (a module's parameter), not `{name}`
    flat: bool = False  # DBRX: each fused stack is one 2-D parameter [E * N, K], not [E, N, K]
    transposed_roles: tuple[str, ...] = ()  # stacks stored [E, K, N] alone (DBRX's down: w2)
    groups: tuple[str, ...] = ()  # fused: one module per contiguous expert range ("text_moe", ...)
    index_prefix: str = ""  # per-expert: the word before an expert's index ('expert_' in `experts.expert_3.`)

    def role_transposed(self, role: str) -> bool:
        """Whether the fused stack of `role` is stored [E, K, N] (transposed) rather than [E, N, K]."""
        return self.transposed or role in self.transposed_roles

    @property
    def gated(self) -> bool:
        """Gate and up projections (SwiGLU); False: up and down only (Nemotron-H's ReLU² experts)."""
        return "gate" in self.projs or "gate_up" in self.projs

    @property
    def roles(self) -> tuple[str, ...]:
        """The per-expert roles, in order: gate, up, down, or up, down for a non-gated MLP, or down
        alone for an expert that is one linear."""
        return ROLES if self.gated else ("down",) if self.one_linear else ("up", "down")

    @property
    def one_linear(self) -> bool:
        """Each expert is a single linear module, its tensors `experts.{E}.weight` (VitPose+)."""
        return tuple(self.projs.values()) == ("",)

    def proj_dot(self, role: str) -> str:
        """The projection's name with its dot ('wi.'), '' for an expert that is one linear."""
        return f"{self.projs[role]}." if self.projs[role] else ""

    @property
    def fused_roles(self) -> tuple[str, ...]:
        """The stacks of a fused layout, in order: gate_up, down; up, down for a non-gated MLP;
        gate, up, down where gate and up are stacked apart (Step-3.7's hub)."""
        return ("gate_up", "down") if "gate_up" in self.projs else tuple(r for r in ROLES if r in self.projs)

    @property
    def split_gate_up(self) -> bool:
        """A fused layout of gated experts whose gate and up are two stacks, not one gate_up."""
        return self.kind == "fused" and "gate" in self.projs

    @property
    def block_prefix(self) -> str:
        """The block's name relative to the layer, with its dot ('mlp.'), '' for the layer itself."""
        return f"{self.block}." if self.block else ""

    @property
    def base(self) -> str:
        """Where the expert tensors start, relative to the layer ('mlp.experts.')."""
        return self.block_prefix + (f"{self.container}." if self.container else "")

    def group(self, g: int) -> ExpertLayout:
        """The plain fused layout of expert group `g`: its module sits in the block like a block."""
        block = ".".join(p for p in (self.block, self.groups[g]) if p)
        return replace(self, block=block, groups=())

    @property
    def expert_base(self) -> str:
        """Where one per-expert module's name stops before its index ('mlp.experts.expert_')."""
        return self.base + self.index_prefix

    def templates(self, layer_prefix: str) -> list[str]:
        if self.groups:
            return [t for g in range(len(self.groups)) for t in self.group(g).templates(layer_prefix)]
        base = f"{layer_prefix}{self.base}"
        dot = ".weight" if self.dotted else ""
        if self.kind == "per-expert":
            return [f"{layer_prefix}{self.expert_base}{{E}}.{self.proj_dot(r)}weight" for r in self.roles]
        return [f"{base}{self.projs[r]}{dot}" for r in self.fused_roles]
