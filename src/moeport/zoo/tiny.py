"""Tiny configs and models of any transformers model type, built by transformers' own classes.

moeport derives a family's layout from the model transformers builds (on `meta`: no memory, no
weights), and the tests build the same tiny models on the CPU. One override set fits almost every
MoE config: the names below are the ones transformers' MoE configs use for the same facts;
configs ignore the names they do not have. Sizes are distinct (hidden != 2 x expert intermediate)
so a transposed stack cannot be mistaken for a plain one.
"""

from __future__ import annotations

import re
from typing import Any

from moeport.errors import MoeportError
from moeport.zoo.tiny_moe import moe_switches

EXPERTS = 4
PER_TOKEN = 2


def text_overrides(hidden: int = 64, inter: int = 48, dense: int = 80, layers: int = 2) -> dict[str, Any]:
    """Config fields of a tiny MoE language model: 2 layers (the first dense where the family has
    dense layers first), 4 experts, 2 per token, one shared expert."""
    return dict(
        vocab_size=256,
        vocab_size_per_layer_input=256,  # Gemma-4: its per-layer embeddings are vocab-sized
        hidden_size=hidden,
        moe_hidden_size=2 * hidden,  # MuseSpark: experts work in their own, wider hidden size
        intermediate_size=dense,
        moe_intermediate_size=inter,
        expert_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=PER_TOKEN,
        n_routed_experts=EXPERTS,
        num_experts=EXPERTS,
        num_local_experts=EXPERTS,
        moe_num_experts=EXPERTS,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        # multi-head latent attention (DeepSeek-V2/V3 and their kin): consistent tiny ranks
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


VISION = dict(
    depth=1,
    num_hidden_layers=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    num_attention_heads=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
)

# (error text transformers gives, the override that answers it): configs that validate more
_FIXES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("key_value_heads", {"num_key_value_heads": 4}),
    ("num_mtp_layers", {"num_mtp_layers": 0}),
    ("num_nextn_predict_layers", {"num_nextn_predict_layers": 0}),
)


def tiny_config(model_type: str, text: dict[str, Any] | None = None, small_vision: bool = True):
    """transformers' config of `model_type` with tiny text sizes (and a tiny vision tower where
    the config has one and accepts it), with at least one MoE layer (zoo/tiny_moe.py). Raises
    MoeportError with transformers' reason."""
    config = _tiny_config(model_type, text, small_vision)
    switches = moe_switches(config.get_text_config(), PER_TOKEN)
    if not switches:
        return config
    return _tiny_config(model_type, {**(text or text_overrides()), **switches}, small_vision)


def _tiny_config(model_type: str, text: dict[str, Any] | None, small_vision: bool):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise MoeportError(f"model_type '{model_type}' is not in the installed transformers")
    cls = CONFIG_MAPPING[model_type]
    text = dict(text or text_overrides())
    subs = set(getattr(cls, "sub_configs", None) or {})
    last: Exception | None = None
    for vision in (True, False) if small_vision and "vision_config" in subs else (False,):
        fixes: dict[str, Any] = {}
        for _ in range(len(_FIXES) + 1):
            kwargs = {**text, **fixes}
            try:
                if "text_config" in subs:
                    extra = {"vision_config": VISION} if vision else {}
                    return cls(text_config=kwargs, **extra)
                return cls(**kwargs)
            except Exception as e:  # transformers validates configs with its own exception types
                last = e
                fix = next((f for key, f in _FIXES if key in str(e) and not f.keys() <= fixes.keys()), None)
                if fix is None:
                    break
                fixes.update(fix)
    raise MoeportError(f"{model_type}: transformers refuses a tiny config ({_one_line(last)})")


def build_model(config, device: str = "meta"):
    """The causal-LM (or image-text-to-text, or base) model transformers builds for `config`."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel):
        try:
            with torch.device(device):
                return auto.from_config(config)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                continue
            raise MoeportError(f"{config.model_type}: transformers cannot build it ({_one_line(e)})") from e
        except Exception as e:  # a model class failing on a tiny config: its reason, one line
            raise MoeportError(f"{config.model_type}: transformers cannot build it ({_one_line(e)})") from e
    raise MoeportError(f"{config.model_type}: no causal-LM, image-text or base model class in transformers")


def _one_line(e: BaseException | None) -> str:
    text = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}") if e is not None else "no reason given"
    return text if len(text) <= 160 else text[:157] + "..."
