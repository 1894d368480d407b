"""kt-kernel's native methods read our Hugging Face outputs: KTMoEWrapper's own forward on them
matches a float reference of the very experts stored (decoded by moeport's canonical reader), and
a source already in the method's numbers is carried bit-exact (kt-kernel from PyPI; skips without
AVX-512)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fixtures import load_tensors
from kt_support import import_kt, kt_wrapper
from test_convert_kt import FAMILIES, I_SIZE, TOPK, E, H, _torch_moe, kt_checkpoint, main  # noqa: F401 - fixtures

from moeport.detect import detect
from moeport.report import inspect_report
from moeport.sources import open_checkpoint
from moeport.verify.canonical import hf_layers
from moeport.verify.run import recipe_of, verify

CASES = [  # (--to, kt-kernel method, families)
    ("kt-rawint4", "RAWINT4", ["deepseek_v3", "qwen3_moe", "glm_moe_dsa"]),
    ("kt-fp8", "FP8", ["deepseek_v3", "minimax_m2"]),
    ("kt-fp8-perchannel", "FP8_PERCHANNEL", ["qwen3_moe", "minimax_m2"]),
    ("kt-bf16", "BF16", ["glm_moe_dsa", "minimax_m2", "qwen3_moe"]),
    ("kt-gptq-int4", "GPTQ_INT4", ["deepseek_v3", "qwen3_moe", "minimax_m2"]),
    ("kt-mxfp4", "MXFP4", ["deepseek_v4"]),
    ("kt-mxfp8", "MXFP8", ["minimax_m2"]),
]


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


def _stored_experts(path, layer: int, model_type: str) -> list[tuple[torch.Tensor, ...]]:
    """Each expert's gate/up/down as the output stores them, decoded to float32 by moeport."""
    _, _, names, block = FAMILIES[model_type]
    names = names or ("gate_proj", "up_proj", "down_proj")
    with open_checkpoint(path) as ck:
        tensors = next(c.tensors for c in hf_layers(ck) if c.layer == layer)
    return [
        tuple(tensors[f"model.layers.{layer}.{block}.experts.{e}.{n}.weight"] for n in names)
        for e in range(E)
    ]


@pytest.mark.parametrize(
    ("to", "method", "model_type"), [(to, m, f) for to, m, families in CASES for f in families]
)
def test_native_output_runs_in_kt_kernel(monkeypatch, kt_checkpoint, tmp_path, to, method, model_type):  # noqa: F811
    import_kt()
    src, dst = kt_checkpoint(model_type), tmp_path / "out"
    result = _convert(src, dst, "--to", to)
    assert result.returncode == 0, result.stderr
    assert verify(src, dst).ok
    with open_checkpoint(dst) as ck:  # inspect names the method kt-kernel reads the folder with
        made = inspect_report(dst, detect(ck), recipe_of(ck))["written_by"]
    assert (made["target"], made["kt_method"]) == (to, method)
    layer = 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(8)])
    weights = torch.rand(8, TOPK, generator=g)
    got = _forward(monkeypatch, dst, layer, method, x, ids, weights)
    want = _torch_moe(x, ids, weights, _stored_experts(dst, layer, model_type))
    err = float((got - want).norm() / want.norm())
    assert err < 0.03, f"{to} from {model_type}: relative error {err:.4f} against the stored experts"


def test_fp8_source_is_carried_bit_exact_into_kt_fp8(kt_checkpoint, tmp_path):  # noqa: F811
    """DeepSeek-style FP8 (128x128 blocks, F32 scales) -> kt-fp8: the experts' codes and scales as
    the source stores them (no dequantize/requantize round trip)."""
    src = kt_checkpoint("deepseek_v3", (128, 128))
    assert _convert(src, tmp_path / "out", "--to", "kt-fp8").returncode == 0
    source, out = load_tensors(src), load_tensors(tmp_path / "out")
    experts = [k for k in source if ".experts." in k]
    assert experts and all(
        torch.equal(out[k].view(torch.uint8), source[k].view(torch.uint8)) for k in experts
    )


def test_names_kt_cannot_find_are_refused(kt_checkpoint, tmp_path):  # noqa: F811
    result = _convert(kt_checkpoint("minimax_m2"), tmp_path / "raw", "--to", "kt-rawint4")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "RAWINT4 loader reads experts named" in result.stderr and "block_sparse_moe" in result.stderr
    assert not (tmp_path / "raw").exists()


