"""Turn a Detection into a plain dict (for `--json`) and compact layer-range text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeport.detect.detection import Detection
from moeport.sinks.kt_layout import KtLayout


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (empty -> '-')."""
    if not layers:
        return "-"
    out, start, prev = [], layers[0], layers[0]
    for L in layers[1:] + [None]:  # type: ignore[list-item]
        if L is not None and L == prev + 1:
            prev = L
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if L is not None:
            start = prev = L
    return ", ".join(out)


# recipe fields that describe the conversion, not the source (those are in "source*")
_SOURCE_FIELDS = ("source", "source_fingerprint", "source_family", "source_files")


def written_by(recipe: dict[str, Any]) -> dict[str, Any]:
    """What the recorded recipe says of an output moeport wrote: its target, options and source;
    for kt-kernel's native methods, the method and group size its loader reads ({} if none)."""
    if not recipe.get("to"):
        return {}
    options = {k: v for k, v in recipe.items() if k not in ("to", *_SOURCE_FIELDS)}
    out: dict[str, Any] = {"target": recipe["to"], "options": options, "source": recipe.get("source", "")}
    # kt-kernel native: KTMoEWrapper(method=...) reads this folder (a w4a16 `method` is rtn/gptq)
    if "method" in options and str(recipe["to"]).startswith("kt-"):
        out["kt_method"] = options["method"]
        if options.get("group_size"):
            out["kt_group_size"] = options["group_size"]
    return out


def inspect_report(path: Path, d: Detection, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "path": str(path),
        "family": d.family.name,
        "family_title": d.family.title,
        "model_type": d.model_type,
        "layers": {
            "num_hidden_layers": d.num_layers,
            "dense": d.dense_layers,
            "moe": d.moe_layers,
            "mtp": d.mtp_layers,
        },
        "experts": {
            "per_layer": d.experts_per_layer,
            "per_token": d.experts_per_token,
            "shared": d.shared_experts,
            "layout": d.layout.kind,
            "gate_up_interleaved": d.layout.gate_up_interleaved,
            "hidden_size": d.hidden_size,
            "intermediate_size": d.expert_intermediate_size,
        },
        "expert_format": {"name": d.expert_format.name, **d.expert_format.params},
        "expert_tensors": d.expert_tensors,
        "router_tensors": d.router_tensors,
        "bytes": {
            "total": d.total_bytes,
            "experts": d.expert_bytes,
            "non_expert": d.total_bytes - d.expert_bytes,
            "per_layer": {
                str(L): {"total": d.layer_bytes[L], "experts": d.layer_expert_bytes.get(L, 0)}
                for L in sorted(d.layer_bytes)
            },
        },
        "warnings": d.warnings,
        "written_by": written_by(recipe or {}),
        # every stack of layers with experts (Qwen3-Omni: thinker, talker), each with its own sizes
        "stacks": [
            {
                "prefix": st.prefix,
                "layers": list(st.layers),
                "config": st.config,
                "experts": st.experts,
                "hidden_size": st.hidden_size,
                "intermediate_size": st.expert_intermediate_size,
            }
            for st in d.stacks
        ]
        if len(d.stacks) > 1
        else [],
    }


def kt_report(path: Path, kt: KtLayout, meta: dict[str, str], form: str) -> dict[str, Any]:
    """What `inspect` says of a kt-kernel output moeport wrote (merged or folders)."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return {
        "path": str(path),
        "kind": "kt",
        "kt_layout": form,
        "method": kt.method,
        "threadpool_count": kt.tp,
        "layers": list(kt.layers),
        "experts": {
            "per_layer": kt.experts,
            "hidden_size": kt.hidden,
            "intermediate_size": kt.inter,
        },
        "source_family": meta.get("source_family", ""),
        "source_format": meta.get("source_format", ""),
        "bytes": {"total": sum(p.stat().st_size for p in files)},
    }
