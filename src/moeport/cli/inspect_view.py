"""How `moeport inspect` shows its report on a terminal (`--json` prints the report itself)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moeport.report import ranges
from moeport.sizes import format_size


def print_layer_bytes(out: Console, per_layer: dict[str, dict[str, int]]) -> None:
    t = Table(title="bytes per layer", title_justify="left")
    for col in ("layer", "total", "experts"):
        t.add_column(col, justify="right")
    for layer, b in per_layer.items():
        t.add_row(layer, format_size(b["total"]), format_size(b["experts"]))
    out.print(t)


def print_kt(out: Console, r: dict) -> None:
    """A kt-kernel output in kt's own layout (merged or folders)."""
    ex = r["experts"]
    t = Table(show_header=False, title=f"[bold]{escape(r['path'])}[/]", title_justify="left")
    t.add_column(style="cyan")
    t.add_column()
    t.add_row("kind", f"kt-kernel CPU experts, {r['kt_layout']} form")
    t.add_row("method", f"{r['method']}, T={r['threadpool_count']} (--numa)")
    t.add_row("layers", f"{len(r['layers'])}: {ranges(r['layers'])}")
    t.add_row(
        "experts",
        f"{ex['per_layer']} per layer; hidden {ex['hidden_size']}, intermediate {ex['intermediate_size']}",
    )
    t.add_row("source", escape(f"{r['source_family'] or '?'}, {r['source_format'] or '?'}"))
    t.add_row("bytes", f"total {format_size(r['bytes']['total'])}")
    out.print(t)


def _stated(value: int | None) -> str:
    """A fact config.json states, else '-' (Switch's and NLLB-MoE's top-k is fixed by their router
    class, Doge's experts are embedding rows, ERNIE-4.5-VL's groups have unequal widths)."""
    return "-" if value is None else str(value)


def print_inspect(out: Console, r: dict) -> None:
    """A Hugging Face checkpoint (or a GGUF read as one): one row per fact of the report."""
    ex, lay, by = r["experts"], r["layers"], r["bytes"]
    t = Table(show_header=False, title=f"[bold]{escape(str(r['path']))}[/]", title_justify="left")
    t.add_column(style="cyan")
    t.add_column()
    t.add_row("family", f"{r['family_title']} ({r['family']}, model_type {r['model_type']})")
    t.add_row(
        "layers",
        f"{lay['num_hidden_layers']}: dense {ranges(lay['dense'])} | MoE {ranges(lay['moe'])}"
        f" | MTP {ranges(lay['mtp'])}",
    )
    t.add_row(
        "experts",
        f"{ex['per_layer']} routed, {_stated(ex['per_token'])} per token, {ex['shared']} shared; "
        f"hidden {_stated(ex['hidden_size'])}, expert intermediate {_stated(ex['intermediate_size'])}",
    )
    for st in r.get("stacks", []):  # several stacks: each with its own layers and sizes
        t.add_row(
            "stack",
            escape(
                f"{st['prefix']}: layers {ranges(st['layers'])}, {st['experts']} routed; hidden "
                f"{st['hidden_size']}, expert intermediate {st['intermediate_size']} "
                f"({st['config'] or 'config.json'})"
            ),
        )
    t.add_row("layout", ex["layout"] + (" (gate/up interleaved)" if ex["gate_up_interleaved"] else ""))
    fmt = r["expert_format"]
    t.add_row("expert format", fmt["name"] + "".join(f", {k}={v}" for k, v in fmt.items() if k != "name"))
    t.add_row("expert tensors", escape("\n".join(r["expert_tensors"])))
    t.add_row("router", escape("\n".join(r["router_tensors"])) or "-")
    total, experts, other = (format_size(by[k]) for k in ("total", "experts", "non_expert"))
    t.add_row("bytes", f"total {total}, experts {experts}, non-expert {other}")
    per_layer = by["per_layer"]
    if per_layer:
        sizes = [v["total"] for v in per_layer.values()]
        t.add_row(
            "bytes per layer", f"{len(sizes)} layers, {format_size(min(sizes))} to {format_size(max(sizes))}"
        )
    made = r["written_by"]
    if made:
        opts = ", ".join(f"{k}={v}" for k, v in made["options"].items())
        t.add_row("written by", escape(f"moeport --to {made['target']} ({opts}) from {made['source']}"))
    if "kt_method" in made:
        group = f", group size {made['kt_group_size']}" if "kt_group_size" in made else ""
        t.add_row("kt-kernel", f"method {made['kt_method']}{group}: its native loader reads this folder")
    for w in r["warnings"]:
        t.add_row("[yellow]warning[/]", escape(w))
    out.print(t)
