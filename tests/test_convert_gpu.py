"""`--to w4a16|w8a16|fp8|fp8-block`: transformers (with compressed-tensors) loads what we write.

The error bound of each output comes from llmcompressor's own RTN (model-free PTQ) on the same
fixture, measured in the same test, when llmcompressor is installed (in its own venv: it pins its
own compressed-tensors; `MOEPORT_LLMC_PYTHON` or `.llmc/bin/python`); otherwise that part skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors

from moeport.codecs import PackQuantizedCodec
from moeport.convert.execute import execute
from moeport.detect import detect
from moeport.errors import MoeportError
from moeport.recipes.gpu import Recipe, plan_gpu
from moeport.sources import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = os.environ.get("MOEPORT_LLMC_PYTHON") or str(ROOT / ".llmc" / "bin" / "python")
HAVE_LLMC = Path(LLMC_PYTHON).exists()
LLMC_CHILD = r"""
import sys, json
from compressed_tensors.quantization import QuantizationScheme, QuantizationArgs
from llmcompressor.entrypoints.model_free import model_free_ptq
src, dst, weights, ignore = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
model_free_ptq(src, dst, scheme=scheme, ignore=ignore, max_workers=1, device="cpu")
"""
# llmcompressor ignore patterns equivalent to our --targets experts on the fixtures. Its model-free
# PTQ takes every 2-D `.weight` for a Linear: without the embed_tokens pattern it quantizes the
# embedding, which transformers then cannot load (missing model.embed_tokens.weight).
NOT_EXPERTS = [
    "lm_head",
    "re:.*embed_tokens.*",
    "re:.*self_attn.*",
    "re:.*mlp\\.gate$",
    "re:.*shared_expert.*",
]


def convert(src: Path, out: Path, recipe: Recipe) -> None:
    with open_checkpoint(src) as ck:
        execute(plan_gpu(ck, detect(ck), recipe), ck, out, 5 * 10**9, {})


def llmcompressor(src: Path, out: Path, weights: dict, ignore: list[str]) -> None:
    args = [LLMC_PYTHON, "-c", LLMC_CHILD, str(src), str(out), json.dumps(weights), json.dumps(ignore)]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{path}: {kind} {sorted(info[kind])[:5]}"
    return model.eval()


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = [  # (scheme, group size, llmcompressor weights args or None)
    ("w4a16", 32, {"type": "int", "num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}),
    ("w8a16", 32, {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 32}),
    ("fp8", None, {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "channel"}),
    ("fp8-block", None, None),
]


@pytest.mark.parametrize(("scheme", "group", "llmc_weights"), CASES)
@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_transformers_loads_our_output_with_error_within_llmcompressor_bound(
    checkpoint, tmp_path, scheme, group, llmc_weights, layout
) -> None:
    src = checkpoint("qwen3_moe", layout, "bf16")
    reference = logits(load(checkpoint("qwen3_moe", "hub", "bf16")))
    convert(src, tmp_path / "ours", Recipe(scheme, group_size=group, targets="experts"))
    ours = rel(logits(load(tmp_path / "ours")), reference)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    names = load_tensors(tmp_path / "ours")
    expert = "model.layers.1.mlp.experts.2.up_proj."
    if scheme in ("w4a16", "w8a16"):
        assert config["format"] == "pack-quantized"
        assert {expert + p for p in ("weight_packed", "weight_scale", "weight_shape")} <= set(names)
    print(f"{scheme} from {layout}: relative logit error {ours:.5f}")
    assert ours < (0.02 if scheme == "w4a16" else 0.005)
    if llmc_weights is None or not HAVE_LLMC:
        return
    llmcompressor(checkpoint("qwen3_moe", "hub", "bf16"), tmp_path / "llmc", llmc_weights, NOT_EXPERTS)
    theirs = rel(logits(load(tmp_path / "llmc")), reference)
    print(f"  llmcompressor: {theirs:.5f}")
    assert ours <= theirs * 1.05 + 1e-5


@pytest.mark.skipif(not HAVE_LLMC, reason=f"llmcompressor not installed ({LLMC_PYTHON} missing)")
def test_same_packing_and_scales_as_llmcompressor(checkpoint, tmp_path) -> None:
    """Same names, dtypes, shapes and packing; codes/scales differ only where llmcompressor divides in
    bf16 (we divide in float32): scales within one bf16 step, nearly all codes equal."""
    src = checkpoint("qwen3_moe", "hub", "bf16")
    convert(src, tmp_path / "ours", Recipe("w4a16", group_size=32, targets="experts"))
    llmcompressor(src, tmp_path / "llmc", CASES[0][2], NOT_EXPERTS)
    ours, theirs = load_tensors(tmp_path / "ours"), load_tensors(tmp_path / "llmc")
    assert sorted(ours) == sorted(theirs)
    same_codes = total_codes = 0
    for name, t in theirs.items():
        o = ours[name]
        assert (o.dtype, o.shape) == (t.dtype, t.shape), name
        if name.endswith("weight_scale"):
            assert torch.allclose(o.float(), t.float(), rtol=2**-7, atol=0), name
        elif name.endswith("weight_packed"):
            nib = [((x.view(torch.int32) >> (4 * i)) & 0xF) for i in range(8) for x in (o, t)]
            for i in range(0, len(nib), 2):
                same_codes += int((nib[i] == nib[i + 1]).sum())
                total_codes += nib[i].numel()
        else:
            assert torch.equal(o, t), name
    # where a scale differs by one bf16 step, codes of that group shift: ~1% of codes here
    assert same_codes / total_codes > 0.97, f"{same_codes}/{total_codes} codes equal"
    # and our weights are at least as close to the source as llmcompressor's
    codec, source = PackQuantizedCodec(bits=4, group_size=32), load_tensors(src)
    for name in [k for k in theirs if k.endswith("weight_packed")]:
        base = name.removesuffix("weight_packed")
        w = source[base + "weight"].float()
        err = [rel(codec.decode({p: t[base + p] for p in codec.required}), w) for t in (ours, theirs)]
        assert err[0] <= err[1] * 1.001, f"{base}: ours {err[0]:.5f} vs llmcompressor {err[1]:.5f}"


def test_fp8_block_source_to_w4a16_all_linear_without_bf16_copy(checkpoint, tmp_path) -> None:
    """DeepSeek FP8 (block 32) -> W4A16: decoded in float32 per weight, never written as BF16."""
    src = checkpoint("qwen3_moe", "fused", "fp8-block")
    convert(src, tmp_path / "out", Recipe("w4a16", group_size=32, targets="all-linear"))
    names = load_tensors(tmp_path / "out")
    assert not any(k.endswith("scale_inv") for k in names)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert names["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router is never quantized
    reference = logits(load(checkpoint("qwen3_moe", "hub", "bf16")))
    assert rel(logits(load(tmp_path / "out")), reference) < 0.3


def test_unsuitable_group_size_is_a_clear_error(checkpoint) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    wanted = "--group-size 48: .*down_proj.weight has 32 input columns.*use --group-size 32"
    with open_checkpoint(src) as ck, pytest.raises(MoeportError, match=wanted):
        plan_gpu(ck, detect(ck), Recipe("w4a16", group_size=48))


@pytest.mark.parametrize(("scheme", "group"), [("mxfp4", 32), ("nvfp4", 16)])
def test_fp4_refuses_weights_its_fixed_group_does_not_divide(tmp_path, scheme, group) -> None:
    """Tiny Qwen3-MoE written by transformers with expert intermediate 40: down_proj's K is no
    multiple of MXFP4's 32 or NVFP4's 16. One line naming the weight (was a reshape traceback)."""
    from test_zoo_derived import _save_tiny

    from moeport.recipes import fp4

    src = _save_tiny("qwen3_moe", tmp_path / "src", inter=40)
    wanted = f"--to {scheme}: .*down_proj.weight has 40 input columns, not a multiple of the {group} a scale"
    with open_checkpoint(src) as ck, pytest.raises(MoeportError, match=wanted) as exc:
        plan_gpu(ck, detect(ck), fp4.Recipe(scheme))
    assert "\n" not in str(exc.value) and "--ignore" in str(exc.value)


def test_cli_writes_w8a16_per_channel_and_refuses_bad_options(checkpoint, tmp_path) -> None:
    import sys

    src = checkpoint("qwen3_moe", "hub", "bf16")
    base = [sys.executable, "-m", "moeport", "convert", str(src)]
    args = ["--to", "w8a16", "--group-size", "0", "--targets", "all-linear", "--ignore", r"o_proj", "--quiet"]
    ok = subprocess.run([*base, str(tmp_path / "w8"), *args], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    config = json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    names = load_tensors(tmp_path / "w8")
    assert "model.layers.1.mlp.experts.0.up_proj.weight_packed" in names
    assert "model.layers.1.self_attn.q_proj.weight_packed" in names
    assert names["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16  # --ignore kept it
    assert "model.layers.1.self_attn.o_proj" in config["ignore"]
    reference = logits(load(checkpoint("qwen3_moe", "hub", "bf16")))
    assert rel(logits(load(tmp_path / "w8")), reference) < 0.01
    bad = subprocess.run(
        [*base, str(tmp_path / "x"), "--to", "w4a16", "--layout", "fused"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and not (tmp_path / "x").exists()
    assert bad.stderr == (
        "error: --layout: not an option of --to w4a16 (it takes --group-size, --targets, --ignore, "
        "--max-shard-size, --allow-nonfinite, --method, --calibration, --samples, --seq-len, "
        "--dampening, --act-order, --all-experts, --spill-states)\n"
    )


@pytest.mark.skipif(not HAVE_LLMC, reason=f"llmcompressor not installed ({LLMC_PYTHON} missing)")
def test_native_int4_in_the_same_scheme_is_carried_bit_exact(checkpoint, tmp_path) -> None:
    """An INT4 checkpoint written by llmcompressor in Kimi-K2's scheme (pack-quantized, symmetric,
    group 32) into --to w4a16 --group-size 32: codes and scales come out as stored, not requantized;
    transformers loads it; another group size is requantized from the decoded values."""
    from moeport.verify.run import verify

    int4 = tmp_path / "int4"
    llmcompressor(checkpoint("qwen3_moe", "hub", "bf16"), int4, CASES[0][2], NOT_EXPERTS)
    convert(int4, tmp_path / "same", Recipe("w4a16", group_size=32))
    source, same = load_tensors(int4), load_tensors(tmp_path / "same")
    experts = [k for k in source if ".experts." in k]
    assert experts and all(torch.equal(same[k], source[k]) for k in experts)
    report = verify(int4, tmp_path / "same")
    assert report.ok and all(t.exact for t in report.tensors if ".experts." in t.name)
    load(tmp_path / "same")
    convert(int4, tmp_path / "other", Recipe("w4a16", group_size=16))
    other, scale = load_tensors(tmp_path / "other"), "model.layers.1.mlp.experts.2.up_proj.weight_scale"
    assert other[scale].shape[-1] == 2 * source[scale].shape[-1]  # groups of 16: requantized
