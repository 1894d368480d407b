"""The zoo: the MoE families transformers does not describe, or describes otherwise than their
checkpoints, as data. Every other MoE model type is derived from transformers (zoo/derived.py);
each entry says in `zoo_because` what transformers lacks or gets wrong for it.

Templates use `{L}` for the layer index and `{E}` for the expert index. Facts were checked against
the model classes of transformers 5.x (tiny models saved with `save_pretrained`, which writes the hub
layout, and with `save_original_format=False`, which writes transformers' fused layout); the tests
re-check every entry against the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeport.zoo.expert_layout import ROLES, ExpertLayout  # noqa: F401 (re-exported)

HUB_MLP = ExpertLayout("per-expert", "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
FUSED_V5 = ExpertLayout("fused", "mlp", {"gate_up": "gate_up_proj", "down": "down_proj"})
# GPT-OSS has one layout only: fused, gate/up interleaved; its hub form is what transformers holds.
GPT_OSS_EXPERTS = ExpertLayout(
    "fused",
    "mlp",
    {"gate_up": "gate_up_proj", "down": "down_proj"},
    gate_up_interleaved=True,
    transposed=True,
)

# DBRX (transformers == the Hub, databricks/dbrx-instruct): w1 (gate), v1 (up) [E * I, H] and w2
# [E * I, H], expert e's down_proj being w2[e*I:(e+1)*I].T (DbrxExpertGLU: `x @ w2`).
DBRX_EXPERTS = ExpertLayout(
    "fused",
    "ffn",
    {"gate": "w1", "up": "v1", "down": "w2"},
    container="experts.mlp",
    flat=True,
    transposed_roles=("down",),
)

# Doge: one embedding row per expert and role, names as transformers saves them (no conversion).
DOGE_EXPERTS = ExpertLayout(
    "fused", "mlp", {"up": "down_embed", "down": "up_embed"}, container="", dotted=True
)


@dataclass(frozen=True)
class ConfigFields:
    """Config keys to try, in order, for each fact (families disagree on names)."""

    num_experts: tuple[str, ...] = ("n_routed_experts", "num_experts", "num_local_experts")
    experts_per_token: tuple[str, ...] = ("num_experts_per_tok", "experts_per_token")
    hidden_size: tuple[str, ...] = ("hidden_size",)
    expert_intermediate: tuple[str, ...] = ("moe_intermediate_size",)
    num_layers: tuple[str, ...] = ("num_hidden_layers",)
    first_dense: tuple[str, ...] = ("first_k_dense_replace",)
    mtp_layers: tuple[str, ...] = ("num_nextn_predict_layers",)
    shared_experts: tuple[str, ...] = ("n_shared_experts",)
    # identity experts with no weights on the Hub, whose gate/up rows transformers' gate_up_proj
    # holds after the routed ones (LongCat-Flash: see detect/zero_experts.py)
    zero_experts: tuple[str, ...] = ()


QWEN_FIELDS = ConfigFields(
    num_experts=("num_experts",),
    first_dense=(),
    mtp_layers=("num_mtp_layers",),
    shared_experts=("shared_expert_intermediate_size",),
)

# no first dense layers, MTP layers or shared experts in the config (they may exist all the same)
NO_EXTRA_BLOCKS: dict[str, tuple[str, ...]] = {"first_dense": (), "mtp_layers": (), "shared_experts": ()}


@dataclass(frozen=True)
class StorageField:
    """A config.json field that states how the routed experts are stored (DeepSeek-V4's
    `expert_dtype`), at the top, in text_config or in quantization_config. An output whose experts
    are stored otherwise gets the value for its expert codec, or loses the field when none fits."""

    name: str
    values: tuple[tuple[str, str], ...]  # (codec name of the output experts, config value)


@dataclass(frozen=True)
class Stack:
    """Another stack of layers with routed experts, stored apart from the family's main one in
    the same checkpoint (Qwen3-Omni's talker beside its thinker, an encoder's layers beside the
    decoder's), in the main stack's expert layout. Its layers are numbered after those before it
    (detect.layout.LayerNaming), so every consumer of layer numbers treats it as more layers."""

    prefixes: tuple[str, ...]  # its layer prefixes with {L}: the hub's, then transformers' memory names
    config: str = ""  # dotted path in config.json of the text config with its sizes ('': the main one's)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_types: tuple[str, ...]
    hub: ExpertLayout
    fused: ExpertLayout = FUSED_V5
    layer_prefixes: tuple[str, ...] = ("model.layers.{L}.",)
    # MTP layers stored apart from the decoder layers (numbered after them; see detect.layout)
    mtp_prefixes: tuple[str, ...] = ()
    router: tuple[str, ...] = ("gate.weight",)  # relative to the block
    router_bias: tuple[str, ...] = ()
    shared_expert: str | None = None  # sub-module name of shared experts, relative to the block
    fields: ConfigFields = field(default_factory=ConfigFields)
    # Non-expert key renames from the hub layout to transformers' fused layout: pairs of dotted
    # fragments matched on whole segments (see mappings.rename); the reverse direction swaps them.
    fused_renames: tuple[tuple[str, str], ...] = ()
    # Other hub spellings of a non-expert tensor, as (variant, spelling fused_renames start from):
    # applied on the way to the fused layout and in verify's canonical names; a hub -> hub
    # conversion keeps the source's spelling (its loaders expect it).
    hub_aliases: tuple[tuple[str, str], ...] = ()
    storage_fields: tuple[StorageField, ...] = ()
    # Per-expert 2-D linears of a family whose only public layout is fused (GPT-OSS): what targets
    # that quantize weight by weight write (llmcompressor's linearised experts), biases beside them.
    linear: ExpertLayout | None = None
    # Why the routed experts are no linear layers (Doge's embedding rows), else "": targets that
    # quantize or repack expert linears (kt, w4a16's default --targets experts) refuse with it.
    not_linear: str = ""
    # What transformers' own definitions lack or get wrong for this family: why it is zoo data
    # instead of derived (empty for derived families).
    zoo_because: str = ""
    # Further expert stacks under other layer prefixes (detect/stacks.py), numbered after the main
    # layers; `config` is the dotted path of the main stack's text config where it is nested
    # deeper than `text_config` (Qwen3-Omni: `thinker_config.text_config`).
    stacks: tuple[Stack, ...] = ()
    config: str = ""
    # Whether a wrapper's checkpoint whose text model is of this type is read with this family
    # (Kimi-K2.5 around DeepSeek-V3); False where transformers derives the wrapper itself (Step-3.7).
    read_in_wrappers: bool = True
    # Why this is a generic family (detect/generic.py: a model_type transformers does not know,
    # experts named as a reference family's), else "": no fused layout and no calibration.
    generic: str = ""

    @property
    def per_expert(self) -> ExpertLayout:
        """The per-expert layout: the hub names, or `linear` where the hub layout is fused."""
        return self.linear or self.hub

    @property
    def layouts(self) -> tuple[ExpertLayout, ...]:
        found = (self.hub,) if self.hub == self.fused else (self.hub, self.fused)
        return found + ((self.linear,) if self.linear is not None and self.linear not in found else ())


# Step-3.5-Flash (stepfun-ai/Step-3.5-Flash, model_type `step3p5`): per MoE layer one stack per
# projection under `moe.` (`moe.gate_proj.weight` / `up_proj` [E, I, H], `down_proj` [E, H, I]), the
# router `moe.gate.weight` [E, H] and `moe.router_bias` [E], the shared expert as `share_expert.`.
# transformers' Step3p7 text model (model_type `step3p5`) holds them as its fused `mlp.experts`; the
# renames are its `step3p7` conversion mapping's (tests check both against transformers).
STEP3P5_HUB = ExpertLayout(
    "fused", "moe", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, container="", dotted=True
)
STEP3P5_RENAMES: tuple[tuple[str, str], ...] = (
    ("moe.gate", "mlp.gate"),
    ("moe.router_bias", "mlp.gate.e_score_correction_bias"),
    ("share_expert", "mlp.shared_experts"),
)

# DeepSeek-V4's reference names vs transformers' (checked against transformers' own save, both ways).
DSV4_RENAMES: tuple[tuple[str, str], ...] = (
    ("^head", "lm_head"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("hc_attn_fn", "attn_hc.fn"),
    ("hc_attn_base", "attn_hc.base"),
    ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"),
    ("hc_ffn_base", "ffn_hc.base"),
    ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn", "self_attn"),
    ("attn.attn_sink", "self_attn.sinks"),
    ("attn.norm", "self_attn.kv_norm"),
    ("compressor.norm", "compressor.kv_norm"),
    ("compressor.ape", "compressor.position_bias"),
    ("wq_a", "q_a_proj"),
    ("wq_b", "q_b_proj"),
    ("wkv", "kv_proj"),
    ("wgate", "gate_proj"),
    ("wo_a", "o_a_proj"),
    ("wo_b", "o_b_proj"),
    ("q_norm", "q_a_norm"),
    ("ffn", "mlp"),
    ("gate.bias", "gate.e_score_correction_bias"),
    ("shared_experts.w1", "shared_experts.gate_proj"),
    ("shared_experts.w2", "shared_experts.down_proj"),
    ("shared_experts.w3", "shared_experts.up_proj"),
)

FAMILIES: tuple[Family, ...] = (
    Family(
        "deepseek_v3",
        "DeepSeek-V2/V3/R1/V3.1/V3.2, Kimi-K2",
        ("deepseek_v3", "deepseek_v32", "deepseek_v2", "kimi_k2"),
        hub=HUB_MLP,
        router_bias=("gate.e_score_correction_bias",),
        shared_expert="shared_experts",
        zoo_because="`kimi_k2` is no transformers model_type (Kimi-K2 ships DeepSeek-V3's classes); "
        "GGUF's deepseek2 table and kt know the four model types as this one family",
    ),
    Family(
        "deepseek_v4",
        "DeepSeek-V4",
        ("deepseek_v4",),
        hub=ExpertLayout("per-expert", "ffn", {"gate": "w1", "up": "w3", "down": "w2"}),
        layer_prefixes=("layers.{L}.", "model.layers.{L}."),
        mtp_prefixes=("mtp.{L}.",),
        router_bias=("gate.bias", "gate.tid2eid"),
        shared_expert="shared_experts",
        fields=ConfigFields(first_dense=()),
        fused_renames=DSV4_RENAMES,
        # the public checkpoints' attention KV norm; transformers saves it as `attn.norm`
        hub_aliases=(("attn.kv_norm", "attn.norm"),),
        storage_fields=(StorageField("expert_dtype", (("mxfp4-deepseek-v4", "fp4"), ("fp8-block", "fp8"))),),
        zoo_because="the public checkpoints' names (`layers.{L}.`, `attn.kv_norm`, MTP `mtp.{L}.`) and "
        "`expert_dtype`, which transformers' DeepSeek-V4 neither saves nor reads",
    ),
    Family(
        "qwen3_next",
        "Qwen3-Next",
        ("qwen3_next",),
        hub=HUB_MLP,
        mtp_prefixes=("mtp.layers.{L}.",),
        shared_expert="shared_expert",
        fields=QWEN_FIELDS,
        zoo_because="its MTP layer is stored apart (`mtp.layers.{L}.`), and transformers' model holds none",
    ),
    Family(
        "qwen3_5_moe",
        "Qwen3.5-MoE",
        ("qwen3_5_moe", "qwen3_5_moe_text"),
        hub=HUB_MLP,
        layer_prefixes=("model.language_model.layers.{L}.", "model.layers.{L}."),
        mtp_prefixes=("mtp.layers.{L}.",),
        shared_expert="shared_expert",
        fields=QWEN_FIELDS,
        zoo_because="its MTP layer is stored apart (`mtp.layers.{L}.`), and transformers' model holds none",
    ),
    Family(
        "step3p5",
        "Step-3.5-Flash",
        ("step3p5",),
        hub=STEP3P5_HUB,
        # the Hub's names; `layers.{L}.`: what transformers' own Step3p7TextModel saves
        layer_prefixes=("model.layers.{L}.", "layers.{L}."),
        router_bias=("gate.e_score_correction_bias", "router_bias"),
        shared_expert="shared_experts",
        fields=ConfigFields(
            num_experts=("moe_num_experts", "n_routed_experts", "num_local_experts"),
            experts_per_token=("moe_top_k", "num_experts_per_tok"),
            first_dense=(),
            shared_experts=(),
        ),
        fused_renames=STEP3P5_RENAMES,
        linear=ExpertLayout("per-expert", "moe", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
        read_in_wrappers=False,  # Step-3.7 (`step3p7`): derived from transformers' own mapping
        zoo_because="transformers maps Step-3.5-Flash's hub names (`moe.gate_proj.weight` stacks, "
        "`moe.router_bias`, `share_expert.`) for `step3p7` only; its `step3p5` text model has no mapping",
    ),
    Family(
        "gpt_oss",
        "GPT-OSS",
        ("gpt_oss",),
        hub=GPT_OSS_EXPERTS,
        fused=GPT_OSS_EXPERTS,
        linear=HUB_MLP,
        router=("router.weight",),
        router_bias=("router.bias",),
        fields=ConfigFields(
            num_experts=("num_local_experts",),
            expert_intermediate=("intermediate_size",),
            first_dense=(),
            mtp_layers=(),
            shared_experts=(),
        ),
        zoo_because="gate/up rows interleaved, expert biases and MXFP4 `_blocks`/`_scales`: its hub "
        "form is the fused stacks, which derivation does not take",
    ),
    Family(
        "dbrx",
        "DBRX",
        ("dbrx",),
        hub=DBRX_EXPERTS,
        fused=DBRX_EXPERTS,
        # AutoGPTQ's per-expert DBRX names (`ffn.experts.mlp.{E}.w1`): the linears targets quantize
        linear=ExpertLayout("per-expert", "ffn", DBRX_EXPERTS.projs, container="experts.mlp"),
        layer_prefixes=("transformer.blocks.{L}.",),
        router=("router.layer.weight",),
        fields=ConfigFields(
            num_experts=("ffn_config.moe_num_experts",),
            experts_per_token=("ffn_config.moe_top_k",),
            hidden_size=("d_model",),
            expert_intermediate=("ffn_config.ffn_hidden_size",),
            num_layers=("n_layers",),
            **NO_EXTRA_BLOCKS,
        ),
        zoo_because="its experts are 2-D parameters [E * I, H] per role (down stored transposed), "
        "nested config fields (`ffn_config`), and transformers has no per-expert form of them",
    ),
    Family(
        "longcat_flash",
        "LongCat-Flash",
        ("longcat_flash",),
        hub=HUB_MLP,
        # its one MTP layer (dense: one attention, `transformer_layer.mlp`, no routed experts; names
        # as vLLM's longcat_flash_mtp.py and SGLang's longcat_flash_nextn.py load them), beside
        # `model.mtp.embed_tokens` / `model.mtp.norm`; transformers ignores `model.mtp.*` on load
        mtp_prefixes=("model.mtp.layers.{L}.",),
        router=("router.classifier.weight",),  # [E + Z, H]: zero-compute experts are routed too
        router_bias=("router.e_score_correction_bias",),
        fields=ConfigFields(
            experts_per_token=("moe_topk",),
            expert_intermediate=("expert_ffn_hidden_size",),
            num_layers=("num_layers",),
            zero_experts=("zero_expert_num",),
            first_dense=(),
            shared_experts=(),  # its `mlps.0/1` are dense MLPs of every layer, not shared experts
        ),
        zoo_because="zero-compute experts: meituan-longcat/LongCat-Flash-Chat stores the E routed "
        "experts only, transformers' gate_up_proj holds E + Z (the Z never read) and its save writes them; "
        "its MTP layer is stored apart (`model.mtp.layers.{L}.`), and transformers' model holds none",
    ),
    Family(
        "doge",
        "Doge (routed experts: embedding rows)",
        ("doge",),
        # DogeCDMoE: expert e computes act(down_embed[e] . x) * up_embed[e], a rank-1 MLP whose input
        # row is `down_embed` (the up role: [E, 1 * H]) and output column `up_embed` (down, stored [E, H])
        hub=DOGE_EXPERTS,
        fused=DOGE_EXPERTS,
        router=("router_gate.weight",),  # product keys: [2 * sqrt(E), H], not [E, H]
        fields=ConfigFields(num_experts=("num_experts",), expert_intermediate=(), **NO_EXTRA_BLOCKS),
        not_linear="routed experts are embedding rows (`mlp.down_embed`/`mlp.up_embed` [E, H]: rank-1, "
        "product-key routed), not linear layers; they stay as stored (BF16)",
        zoo_because="its experts are two nn.Embedding tables read by DogeCDMoE's forward, which of them "
        "is the input row only the forward says; no stacks, no conversion mapping",
    ),
)

# Where multimodal checkpoints keep their language model (Kimi-K2.5 `language_model.model.`,
# Qwen3-VL / Llama-4 in transformers `model.language_model.`): a family's layer prefixes under these
# are tried when its own find nothing; vision towers and projectors are other tensors, carried.
WRAPPERS = (("model.", "language_model.model."), ("model.", "model.language_model."), ("", "language_model."))
WRAPPERS += (("", "backbone."),)  # a vision task model around its backbone (VitPoseForPoseEstimation)


def wrapped_prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The layer prefixes a multimodal wrapper gives the text model's `prefixes`."""
    out = [w + p.removeprefix(head) for p in prefixes for head, w in WRAPPERS if p.startswith(head)]
    return tuple(dict.fromkeys(p for p in out if p not in prefixes))


# model_type values of public checkpoints' own (remote-code) configs that transformers calls
# otherwise: derived as the transformers type whose conversion mapping loads their tensor names.
HUB_MODEL_TYPES = {
    "ernie4_5_moe_vl": "ernie4_5_vl_moe",  # baidu/ERNIE-4.5-VL-*-PT's config.json (flat, lists per group)
}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES for mt in f.model_types}


def family_for_model_type(model_type: str) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type)


def known_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)
