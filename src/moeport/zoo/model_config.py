"""Read model facts from config.json, whatever the family calls them.

Multimodal wrappers (Qwen3.5, Kimi-K2.5...) keep the language model's fields in `text_config`;
those win over the top level, which keeps `model_type`/`quantization_config`. Some nest it a level
deeper (Qwen3-Omni: `thinker_config.text_config`, its talker's `talker_config.text_config`).
"""

from __future__ import annotations

from typing import Any

from moeport.errors import MoeportError
from moeport.zoo.families import StorageField


class ModelConfig:
    def __init__(self, raw: dict[str, Any], text_path: str = ""):
        """`text_path`: the dotted path of the text config to read facts from; '' finds it
        (`text_config`, else the only sub-config's `text_config`)."""
        self.raw = raw
        self.text_path = text_path or _text_path(raw)
        text = nested(raw, self.text_path) if self.text_path else None
        self.text: dict[str, Any] = text if isinstance(text, dict) else {}

    def at(self, text_path: str) -> ModelConfig:
        """The same config.json read with the text config at `text_path` ('' : the default one)."""
        return ModelConfig(self.raw, text_path)

    @property
    def model_types(self) -> list[str]:
        """Candidate model types, outermost first (wrapper, then text model)."""
        return [t for t in (self.raw.get("model_type"), self.text.get("model_type")) if isinstance(t, str)]

    @property
    def quantization_config(self) -> dict[str, Any]:
        q = self.raw.get("quantization_config") or self.text.get("quantization_config")
        return q if isinstance(q, dict) else {}

    def first(self, names: tuple[str, ...]) -> Any:
        """Value of the first of `names` present (text_config first), else None."""
        for source in (self.text, self.raw):
            for name in names:
                if nested(source, name) is not None:
                    return nested(source, name)
        return None

    def first_int(self, names: tuple[str, ...]) -> int | None:
        """The first of `names` present, which must be a whole number (a string or a fraction
        there is a broken config, refused rather than read as missing)."""
        for source in (self.text, self.raw):
            for name in names:
                value = nested(source, name)
                if value is None:
                    continue
                whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                if isinstance(value, bool) or not whole:
                    raise MoeportError(f"config.json: '{name}' is {value!r}, expected a whole number")
                return int(value)
        return None


def nested(raw: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of sub-config keys ('thinker_config.text_config', DBRX's
    `ffn_config.moe_num_experts`), else None."""
    value: Any = raw
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _text_path(raw: dict[str, Any]) -> str:
    """`text_config`, else a vision model's `backbone_config` (the experts' model), else the one
    sub-config's `text_config` where only one has one (a wrapper of several, Qwen3-Omni's thinker
    and talker, says which in its family: Family.config)."""
    if isinstance(raw.get("text_config"), dict):
        return "text_config"
    if isinstance(raw.get("backbone_config"), dict):  # VitPose+ on the Hub: VitPoseForPoseEstimation
        return "backbone_config"
    paths = [
        f"{key}.text_config"
        for key, value in raw.items()
        if key.endswith("_config") and isinstance(value, dict) and isinstance(value.get("text_config"), dict)
    ]
    return paths[0] if len(paths) == 1 else ""


def rewrite_storage_fields(cfg: dict[str, Any], fields: tuple[StorageField, ...], codec: str) -> None:
    """Make each of the family's expert-storage fields in `cfg` (top level, text_config and their
    quantization_config) say `codec`, the codec of the output's experts; drop those with no value."""
    if not fields:
        return
    where = [cfg, cfg.get("text_config")]
    where += [c.get("quantization_config") for c in list(where) if isinstance(c, dict)]
    for c in where:
        if not isinstance(c, dict):
            continue
        for f in fields:
            if f.name in c:
                value = dict(f.values).get(codec)
                if value is None:
                    del c[f.name]
                else:
                    c[f.name] = value
