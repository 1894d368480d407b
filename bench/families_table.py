"""README's table of MoE model types x jobs, generated from tests/test_zoo_derived*.py's results.

Runs those test modules (test_zoo_derived.py and test_zoo_derived_experts.py, in this process,
with MOEPORT_FAMILY_RESULTS pointing at a temporary file the tests record each job's outcome in),
then prints the table as Markdown; `--write` replaces the
table between README's `<!-- families-table -->` markers. Nothing in the table is typed by hand.

    PYTHONPATH=src python bench/families_table.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("inspect", "round trip", "logits", "w4a16", "kt-int4")
MARK = {"ok": "✓", "skip": "skip", None: "–"}


def run_tests(results: Path) -> dict[str, dict[str, str]]:
    import pytest

    os.environ["MOEPORT_FAMILY_RESULTS"] = str(results)
    sys.path.insert(0, str(ROOT / "tests"))
    tests = [str(ROOT / "tests" / name) for name in ("test_zoo_derived.py", "test_zoo_derived_experts.py")]
    code = pytest.main(["-q", "-p", "no:cacheprovider", *tests])
    if code not in (0, 1):
        raise SystemExit(f"pytest exited {code}")
    return json.loads(results.read_text()) if results.exists() else {}


def table(results: dict[str, dict[str, str]]) -> str:
    from moeport.zoo.support import all_support

    rows = ["| model_type | support | " + " | ".join(JOBS) + " |", "|---|---|" + "---|" * len(JOBS)]
    for s in all_support():
        if s.how == "not":
            continue
        got = results.get(s.model_type, {})
        build = " (tiny model not buildable)" if got.get("build") == "skip" else ""
        cells = [MARK.get(got.get(job), got.get(job, "–")) for job in JOBS]
        rows.append(f"| `{s.model_type}` | {s.how}{build} | " + " | ".join(cells) + " |")
    counts = {h: sum(x.how == h for x in all_support()) for h in ("zoo", "derived", "not")}
    summary = (
        f"{counts['zoo']} zoo, {counts['derived']} derived, {counts['not']} not supported "
        "(`moeport inspect --families` lists every one with the reason); ✓ passed, skip: transformers' "
        "own forward fails on the tiny model, –: not run (the tiny model could not be built); kt-int4 of "
        "transposed, gate/up-interleaved or separate gate and up stacks (Llama-4, Inkling, Step-3.7) goes "
        "through `--to hf --layout linear` first, as its refusal says; "
        "refused: kt-kernel's pre-flight refusal in one line (its AMX experts have no bias term and are "
        "gated SwiGLU only)."
    )
    return "\n".join(rows) + "\n\n" + summary + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = table(run_tests(Path(tmp) / "results.json"))
    print(text)
    if args.write:
        readme = ROOT / "README.md"
        marked = re.compile(r"(<!-- families-table -->\n).*?(<!-- /families-table -->)", re.S)
        old = readme.read_text()
        if not marked.search(old):
            raise SystemExit("README.md has no <!-- families-table --> markers")
        readme.write_text(marked.sub(lambda m: m[1] + text + m[2], old))


if __name__ == "__main__":
    main()
