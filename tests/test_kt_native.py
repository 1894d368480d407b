"""kt-kernel's native methods read our Hugging Face outputs: KTMoEWrapper's own forward on them
matches a float reference of the same experts (kt-kernel from PyPI; skips without AVX-512)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kt_support import import_kt, kt_wrapper
from safetensors import safe_open
from test_convert_kt import I_SIZE, TOPK, E, H, _torch_moe, kt_checkpoint  # noqa: F401 - fixture

from moeport.codecs import PackQuantizedCodec
from moeport.verify.run import verify


def _convert(src, dst, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moeport", "convert", str(src), str(dst), "--quiet", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def _forward(monkeypatch, path, layer: int, method: str, x, ids, weights) -> torch.Tensor:
    _, experts_base = import_kt()
    monkeypatch.setenv("KT_FORCE_SYNC_SUBMIT", "1")
    monkeypatch.setattr(experts_base.KExpertsCPUBuffer, "temp_bs", 0)
    wrapper = kt_wrapper(monkeypatch, path, layer, E, TOPK, H, I_SIZE, method, 1, cpu_save=False)
    wrapper.load_weights(torch.arange(E, dtype=torch.int64))
    out = wrapper.forward(x, ids, weights, 0).float().clone()
    del wrapper
    return out


def _int4_experts(path, layer: int) -> list[tuple[torch.Tensor, ...]]:
    """Each expert's gate/up/down as the INT4 output stores them, decoded independently."""
    codec = PackQuantizedCodec(bits=4, group_size=32)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return [
            tuple(
                codec.decode(
                    {p: f.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{n}.{p}") for p in codec.required}
                )
                for n in ("gate_proj", "up_proj", "down_proj")
            )
            for e in range(E)
        ]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe", "glm_moe_dsa"])
def test_rawint4_output_runs_in_kt_kernel(monkeypatch, kt_checkpoint, tmp_path, model_type):  # noqa: F811
    import_kt()
    src, dst = kt_checkpoint(model_type), tmp_path / "raw"
    result = _convert(src, dst, "--to", "kt-rawint4")
    assert result.returncode == 0, result.stderr
    assert verify(src, dst).ok
    g = torch.Generator().manual_seed(3)
    layer = max(int(k.split(".")[2]) for k in _keys(dst) if ".experts." in k)
    x = torch.randn(8, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(8)])
    weights = torch.rand(8, TOPK, generator=g)
    got = _forward(monkeypatch, dst, layer, "RAWINT4", x, ids, weights)
    want = _torch_moe(x, ids, weights, _int4_experts(dst, layer))
    err = float((got - want).norm() / want.norm())
    assert err < 0.03, f"{model_type}: relative error {err:.4f} against the stored INT4 experts"


def _keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_rawint4_refuses_names_kt_cannot_find(kt_checkpoint, tmp_path):  # noqa: F811
    result = _convert(kt_checkpoint("minimax_m2"), tmp_path / "raw", "--to", "kt-rawint4")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "RAWINT4 loader reads experts named" in result.stderr and "block_sparse_moe" in result.stderr
    assert not (tmp_path / "raw").exists()
