"""Tiny configs and models of any transformers model type, built by transformers' own classes.

moeport derives a family's layout from the model transformers builds (on `meta`: no memory, no
weights), and the tests build the same tiny models on the CPU. One override set fits almost every
MoE config: the names below are the ones transformers' MoE configs use for the same facts;
configs ignore the names they do not have. Sizes are distinct (hidden != 2 x expert intermediate)
so a transposed stack cannot be mistaken for a plain one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from moeport.errors import MoeportError
from moeport.zoo.tiny_answers import candidates
from moeport.zoo.tiny_encdec import ENCDEC_OVERRIDES
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


def sub_configs(model_type: str, hidden: int) -> dict[str, Any]:
    """Tiny sub-configs and projector sizes of the multimodal configs VISION does not reach (a SAM
    + CLIP pair, an audio encoder): at transformers' defaults they hold hundreds of millions of weights."""
    if model_type == "qwen3_omni_moe":  # its speech decoder (codec embeddings, ConvNet)
        code2wav = dict(codebook_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2)
        code2wav.update(intermediate_size=64, num_hidden_layers=1, num_quantizers=4, decoder_dim=32)
        return {"code2wav_config": code2wav}
    if model_type == "Qwen3OmniMoeTalkerConfig":  # its code predictor, fed the thinker's hidden states
        predictor = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
        predictor.update(num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_code_groups=4)
        return {"code_predictor_config": predictor, "num_code_groups": 4, "thinker_hidden_size": hidden}
    if model_type == "minimax_m3_vl":
        return {"projector_hidden_size": hidden}
    if model_type == "qwen3_omni_moe_thinker":
        audio = dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32)
        audio.update(output_dim=hidden, downsample_hidden_size=16, num_mel_bins=16)
        vision = {**VISION, "out_hidden_size": hidden, "deepstack_visual_indexes": [0]}
        return {"vision_config": vision, "audio_config": audio}
    if model_type == "unlimited_ocr":
        sam = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2)
        sam.update(mlp_dim=64, image_size=64, patch_size=16, window_size=2, global_attn_indexes=[1])
        sam["downsample_channels"] = [16, 32]
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        clip.update(image_size=32, patch_size=16)
        return {"vision_config": {"sam_config": sam, "encoder_config": clip}}
    return {}


# text fields of one model type that no other uses the same way, tiny (model_type -> overrides)
TEXT_EXTRAS: dict[str, dict[str, Any]] = {
    "kimi_linear": dict(linear_num_heads=2, linear_head_dim=16),  # its linear attention: 32 x 128
    "inkling_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8),
    "minimax_m3_vl": dict(shared_intermediate_size=48, dense_intermediate_size=80),
    # DiffusionGemma builds its experts from `num_experts` but routes `top_k_experts`, default None
    "diffusion_gemma": dict(top_k_experts=PER_TOKEN),
    "diffusion_gemma_text": dict(top_k_experts=PER_TOKEN),
}


# Per-type data (by model_type, or class name for a sub-config without one) where no rule
# reaches: fields transformers' own defaults leave out although its model class reads them (every
# real checkpoint's config.json sets them), and configs whose names for the common facts are their
# own (a function of the tiny text fields).
TYPE_OVERRIDES: dict[str, dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]]] = {
    # Dbrx: its own names; DbrxAttention reads `attn_config.rope_theta`, which the class does not declare,
    # and clamps q/k/v by `clip_qkv` (None fails in torch.clamp; dbrx-instruct says 8)
    "dbrx": lambda t: dict(
        d_model=t["hidden_size"],
        n_heads=t["num_attention_heads"],
        n_layers=t["num_hidden_layers"],
        max_seq_len=128,
        head_dim=t["hidden_size"] // t["num_attention_heads"],  # its rotary reads it; attention computes it
        attn_config={"kv_n_heads": t["num_key_value_heads"], "rope_theta": 500000.0, "clip_qkv": 8.0},
        ffn_config={
            "ffn_hidden_size": t["moe_intermediate_size"],
            "moe_num_experts": EXPERTS,
            "moe_top_k": PER_TOKEN,
        },
    ),
    # Ergo: its own names for the dense and shared MLP widths (32768 and 8192 by default); its
    # attention computes hidden / heads as head size while its rotary reads `head_dim` (undeclared,
    # absent from its config.json) when set
    "ergo": lambda t: dict(
        first_dense_intermediate_size=t["intermediate_size"],
        shared_intermediate_size=t["moe_intermediate_size"],
        head_dim=t["hidden_size"] // t["num_attention_heads"],
    ),
    # LongCat-Flash: 256 zero-compute experts by default (identity, no weights on the Hub; rows of
    # transformers' gate_up_proj): two keep the tiny model tiny and some tokens routed to them
    "longcat_flash": dict(zero_expert_num=2),
    # LFM2-MoE: no default `layer_types` (LFM2's config builds one); one conv and one attention layer
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # Qwen3-Omni's talker reads `spatial_merge_size`, which its config class does not declare
    "Qwen3OmniMoeTalkerConfig": dict(spatial_merge_size=2),
    # Step-3.5 (Step3p7's text model) builds a sliding-window mask whatever its layer types
    "step3p5": dict(sliding_window=512),
    # VitPose+: the per-dataset heads' width, taken out of the (tiny) hidden size
    "vitpose_backbone": dict(part_features=16),
    # ERNIE-4.5-VL: 3-D RoPE sections (h, w, t) for its tiny head dim 8: 4 frequencies, h and w
    # alike as its forward stacks them (the default [22, 22, 20] fits 128)
    "ernie4_5_vl_moe_text": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]}
    ),
    **ENCDEC_OVERRIDES,  # Switch Transformers, NLLB-MoE: both stacks tiny, every other layer MoE
}
_STEPS = 12  # refusals answered in a row at most (each answer moves transformers past one)


