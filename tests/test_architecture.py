"""The shape of the house: small modules, imports that flow one way, one registry of targets and
one of formats that everything else reads."""

from __future__ import annotations

import ast
from pathlib import Path

import moeport
from moeport.codecs.registry import FORMATS
from moeport.recipes import TARGETS

SRC = Path(moeport.__file__).parent
MAX_LINES = 400


def modules() -> dict[str, Path]:
    return {
        ".".join(("moeport", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """moeport modules imported when `path` is imported (imports inside functions are deferred)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            # `from pkg import submodule` needs the submodule; `from pkg import name`, pkg's __init__
            names = [n for n in subs if n in known] or [node.module]
        found.update(n for n in names if n in known)
    return found


def test_no_source_file_over_the_limit():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_imports_flow_one_way():
    """No import circle among moeport's modules (module-level imports; `from pkg import x` counts as
    importing the package's __init__)."""
    mods = modules()
    graph = {name: top_level_imports(path, set(mods)) - {name} for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep]
                raise AssertionError(" -> ".join(cycle))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cli_offers_exactly_the_registered_targets():
    from typer.testing import CliRunner

    from moeport.cli.app import app

    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # help panels wrap inside their box
    for name, target in TARGETS.items():
        assert f"{name}: {' '.join(target.help.split())}" in text, name


def test_every_target_and_format_is_registered_once():
    assert len(TARGETS) == len({t.name for t in TARGETS.values()})
    names = [(f.name, f.variant) for f in FORMATS]
    assert len(names) == len(set(names)), names
