"""Session-cached checkpoint factory (see fixtures.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures import build_transformers_checkpoint, quantize_fp8_block

# transformers 5.25 loads with Hub kernels by default (`from_pretrained(use_kernels=None)` means
# on) and refuses when the `kernels` package is absent (not on PyPI); the tests compare
# transformers' eager CPU forwards, as transformers' own tests do (testing_utils.scoped_non_kernels)
os.environ.setdefault("USE_HUB_KERNELS", "NO")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """checkpoint(model_type, layout='hub'|'fused', fmt='bf16'|'fp8-block') -> folder, built once."""
    cache: dict[tuple[str, str, str], Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(model_type: str, layout: str = "hub", fmt: str = "bf16") -> Path:
        key = (model_type, layout, fmt)
        if key not in cache:
            out = root / "-".join(key)
            if fmt == "bf16":
                cache[key] = build_transformers_checkpoint(model_type, layout, out)
            elif fmt == "fp8-block":
                cache[key] = quantize_fp8_block(make(model_type, layout, "bf16"), out)
            else:
                raise ValueError(fmt)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny DeepSeek-V3-shaped checkpoint (seeded random weights), written once;
    tests copy it before changing anything."""
    from moeport.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("tiny") / "ds"
    write_synthetic(out, SyntheticSpec.tiny())
    return out


@pytest.fixture
def main(monkeypatch, capsys):
    """The CLI in this process (saves torch's import per call): main(*args) -> (exit code,
    stdout, stderr)."""
    from moeport.cli.app import main as cli_main

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["moeport", *map(str, args)])
        try:
            cli_main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        cap = capsys.readouterr()
        return code, cap.out, cap.err

    return run
