"""Answers to transformers' config validators, read off the refusal and the config's own defaults.

transformers' configs validate themselves (strict dataclasses, `validate_architecture`), and a
tiny config that sets the common MoE fields can break one family's rule: a NoPE model given a RoPE
dim, a list-typed field given an int, a wrapper whose adapter must output the text width. Each
rule here reads the refusal and the config class's declared fields and defaults and proposes the
smallest change; tiny.py keeps a change only when it moves transformers past that refusal.
Per-type data (tiny.py `TYPE_OVERRIDES`) is for what no rule reaches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

Kwargs = dict[str, Any]  # the config call: a plain config's fields, or a wrapper's `*_config` dicts

_LIST_TYPED = re.compile(r"Field '(\w+)' with value (-?\d+) doesn't match any type in \(list\[int\]")
_NAME = r"`?([A-Za-z_][\w.]*)`?(?:\s*\((-?\d+)\))?"
_EQUAL = re.compile(_NAME + r"\s+must (?:match|be the same as|equal)\s+(?:the\s+)?" + _NAME)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?![\w.])")
_BETWEEN = re.compile(r"`?([A-Za-z_]\w*)`? must be between (-?\d+) and ")


def candidates(cls: type, kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """Changed configs that might answer `message`, most specific first."""
    yield from _list_typed(cls, kwargs, message)
    yield from _equalities(kwargs, message)
    yield from _tie_text_width(cls, kwargs, message)
    yield from _per_layer(cls, kwargs, message)
    yield from _lower_bound(kwargs, message)
    yield from _reverts(kwargs, message)


def _dicts(kwargs: Kwargs) -> dict[str, Kwargs]:
    """The field dicts of the call: '' for its top level, and each `*_config` (sub-config) dict."""
    return {"": kwargs, **{k: v for k, v in kwargs.items() if k.endswith("_config") and isinstance(v, dict)}}


def _text(kwargs: Kwargs) -> Kwargs:
    return kwargs.get("text_config", kwargs) if isinstance(kwargs.get("text_config"), dict) else kwargs


def _text_class(cls: type) -> type:
    sub = (getattr(cls, "sub_configs", None) or {}).get("text_config")
    return sub if isinstance(sub, type) else cls


def _default(cls: type, name: str) -> Any:
    """The value transformers' config class gives `name` by itself (after its own __post_init__)."""
    try:
        return getattr(cls(), name, None)
    except Exception:  # a class whose defaults do not validate alone: its declared default
        return getattr(cls, name, None)


def _list_typed(cls: type, kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """A list-typed size given an int (ERNIE-4.5-VL's per-modality `moe_intermediate_size`): the
    class's default list, every entry our value."""
    m = _LIST_TYPED.search(message)
    if not m:
        return
    name, value = m[1], int(m[2])
    default = _default(_text_class(cls), name)
    if isinstance(default, list) and default:
        out = copy.deepcopy(kwargs)
        _text(out)[name] = [value] * len(default)
        yield out


def _lookup(kwargs: Kwargs, dotted: str) -> tuple[Kwargs, str] | None:
    """The dict of the call holding field `dotted` (`vision_config.text_hidden_size`, `hidden_size`)."""
    head, _, name = dotted.rpartition(".")
    if not head:
        return _text(kwargs), name
    if not head.endswith("_config") or not isinstance(kwargs.get("text_config"), dict):
        return None  # a sub-config named in a plain config's refusal
    where = kwargs.setdefault(head, {})
    return (where, name) if isinstance(where, dict) else None


def _equalities(kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """`A (x) must match B (y)`: A takes B's value, or else B takes A's."""
    m = _EQUAL.search(message)
    if not m:
        return
    (a, a_value, b, b_value) = m.groups()
    for (dst, _), (src, src_value) in (((a, a_value), (b, b_value)), ((b, b_value), (a, a_value))):
        out = copy.deepcopy(kwargs)
        target, source = _lookup(out, dst), _lookup(out, src)
        if target is None or source is None:
            continue
        value = int(src_value) if src_value is not None else source[0].get(source[1])
        if value is not None and target[0].get(target[1]) != value:
            target[0][target[1]] = value
            yield out


def _tie_text_width(cls: type, kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """A wrapper whose vision/audio adapter must output the text model's width: every sub-config
    field whose default is the text model's default hidden size takes the tiny text's."""
    subs = getattr(cls, "sub_configs", None) or {}
    if "hidden" not in message or "text_config" not in subs:
        return
    text_default = _default(_text_class(cls), "hidden_size")
    hidden = _text(kwargs).get("hidden_size")
    out = copy.deepcopy(kwargs)
    for key, sub in subs.items():
        if key == "text_config" or not isinstance(sub, type):
            continue
        try:
            fields = {k: v for k, v in sub().to_dict().items() if type(v) is int}
        except Exception:  # a sub-config whose defaults do not validate alone
            continue
        mine = out.setdefault(key, {})
        for name, value in fields.items():
            if value == text_default and name != "hidden_size" and name not in mine:
                mine[name] = hidden
    if out != kwargs:
        yield out


def _per_layer(cls: type, kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """Per-layer defaults sized for the full depth (dots.3's vision pyramid of expert counts for
    layers 25-41): the tiny depth's `mlp_layer_types` given outright, transformers' convention
    (first layer dense, the rest sparse), so the class derives nothing per layer from its defaults."""
    text = _text(kwargs)
    declared = getattr(_text_class(cls), "__dataclass_fields__", {})
    if "layer" not in message or "mlp_layer_types" not in declared or "mlp_layer_types" in text:
        return
    out = copy.deepcopy(kwargs)
    layers = int(text.get("num_hidden_layers", 2))
    _text(out)["mlp_layer_types"] = ["dense"] + ["sparse"] * (layers - 1)
    yield out


def _lower_bound(kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """`A must be between 1 and <a fact of the config>` (Kolibri-1.1's `index_num_heads`, 12 by
    default, at most the query heads per key head: 2 in the tiny config): A takes the lower bound,
    valid whatever the other side works out to."""
    m = _BETWEEN.search(message)
    if not m:
        return
    out = copy.deepcopy(kwargs)
    _text(out)[m[1]] = int(m[2])
    yield out


def _reverts(kwargs: Kwargs, message: str) -> Iterator[Kwargs]:
    """One of our overrides back to transformers' default: those the refusal names, then those
    whose value it quotes (`... but got 8 as RoPE dim`)."""
    numbers = {int(n) for n in _NUMBER.findall(message)}
    named, valued = [], []
    for key, fields in _dicts(kwargs).items():
        for name, value in fields.items():
            if isinstance(value, dict):  # a sub-config: its own fields are candidates, not all of it
                continue
            if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message):
                named.append((key, name))
            elif type(value) is int and value in numbers:
                valued.append((key, name))
    for key, name in named + valued:
        out = copy.deepcopy(kwargs)
        del (out[key] if key else out)[name]
        yield out