def _mxfp4_expert(n: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """DeepSeek-V4-Flash's routed experts: I8 E2M1 pairs + F8_E8M0 `scale` per 32 (random codes)."""
    scale = torch.randint(116, 122, (n, k // 32), generator=g, dtype=torch.uint8)
    codes = torch.randint(-128, 128, (n, k // 2), generator=g, dtype=torch.int8)
    return {"weight": codes, "scale": scale.view(torch.float8_e8m0fnu)}


def _mxfp8_expert(n: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """MiniMax-M3's experts: E4M3 codes (no NaN 0x7F/0xFF) + U8 E8M0 `weight_scale_inv` per 32."""
    codes = torch.randint(0, 255, (n, k), generator=g, dtype=torch.uint8)
    codes = torch.where((codes & 0x7F) == 0x7F, codes - 1, codes)
    scale = torch.randint(116, 122, (n, k // 32), generator=g, dtype=torch.uint8)
    return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale_inv": scale}


def _gptq_expert(n: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """AutoGPTQ v1, symmetric, group 128, no act-order: random codes, zero 8 stored as 7."""
    groups = k // 128
    return {
        "qweight": torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=g, dtype=torch.int32),
        "qzeros": torch.full((groups, n // 8), 0x77777777, dtype=torch.int32),
        "scales": (torch.rand(groups, n, generator=g) * 0.002 + 0.001).half(),
        "g_idx": (torch.arange(k) // 128).to(torch.int32),
    }


def _fp8_config(block: list[int]) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
        "scale_fmt": "ue8m0",
    }


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
# --to: (kt method, family, expert maker, quantization_config, other config.json keys)
STORED_SOURCES = {
    "kt-mxfp4": ("MXFP4", "deepseek_v4", _mxfp4_expert, _fp8_config([128, 128]), {"expert_dtype": "fp4"}),
    "kt-mxfp8": ("MXFP8", "minimax_m2", _mxfp8_expert, _fp8_config([1, 32]), {}),
    "kt-gptq-int4": ("GPTQ_INT4", "deepseek_v3", _gptq_expert, GPTQ_CONFIG, {}),
}


def _stored_source(to: str, bf16, out):
    """`bf16` with its routed experts stored as the release kt's method is built for stores them."""
    import json

    from safetensors.torch import save_file

    _, _, expert, quant, top = STORED_SOURCES[to]
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, t in load_tensors(bf16).items():
        if ".experts." in name:
            base = name.removesuffix("weight")
            tensors |= {base + part: v for part, v in expert(*t.shape, g).items()}
        else:
            tensors[name] = t
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text()) | top | {"quantization_config": quant}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("to", list(STORED_SOURCES))
def test_stored_source_is_carried_bit_exact(monkeypatch, kt_checkpoint, tmp_path, to):  # noqa: F811
    """DeepSeek-V4 MXFP4 -> kt-mxfp4, MiniMax-M3-style MXFP8 -> kt-mxfp8, symmetric GPTQ -> kt-gptq-int4:
    experts as stored (verify: bit-exact), and kt-kernel's forward on our output equals its forward
    on the source folder itself."""
    import_kt()
    method, family, expert, _, _ = STORED_SOURCES[to]
    src = _stored_source(to, kt_checkpoint(family), tmp_path / "src")
    dst = tmp_path / "out"
    result = _convert(src, dst, "--to", to)
    assert result.returncode == 0, result.stderr
    source, out = load_tensors(src), load_tensors(dst)
    experts = [k for k in source if ".experts." in k and "shared" not in k]
    assert len(experts) == 2 * 3 * E * len(expert(32, 256, torch.Generator())) and all(
        out[k].dtype == source[k].dtype and torch.equal(out[k].view(torch.uint8), source[k].view(torch.uint8))
        for k in experts
    )
    report = verify(src, dst)
    assert report.ok and all(r.exact for r in report.tensors if ".experts." in r.name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(8)])
    weights = torch.rand(8, TOPK, generator=g)
    assert torch.equal(
        _forward(monkeypatch, dst, 1, method, x, ids, weights),
        _forward(monkeypatch, src, 1, method, x, ids, weights),
    )


@pytest.mark.parametrize(
    ("to", "model_type"),
    [
        ("kt-mxfp4", "deepseek_v3"),
        ("kt-mxfp4", "qwen3_moe"),
        ("kt-mxfp8", "deepseek_v3"),
        ("kt-mxfp8", "qwen3_moe"),
    ],
)
def test_families_kt_mx_loaders_cannot_read_are_refused(main, kt_checkpoint, tmp_path, to, model_type):  # noqa: F811
    """kt-kernel's MXFP4 loader reads only DeepSeek-V4's expert names (`ffn.experts.{E}.w1`), its
    MXFP8 loader only MiniMax's (`block_sparse_moe.experts.{E}.w1`). In this process (the one-line
    rule itself: test_names_kt_cannot_find_are_refused)."""
    code, _, err = main("convert", str(kt_checkpoint(model_type)), str(tmp_path / "out"), "--to", to)
    assert code == 2 and "loader reads experts named" in err and not (tmp_path / "out").exists()


def test_gptq_config_says_only_routed_experts_are_quantized(kt_checkpoint, tmp_path):  # noqa: F811
    """kt-gptq-int4's config.json, as SGLang/vLLM apply GPTQModel's `dynamic` rules (a `-:` regex
    re.match'ed on a module name skips its quantization): every module stored as `qweight` is
    quantized, every other linear (attention, shared experts, dense MLP, router) is not."""
    import json
    import re

    dst = tmp_path / "out"
    assert _convert(kt_checkpoint("deepseek_v3"), dst, "--to", "kt-gptq-int4").returncode == 0
    quant = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert quant["sym"] is True and quant["desc_act"] is False and quant["bits"] == 4
    skips = [re.compile(k.removeprefix("-:")) for k in quant["dynamic"] if k.startswith("-:")]

    def skipped(module: str) -> bool:
        return any(r.match(module) for r in skips)

    tensors = load_tensors(dst)
    quantized = {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}
    kept = {k.removesuffix(".weight") for k, t in tensors.items() if k.endswith(".weight") and t.dim() == 2}
    assert len(quantized) == 2 * 3 * E and not any(skipped(m) for m in quantized)
    assert any("self_attn" in m for m in kept) and any("shared_experts" in m for m in kept)
    assert all(skipped(m) for m in kept - {"lm_head", "model.embed_tokens"})
    assert not skipped("model.layers.1.mlp.experts")  # the fused MoE layer a server builds


def test_compressed_tensors_mxfp4_moves_into_kt_mxfp4_unchanged(main, kt_checkpoint, tmp_path):  # noqa: F811
    """DeepSeek-V4 -> `--to mxfp4` (compressed-tensors `weight_packed`/`weight_scale`) -> kt-mxfp4:
    the same code and scale bytes under DeepSeek-V4's names and dtypes, verify bit-exact."""
    ct, dst = tmp_path / "ct", tmp_path / "out"
    assert main("convert", str(kt_checkpoint("deepseek_v4")), str(ct), "--to", "mxfp4", "--quiet")[0] == 0
    assert main("convert", str(ct), str(dst), "--to", "kt-mxfp4", "--quiet")[0] == 0
    source, out = load_tensors(ct), load_tensors(dst)
    packed = [k.removesuffix("weight_packed") for k in source if k.endswith(".weight_packed")]
    assert len(packed) == 2 * 3 * E and all(
        out[b + "weight"].dtype == torch.int8
        and torch.equal(out[b + "weight"].view(torch.uint8), source[b + "weight_packed"])
        and out[b + "scale"].dtype == torch.float8_e8m0fnu
        and torch.equal(out[b + "scale"].view(torch.uint8), source[b + "weight_scale"])
        for b in packed
    )
    report = verify(ct, dst)
    assert report.ok and all(r.exact for r in report.tensors)


@pytest.mark.parametrize(("to", "group"), [("kt-fp8", 128), ("kt-gptq-int4", 128)])
def test_k_not_a_multiple_of_the_kernels_group_is_refused(main, checkpoint, tmp_path, to, group):  # noqa: F811
    """Tiny Qwen3-MoE: hidden 64. kt-kernel derives its group from the scales and needs K % group == 0."""
    code, out, err = main("convert", str(checkpoint("qwen3_moe")), str(tmp_path / "o"), "--to", to)
    assert code == 2 and not (tmp_path / "o").exists()
    assert f"reads one scale per {group} input columns, and Qwen3" in err
    assert "hidden size 64 is not a multiple" in err
