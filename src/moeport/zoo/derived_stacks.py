"""Several expert stacks in one transformers model: which is the main one, where each is on the Hub,
and which (nested) text config holds its sizes.

Qwen3-Omni holds a thinker (`thinker.model.language_model.layers.{L}.mlp.experts`, saved as
`thinker.model.layers.{L}.`) and a talker (`talker.model.layers.{L}.mlp.experts`); DiffusionGemma
an encoder (`model.encoder.language_model.layers.{L}.experts`) and a decoder
(`model.decoder.layers.{L}.experts`). Both stacks have the same module path relative to their
layer and the same stack names, so they share one ExpertLayout; only the layer prefix differs.
The first stack in the model's own order is the main one; the others become `Stack`s. Stacks
under one layer prefix with different module paths (ERNIE-VL's text and vision experts side by
side in each layer) are something else, and stay refused.
"""

from __future__ import annotations

import re

from moeport.errors import MoeportError
from moeport.zoo.families import Stack

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?\.|)(?P<L>\d+)\.(?P<rest>.+)$")


class NotStacks(MoeportError):
    """Experts under several module paths that are not several stacks of one layout (why)."""


def main_and_stacks(
    paths: list[tuple[str, str]], tied: set[tuple[str, str]] | None = None
) -> tuple[tuple[str, str], list[str]]:
    """(main (prefix, module), the other stacks' layer prefixes) of the expert module paths found
    in a model's state dict, in its order, those `tied` to another stack's weights last
    (DiffusionGemma's encoder shares its decoder's: transformers saves the decoder's, and that is
    the stack a checkpoint holds); NotStacks where they are not one module under several prefixes."""
    tied = tied or set()
    paths = [p for p in paths if p not in tied] + [p for p in paths if p in tied]
    modules = {module for _, module in paths}
    prefixes = [prefix for prefix, _ in paths]
    if len(modules) != 1 or len(set(prefixes)) != len(prefixes):
        raise NotStacks(f"experts under several module paths {sorted(paths)}")
    return paths[0], prefixes[1:]


def hub_prefix(state: dict, hub_state: dict, prefix: str, skip: set[str]) -> str | None:
    """The Hub's layer prefix of the memory layer prefix `prefix`: where transformers' own save
    puts a layer tensor it only renames (the same object on both sides, its name relative to the
    layer unchanged), one not in `skip` (experts)."""
    where = {id(v): k for k, v in hub_state.items()}
    for key, value in state.items():
        m = re.match(r"\d+\.", key[len(prefix) :]) if key.startswith(prefix) else None
        hub = where.get(id(value)) if m and key not in skip else None
        tail = key[len(prefix) :]
        if hub is not None and hub.endswith("." + tail):
            return hub[: -len(tail)]
    return None


def main_hub(
    per: dict[tuple[str, str], set[str]], state: dict, hub_state: dict, fused: dict, skip: set[str]
) -> tuple[str, str]:
    """The (hub prefix, block) of the main stack among the per-expert hub names found, `per`:
    (prefix, block) -> projections; one per stack, all with the same block and projections."""
    if len(per) == 1:
        return next(iter(per))
    stacks = fused.get("stacks", [])
    if (
        len(per) != 1 + len(stacks)
        or len({b for _, b in per}) != 1
        or len({frozenset(p) for p in per.values()}) != 1
    ):
        raise NotStacks(f"hub experts under several module paths {sorted(per)}")
    main = hub_prefix(state, hub_state, fused["prefix"], skip) or fused["prefix"]
    found = [key for key in per if key[0] == main]
    if not found:
        raise NotStacks(f"hub experts under {sorted(per)}, none under the main stack's '{main}'")
    return found[0]


def config_path(model, module_prefix: str) -> str:
    """Dotted path, in the model's config, of the text config of the innermost sub-model holding
    the layers under `module_prefix` ('thinker_config.text_config'); '' for the top config."""
    from transformers import PreTrainedModel

    owners = [
        (name, sub)
        for name, sub in model.named_modules()
        if isinstance(sub, PreTrainedModel) and (not name or module_prefix.startswith(name + "."))
    ]
    _, owner = max(owners, key=lambda ns: len(ns[0]))
    return _find(model.config, owner.config.get_text_config(), "") or ""


def _find(config, wanted, path: str) -> str | None:
    """The dotted path of config object `wanted` under `config` (by identity)."""
    if config is wanted:
        return path
    for key in getattr(type(config), "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and not isinstance(sub, dict):
            found = _find(sub, wanted, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    return None


def stacks_of(
    model, state: dict, hub_state: dict, main: str, others: list[str], skip: set[str]
) -> tuple[str, tuple[Stack, ...], str]:
    """(the main stack's hub layer prefix, the other stacks (hub prefix, then memory prefix, and
    the path of their text config), the main stack's text config path)."""
    stacks = []
    for prefix in others:
        hub = hub_prefix(state, hub_state, prefix, skip) or prefix
        stacks.append(
            Stack(tuple(dict.fromkeys((hub + "{L}.", prefix + "{L}."))), config_path(model, prefix))
        )
    path = config_path(model, main)
    return hub_prefix(state, hub_state, main, skip) or main, tuple(stacks), path
