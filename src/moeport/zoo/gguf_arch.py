"""llama.cpp architectures as data: GGUF tensor names <-> hub names, GGUF keys <-> config.json.

One table per `general.architecture`, used in both directions: a GGUF source presents its tensors
under the family's hub names (so detection, every recipe and verify work unchanged), and `--to
gguf` writes the hub names back under llama.cpp's. Names follow gguf-py's `tensor_mapping.py`
(tests check our hub -> GGUF names against `gguf.get_tensor_name_map`); the hyper-parameter keys
are those llama.cpp's `convert_hf_to_gguf.py` writes for the family (`{arch}.` prefix omitted).

Expert stacks `blk.{L}.ffn_{gate,up,down}_exps` are [E, N, K] (each expert an nn.Linear weight);
their hub template carries `{E}`. llama.cpp's `llama` arch (Mixtral) stores q/k rows permuted for
its RoPE (`permute_qk`): the source undoes it, the target applies it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from moeport.errors import MoeportError

Pairs = tuple[tuple[str, str], ...]

# Both sides spelled without the `.weight` / `.bias` suffix, which is carried over as it is.
_ATTENTION: Pairs = (
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
    ("blk.{L}.attn_norm", "model.layers.{L}.input_layernorm"),
    ("blk.{L}.attn_q", "model.layers.{L}.self_attn.q_proj"),
    ("blk.{L}.attn_k", "model.layers.{L}.self_attn.k_proj"),
    ("blk.{L}.attn_v", "model.layers.{L}.self_attn.v_proj"),
    ("blk.{L}.attn_output", "model.layers.{L}.self_attn.o_proj"),
    ("blk.{L}.ffn_norm", "model.layers.{L}.post_attention_layernorm"),
)
_MLP_EXPERTS: Pairs = (
    ("blk.{L}.ffn_gate_inp", "model.layers.{L}.mlp.gate"),
    ("blk.{L}.ffn_gate_exps", "model.layers.{L}.mlp.experts.{E}.gate_proj"),
    ("blk.{L}.ffn_up_exps", "model.layers.{L}.mlp.experts.{E}.up_proj"),
    ("blk.{L}.ffn_down_exps", "model.layers.{L}.mlp.experts.{E}.down_proj"),
    ("blk.{L}.ffn_gate", "model.layers.{L}.mlp.gate_proj"),
    ("blk.{L}.ffn_up", "model.layers.{L}.mlp.up_proj"),
    ("blk.{L}.ffn_down", "model.layers.{L}.mlp.down_proj"),
)
# (config.json field, GGUF key without the `{arch}.` prefix)
_HPARAMS: Pairs = (
    ("num_hidden_layers", "block_count"),
    ("max_position_embeddings", "context_length"),
    ("hidden_size", "embedding_length"),
    ("intermediate_size", "feed_forward_length"),
    ("num_attention_heads", "attention.head_count"),
    ("num_key_value_heads", "attention.head_count_kv"),
    ("rope_theta", "rope.freq_base"),
    ("rms_norm_eps", "attention.layer_norm_rms_epsilon"),
    ("num_experts_per_tok", "expert_used_count"),
)


@dataclass(frozen=True)
class GgufArch:
    """One llama.cpp architecture: its tensor and key names, and the config.json it stands for."""

    arch: str  # general.architecture
    model_type: str  # config.json model_type of the family it holds
    architectures: str  # config.json architectures[0]
    tensors: Pairs  # (GGUF name, hub name) templates with {L} (block) and {E} (expert)
    hparams: Pairs  # (config field, GGUF key suffix)
    experts_field: str  # the config field of the routed expert count (`{arch}.expert_count`)
    permute_qk: bool = False
    # config.json fields a GGUF does not state, as llama.cpp runs the arch (qwen3moe always
    # renormalises its top-k weights)
    config_defaults: tuple[tuple[str, Any], ...] = ()
    # keys and config fields that are not one field for one key (DeepSeek's MLA sizes)
    derive_keys: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    derive_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    mla: bool = False  # kv_b_proj is stored split in k_b (transposed) and v_b, as llama.cpp wants it

    @cached_property
    def _to_hub(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(g), h) for g, h in self.tensors]

    @cached_property
    def _to_gguf(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(h), g) for g, h in self.tensors]

    def permuted_heads(self, hub: str, heads: tuple[int, int]) -> int:
        """Heads of a q/k weight whose rows llama.cpp permutes for this arch (0: not permuted)."""
        if self.permute_qk and hub.endswith("self_attn.q_proj.weight"):
            return heads[0]
        if self.permute_qk and hub.endswith("self_attn.k_proj.weight"):
            return heads[1]
        return 0

    def hub_name(self, gguf_name: str) -> tuple[str, bool]:
        """The hub template of a GGUF tensor name ({E} left in for expert stacks) and whether it
        is a stack of experts. Unknown names are refused: a silently dropped tensor breaks a model."""
        name, expert, stacked = _translate(gguf_name, self._to_hub, f"{self.arch} GGUF tensor")
        return name, stacked

    def gguf_name(self, hub_name: str) -> tuple[str, int | None]:
        """The GGUF name of a hub tensor (a per-expert name gives its stack's) and the expert index."""
        name, expert, _ = _translate(hub_name, self._to_gguf, f"{self.arch} tensor")
        return name, expert


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py) as a row order: row r of the GGUF
    q/k weight is row `order[r]` of the hub one (each head's two rotary halves interleaved)."""
    if heads <= 0 or rows % (2 * heads):
        raise MoeportError(f"cannot permute {rows} q/k rows for {heads} heads (llama.cpp's RoPE layout)")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def split_kv_b(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's kv_b_proj [heads * (nope + v), lora] -> k_b [heads, lora, nope] (transposed for the
    absorbed product) and v_b [heads, v, lora], as llama.cpp's DeepseekV2Model writes them."""
    per = kv_b.view(heads, kv_b.shape[0] // heads, kv_b.shape[-1])
    return per[:, :nope].transpose(1, 2).contiguous(), per[:, nope:].contiguous()


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """The inverse of `split_kv_b`."""
    merged = torch.cat([k_b.transpose(1, 2), v_b], dim=1)
    return merged.reshape(-1, merged.shape[-1])


def _mla_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2/V3's MLA as llama.cpp's converter states it (absorbed: one KV head of
    kv_lora_rank + rope dims)."""
    lora, rope, nope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"]
    keys: dict[str, Any] = {
        "attention.head_count_kv": 1,
        "attention.key_length": lora + rope,
        "attention.value_length": lora,
        "attention.key_length_mla": nope + rope,
        "expert_gating_func": 2,  # sigmoid (DeepSeek-V3, Kimi-K2)
    }
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and "factor" in scaling:
        keys["rope.scaling.type"] = "yarn"
        keys["rope.scaling.factor"] = float(scaling["factor"])
        keys["rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
        keys["rope.scaling.yarn_log_multiplier"] = 0.1 * float(scaling.get("mscale_all_dim", 0.0))
    return keys


def _yarn_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """YaRN context extension (GPT-OSS: factor 32 over 4096), as TextModel's converter states it."""
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "yarn" or "factor" not in scaling:
        return {}
    keys: dict[str, Any] = {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": float(scaling["factor"]),
        "rope.scaling.original_context_length": int(scaling["original_max_position_embeddings"]),
    }
    for field, key in (
        ("beta_fast", "rope.scaling.yarn_beta_fast"),
        ("beta_slow", "rope.scaling.yarn_beta_slow"),
    ):
        if field in scaling:
            keys[key] = float(scaling[field])
    return keys


def _yarn_config(kv: dict[str, Any]) -> dict[str, Any]:
    if kv.get("rope.scaling.type") != "yarn":
        return {}
    scaling = {
        "rope_type": "yarn",
        "factor": kv["rope.scaling.factor"],
        "original_max_position_embeddings": kv["rope.scaling.original_context_length"],
        "truncate": False,  # GPT-OSS's own config (transformers' default would truncate)
    }
    for field, key in (
        ("beta_fast", "rope.scaling.yarn_beta_fast"),
        ("beta_slow", "rope.scaling.yarn_beta_slow"),
    ):
        if key in kv:
            scaling[field] = kv[key]
    return {"rope_scaling": scaling}


def _mla_config(kv: dict[str, Any]) -> dict[str, Any]:
    heads, rope = kv["attention.head_count"], kv["rope.dimension_count"]
    cfg: dict[str, Any] = {
        "num_key_value_heads": heads,
        "qk_nope_head_dim": kv["attention.key_length_mla"] - rope,
        "head_dim": rope,
    }
    if kv.get("rope.scaling.type") == "yarn":
        cfg["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": kv["rope.scaling.factor"],
            "original_max_position_embeddings": kv["rope.scaling.original_context_length"],
            "mscale_all_dim": kv.get("rope.scaling.yarn_log_multiplier", 0.0) / 0.1,
        }
    return cfg


def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(body + r"(?P<suffix>\.weight|\.bias|)$")


def _translate(
    name: str, table: list[tuple[re.Pattern[str], str]], what: str
) -> tuple[str, int | None, bool]:
    """(the other side's name, the expert index in `name` if any, whether it names a stack)."""
    for pattern, other in table:
        m = pattern.match(name)
        if m is None:
            continue
        groups = m.groupdict()
        out = other.replace("{L}", groups["L"]) if groups.get("L") is not None else other
        expert = int(groups["E"]) if groups.get("E") is not None else None
        return out + m["suffix"], expert, "{E}" in other
    raise MoeportError(f"{name}: not a {what} moeport knows (no entry in zoo/gguf_arch.py)")


ARCHS: dict[str, GgufArch] = {
    a.arch: a
    for a in (
        GgufArch(
            "qwen3moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            (
                *_ATTENTION,
                ("blk.{L}.attn_q_norm", "model.layers.{L}.self_attn.q_norm"),
                ("blk.{L}.attn_k_norm", "model.layers.{L}.self_attn.k_norm"),
                *_MLP_EXPERTS,
            ),
            (
                *_HPARAMS,
                ("moe_intermediate_size", "expert_feed_forward_length"),
                ("head_dim", "attention.key_length"),
                ("head_dim", "attention.value_length"),
            ),
            "num_experts",
            config_defaults=(("norm_topk_prob", True),),
        ),
        GgufArch(
            "qwen2moe",
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            (
                *_ATTENTION,
                *_MLP_EXPERTS,
                ("blk.{L}.ffn_gate_inp_shexp", "model.layers.{L}.mlp.shared_expert_gate"),
                ("blk.{L}.ffn_gate_shexp", "model.layers.{L}.mlp.shared_expert.gate_proj"),
                ("blk.{L}.ffn_up_shexp", "model.layers.{L}.mlp.shared_expert.up_proj"),
                ("blk.{L}.ffn_down_shexp", "model.layers.{L}.mlp.shared_expert.down_proj"),
            ),
            (
                *_HPARAMS,
                ("moe_intermediate_size", "expert_feed_forward_length"),
                ("shared_expert_intermediate_size", "expert_shared_feed_forward_length"),
            ),
            "num_experts",
        ),
        GgufArch(
            "llama",  # Mixtral: llama.cpp's llama arch with experts
            "mixtral",
            "MixtralForCausalLM",
            (
                *_ATTENTION,
                ("blk.{L}.ffn_gate_inp", "model.layers.{L}.block_sparse_moe.gate"),
                ("blk.{L}.ffn_gate_exps", "model.layers.{L}.block_sparse_moe.experts.{E}.w1"),
                ("blk.{L}.ffn_down_exps", "model.layers.{L}.block_sparse_moe.experts.{E}.w2"),
                ("blk.{L}.ffn_up_exps", "model.layers.{L}.block_sparse_moe.experts.{E}.w3"),
            ),
            (
                *_HPARAMS,
                ("head_dim", "rope.dimension_count"),
                ("head_dim", "attention.key_length"),
                ("head_dim", "attention.value_length"),
            ),
            "num_local_experts",
            permute_qk=True,
        ),
    )
}
_DEEPSEEK2 = GgufArch(
    "deepseek2",
    "deepseek_v3",
    "DeepseekV3ForCausalLM",
    (
        *[p for p in _ATTENTION if p[0].split(".")[-1] not in ("attn_q", "attn_k", "attn_v")],
        ("blk.{L}.attn_q", "model.layers.{L}.self_attn.q_proj"),
        ("blk.{L}.attn_q_a", "model.layers.{L}.self_attn.q_a_proj"),
        ("blk.{L}.attn_q_a_norm", "model.layers.{L}.self_attn.q_a_layernorm"),
        ("blk.{L}.attn_q_b", "model.layers.{L}.self_attn.q_b_proj"),
        ("blk.{L}.attn_kv_a_mqa", "model.layers.{L}.self_attn.kv_a_proj_with_mqa"),
        ("blk.{L}.attn_kv_a_norm", "model.layers.{L}.self_attn.kv_a_layernorm"),
        ("blk.{L}.attn_kv_b", "model.layers.{L}.self_attn.kv_b_proj"),  # GGUFs from before the split
        ("blk.{L}.attn_k_b", "model.layers.{L}.self_attn.k_b_proj"),
        ("blk.{L}.attn_v_b", "model.layers.{L}.self_attn.v_b_proj"),
        *_MLP_EXPERTS,
        ("blk.{L}.exp_probs_b.bias", "model.layers.{L}.mlp.gate.e_score_correction_bias"),
        ("blk.{L}.ffn_gate_shexp", "model.layers.{L}.mlp.shared_experts.gate_proj"),
        ("blk.{L}.ffn_up_shexp", "model.layers.{L}.mlp.shared_experts.up_proj"),
        ("blk.{L}.ffn_down_shexp", "model.layers.{L}.mlp.shared_experts.down_proj"),
    ),
    (
        *[p for p in _HPARAMS if p[0] != "num_key_value_heads"],
        ("moe_intermediate_size", "expert_feed_forward_length"),
        ("q_lora_rank", "attention.q_lora_rank"),
        ("kv_lora_rank", "attention.kv_lora_rank"),
        ("first_k_dense_replace", "leading_dense_block_count"),
        ("n_shared_experts", "expert_shared_count"),
        ("routed_scaling_factor", "expert_weights_scale"),
        ("norm_topk_prob", "expert_weights_norm"),
        ("n_group", "expert_group_count"),
        ("topk_group", "expert_group_used_count"),
        ("qk_rope_head_dim", "rope.dimension_count"),
        ("v_head_dim", "attention.value_length_mla"),
    ),
    "n_routed_experts",
    derive_keys=_mla_keys,
    derive_config=_mla_config,
    mla=True,
)
ARCHS[_DEEPSEEK2.arch] = _DEEPSEEK2
_GPT_OSS = GgufArch(  # llama.cpp's GptOssModel (convert_hf_to_gguf.py), gguf-py's GPT_OSS tensors
    "gpt-oss",
    "gpt_oss",
    "GptOssForCausalLM",
    (
        *[p for p in _ATTENTION if p[0] != "blk.{L}.ffn_norm"],
        ("blk.{L}.post_attention_norm", "model.layers.{L}.post_attention_layernorm"),
        ("blk.{L}.attn_sinks.weight", "model.layers.{L}.self_attn.sinks"),  # it adds `.weight`
        ("blk.{L}.ffn_gate_inp", "model.layers.{L}.mlp.router"),
        ("blk.{L}.ffn_gate_exps", "model.layers.{L}.mlp.experts.{E}.gate_proj"),
        ("blk.{L}.ffn_up_exps", "model.layers.{L}.mlp.experts.{E}.up_proj"),
        ("blk.{L}.ffn_down_exps", "model.layers.{L}.mlp.experts.{E}.down_proj"),
    ),
    (
        *_HPARAMS,
        ("head_dim", "attention.key_length"),
        ("head_dim", "attention.value_length"),
        ("sliding_window", "attention.sliding_window"),
        ("intermediate_size", "expert_feed_forward_length"),
    ),
    "num_local_experts",
    derive_keys=_yarn_keys,
    derive_config=_yarn_config,
)
ARCHS[_GPT_OSS.arch] = _GPT_OSS
BY_MODEL_TYPE = {a.model_type: a for a in ARCHS.values()}


def arch_named(name: str, where: str) -> GgufArch:
    """The table of a GGUF file's `general.architecture`."""
    try:
        return ARCHS[name]
    except KeyError:
        known = ", ".join(sorted(ARCHS))
        raise MoeportError(f"{where}: GGUF architecture '{name}' is not supported (known: {known})") from None


def arch_for(model_type: str) -> GgufArch:
    """The llama.cpp architecture a family is written as (`--to gguf`)."""
    try:
        return BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(BY_MODEL_TYPE))
        raise MoeportError(
            f"--to gguf: model_type '{model_type}' has no llama.cpp architecture in moeport yet "
            f"(known: {known})"
        ) from None