def tiny_config(model_type: str, text: dict[str, Any] | None = None, small_vision: bool = True):
    """transformers' config of `model_type` with tiny text sizes (and tiny vision/audio towers
    where the config has them and accepts them), with at least one MoE layer (zoo/tiny_moe.py). A
    refusal is answered from its message and the class's defaults (zoo/tiny_answers.py);
    MoeportError gives transformers' last reason."""
    config = _tiny_config(model_type, text, small_vision)
    switches = moe_switches(config.get_text_config(), PER_TOKEN)
    if not switches:
        return config
    return _tiny_config(model_type, {**(text or text_overrides()), **switches}, small_vision)


def _tiny_config(model_type: str, text: dict[str, Any] | None, small_vision: bool):
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # a broken or missing install: derivation reads transformers' definitions
        raise MoeportError(
            f"model_type '{model_type}' is derived from transformers' definitions, and transformers "
            "does not import here (pip install 'transformers>=5')"
        ) from None

    if model_type not in CONFIG_MAPPING:
        raise MoeportError(f"model_type '{model_type}' is not in the installed transformers")
    cls = CONFIG_MAPPING[model_type]
    text = {**(text or text_overrides()), **TEXT_EXTRAS.get(model_type, {})}
    last: Exception | None = None
    for small in (True, False) if small_vision and _is_wrapper(cls) else (False,):
        kwargs = _call(cls, text, small)
        if small:  # towers VISION does not fit (SAM + CLIP, audio), projector widths
            kwargs.update(sub_configs(model_type, text["hidden_size"]))
        config, last = _answered(cls, kwargs)
        if config is not None:
            return _per_layer_types(config)
    raise MoeportError(f"{model_type}: transformers refuses a tiny config ({_one_line(last)})")


def _is_wrapper(cls: type) -> bool:
    """A config holding a `text_config`, itself or in a sub-config (Qwen3-Omni: thinker, talker)."""
    subs = getattr(cls, "sub_configs", None) or {}
    return "text_config" in subs or any(isinstance(s, type) and _is_wrapper(s) for s in subs.values())


def _call(cls: type, text: dict[str, Any], small: bool) -> dict[str, Any]:
    """The config call: tiny text fields, or a wrapper's `text_config` (at any depth) with tiny
    towers beside it where `small`."""
    own = _own(_type_name(cls), text)
    if not _is_wrapper(cls):
        return {**text, **_tied_vocab(cls, text), **own}
    out: dict[str, Any] = dict(own)
    for key, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if key == "text_config":
            out[key] = {**text, **_tied_vocab(sub, text), **_own(_type_name(sub), text)}
        elif isinstance(sub, type) and _is_wrapper(sub):
            out[key] = _call(sub, text, small)
            if small:  # a nested wrapper's own tiny towers (Qwen3-Omni's thinker and talker)
                out[key].update(sub_configs(_type_name(sub), text["hidden_size"]))
        elif small and key in _default_towers(cls):
            out[key] = dict(VISION)
    return out


def _type_name(cls: type) -> str:
    """A config class's model_type, else its name (AutoConfig, a sub-config chosen at load time by
    Kimi-K2.5, has neither a model_type nor fields of its own)."""
    return getattr(cls, "model_type", "") or cls.__name__


def _own(key: str, text: dict[str, Any]) -> dict[str, Any]:
    """TYPE_OVERRIDES of a config class (by model_type, or class name), given the tiny text fields."""
    own = TYPE_OVERRIDES.get(key, {})
    return own(text) if callable(own) else dict(own)


def _tied_vocab(cls: type, text: dict[str, Any]) -> dict[str, Any]:
    """The config's other vocabulary sizes (Inkling-2's `unpadded_vocab_size`, which transformers
    slices the padded one to) at the tiny vocabulary, so no slice runs past it."""
    try:
        names = [f.name for f in dataclasses.fields(cls)]
    except TypeError:  # not a dataclass config
        return {}
    return {n: text["vocab_size"] for n in names if n.endswith("vocab_size") and n != "vocab_size"}


@cache
def _default_towers(cls: type) -> set[str]:
    """The towers a wrapper gets tiny: its vision tower, and the others it builds by default (an
    audio tower it leaves None is not added)."""
    subs = set(getattr(cls, "sub_configs", None) or {})
    try:
        default = cls()
    except Exception:  # defaults that do not validate alone: every declared sub-config
        return subs
    return {k for k in subs if k == "vision_config" or getattr(default, k, None) is not None}


def _answered(cls: type, kwargs: dict[str, Any]):
    """(config, None), or (None, transformers' last refusal) when no answer moves it further."""
    config, error = _make(cls, kwargs)
    for _ in range(_STEPS):
        if config is not None:
            return config, None
        for changed in candidates(cls, kwargs, str(error)):
            tried, again = _make(cls, changed)
            if tried is not None or str(again) != str(error):
                kwargs, config, error = changed, tried, again
                break
        else:
            return None, error
    return config, error


def _make(cls: type, kwargs: dict[str, Any]):
    try:
        return cls(**kwargs), None
    except Exception as e:  # transformers validates configs with its own exception types
        return None, e


def _per_layer_types(config):
    """`mlp_layer_types` that transformers' defaults leave None although its model class indexes
    it per layer (DeepSeek-OCR-2), or make all dense for a tiny depth (GLM-5-Next: its first 3):
    transformers' convention, the first layer dense and the rest sparse, as the overrides ask."""
    text = config.get_text_config()
    if "mlp_layer_types" in text.to_dict() and set(text.mlp_layer_types or ("dense",)) == {"dense"}:
        text.mlp_layer_types = ["dense"] + ["sparse"] * (text.num_hidden_layers - 1)
    return config


def build_model(config, device: str = "meta"):
    """The causal-LM (or image-text-to-text, or base) model transformers builds for `config`; for
    a config type no auto class maps (a wrapper's text or talker config), the model class its
    modeling module declares for that config."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    builders = [auto.from_config for auto in (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel)]
    builders += [cls._from_config for cls in declared_model_classes(type(config))]
    for build in builders:
        try:
            with torch.device(device):
                return build(config)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                continue
            raise MoeportError(f"{config.model_type}: transformers cannot build it ({_one_line(e)})") from e
        except Exception as e:  # a model class failing on a tiny config: its reason, one line
            raise MoeportError(f"{config.model_type}: transformers cannot build it ({_one_line(e)})") from e
    raise MoeportError(f"{config.model_type}: no model class in transformers takes {type(config).__name__}")


_CLASS_ORDER = ("ForCausalLM", "ForConditionalGeneration", "Model", "Backbone")


def declared_model_classes(config_cls: type) -> list[type]:
    """Model classes of the config's own modeling module whose `config_class` is exactly it,
    causal LM first, then conditional generation, then base model."""
    import importlib
    import inspect as pyinspect

    from transformers import PreTrainedModel

    module = config_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        found = vars(importlib.import_module(module)).values()
    except ImportError:  # a config without a modeling module
        return []
    classes = [
        c
        for c in found
        if pyinspect.isclass(c)
        and issubclass(c, PreTrainedModel)
        and c.__module__ == module
        and c.__dict__.get("config_class", getattr(c, "config_class", None)) is config_cls
        and "PreTrained" not in c.__name__
    ]
    rank = {
        c: next((i for i, s in enumerate(_CLASS_ORDER) if c.__name__.endswith(s)), len(_CLASS_ORDER))
        for c in classes
    }
    return sorted((c for c in classes if rank[c] < len(_CLASS_ORDER)), key=lambda c: (rank[c], c.__name__))


def _one_line(e: BaseException | None) -> str:
    text = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}") if e is not None else "no reason given"
    return text if len(text) <= 160 else text[:157] + "..."
