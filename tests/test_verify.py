"""`moeport verify` catches planted faults, naming the tensor, in lossless and lossy conversions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from moeport.cli.convert import RunFlags, run_convert
from moeport.convert.execute import execute
from moeport.detect import detect
from moeport.recipes import Options
from moeport.recipes.gpu import Recipe, plan_gpu
from moeport.sources import open_checkpoint
from moeport.verify.run import verify

L1 = "model.layers.1.mlp.experts."


def hf(src: Path, out: Path, layout: str) -> Path:
    run_convert(
        src, out, "hf", Options(layout=layout), RunFlags(overwrite=True, quiet=True), Console(quiet=True)
    )
    return out


def plant(folder: Path, edit) -> Path:
    """Change tensors of an output in place (keeping its metadata), as a faulty converter would."""
    shard = folder / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(shard), metadata=meta)
    return folder


@pytest.fixture()
def fused_fp8(checkpoint, tmp_path) -> tuple[Path, Path]:
    src = checkpoint("qwen3_moe", "hub", "fp8-block")
    return src, hf(src, tmp_path / "fused", "fused")


def test_clean_lossless_conversion_passes(fused_fp8) -> None:
    report = verify(*fused_fp8)
    assert report.lossless and report.ok
    assert all(t.exact for t in report.tensors) and len(report.tensors) > 40


def _flagged(report) -> set[str]:
    return {t.name for t in report.flagged}


def test_flipped_scale_is_caught(fused_fp8) -> None:
    def flip(t):
        t[L1 + "gate_up_proj_scale_inv"][2, 1, 0] *= -1  # expert 2, rows 32..63 = up

    report = verify(fused_fp8[0], plant(fused_fp8[1], flip))
    assert not report.ok and _flagged(report) == {L1 + "2.up_proj.weight"}


def test_swapped_experts_are_caught(fused_fp8) -> None:
    def swap(t):
        for name in (L1 + "down_proj", L1 + "down_proj_scale_inv"):
            t[name] = t[name][[0, 3, 2, 1]].contiguous()

    report = verify(fused_fp8[0], plant(fused_fp8[1], swap))
    assert _flagged(report) == {L1 + "1.down_proj.weight", L1 + "3.down_proj.weight"}


def test_missing_tensor_is_caught(fused_fp8) -> None:
    victim = "model.layers.0.self_attn.o_proj"
    report = verify(
        fused_fp8[0],
        plant(fused_fp8[1], lambda t: [t.pop(victim + s) for s in (".weight", ".weight_scale_inv")]),
    )
    assert report.missing == [victim + ".weight"] and not report.ok


def test_transposed_weight_is_caught(checkpoint, tmp_path) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    out = hf(src, tmp_path / "fused", "fused")
    name = "model.layers.2.self_attn.o_proj.weight"  # square [64, 64]: shapes alone do not tell
    report = verify(src, plant(out, lambda t: t.__setitem__(name, t[name].t().contiguous())))
    assert _flagged(report) == {name}


def test_lossy_conversion_passes_and_a_corrupted_scale_is_an_outlier(checkpoint, tmp_path) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    out = tmp_path / "w4a16"
    with open_checkpoint(src) as ck:
        execute(plan_gpu(ck, detect(ck), Recipe("w4a16", group_size=32)), ck, out, 5 * 10**9, {})
    clean = verify(src, out)
    assert not clean.lossless and clean.ok
    errors = [t.rel_l2 for t in clean.tensors if ".experts." in t.name]
    assert 0.05 < max(errors) < 0.2  # INT4 g32 RTN on gaussian weights

    def corrupt(t):
        t[L1 + "3.gate_proj.weight_scale"][5, 1] *= 16

    report = verify(src, plant(out, corrupt))
    assert _flagged(report) == {L1 + "3.gate_proj.weight"}


def test_cli_json_plot_and_exit_codes(fused_fp8, tmp_path) -> None:
    src, out = fused_fp8
    cmd = [sys.executable, "-m", "moeport", "verify", str(src), str(out)]
    ok = subprocess.run([*cmd, "--json", "--plot", str(tmp_path / "ok.png")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["verdict"] == "ok" and doc["lossless"] and doc["per_layer"]["1"]["tensors"] > 10
    assert (tmp_path / "ok.png").stat().st_size > 1000
    plant(out, lambda t: t.pop("model.norm.weight"))
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and "model.norm.weight" in bad.stdout


def test_verify_copies_are_not_needed(fused_fp8, tmp_path) -> None:
    """verify reads both checkpoints in place and writes nothing next to them."""
    src, out = fused_fp8
    before = sorted(p.name for p in out.iterdir())
    verify(src, out)
    assert sorted(p.name for p in out.iterdir()) == before
    shutil.rmtree(out)


def test_kt_output_is_verified_against_its_source(tmp_path) -> None:
    """kt merged INT4 (T=2) from a transformers-fused source (2 layers): experts found under hub names."""
    from test_convert_kt import _build

    src = _build("qwen3_moe", tmp_path / "src")
    out = tmp_path / "kt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeport",
            "convert",
            str(src),
            str(out),
            "--to",
            "kt-int4",
            "--numa",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = verify(src, out)
    assert report.ok and not report.lossless, [(t.name, t.problem) for t in report.flagged]
    experts = [t for t in report.tensors if ".experts." in t.name]
    assert len(experts) == 2 * 4 * 3 and all(0.05 < t.rel_l2 < 0.2 for t in experts)

    shard = out / "model-kt-layer-00001.safetensors"
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    a, b = "blk.1.ffn_down_exps.0.numa.1.weight", "blk.1.ffn_down_exps.2.numa.1.weight"
    tensors[a], tensors[b] = tensors[b], tensors[a]  # half of two experts' down columns swapped
    save_file(tensors, str(shard), metadata=meta)
    flagged = {t.name for t in verify(src, out).flagged}
    assert flagged == {L1 + "0.down_proj.weight", L1 + "2.down_proj.weight"}


def test_kt_folder_output_is_verified_through_its_layout_description(tmp_path) -> None:
    """kt's folder form (no safetensors at all): experts read back through the description in
    moeport-kt.json, compared with the source's experts; a swapped slice file is flagged."""
    from test_convert_kt import _build

    src = _build("qwen3_moe", tmp_path / "src")
    out = tmp_path / "kt"
    args = [
        "convert",
        str(src),
        str(out),
        "--to",
        "kt-int8",
        "--numa",
        "2",
        "--kt-layout",
        "folders",
        "--quiet",
    ]
    result = subprocess.run([sys.executable, "-m", "moeport", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.safetensors"))
    report = verify(src, out)
    assert report.ok and not report.missing, [(t.name, t.problem) for t in report.flagged]
    experts = [t for t in report.tensors if ".experts." in t.name]
    assert len(report.tensors) == len(experts) == 2 * 4 * 3 and all(t.rel_l2 < 0.02 for t in experts)

    numa = out / "_layer_1" / "_numa_1"
    a, b = sorted(numa.glob("INT8_up_1_*quant_.kt")), sorted(numa.glob("INT8_up_3_*quant_.kt"))
    data_a, data_b = a[0].read_bytes(), b[0].read_bytes()
    a[0].write_bytes(data_b)
    b[0].write_bytes(data_a)
    flagged = {t.name for t in verify(src, out).flagged}
    assert flagged == {L1 + "1.up_proj.weight", L1 + "3.up_proj.weight"}


def test_plot_without_matplotlib_is_refused_before_comparing(fused_fp8, tmp_path) -> None:
    """The missing extra is named in full (rich markup must not eat `[plot]`), before any work."""
    src, out = fused_fp8
    no_matplotlib = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "  # `import matplotlib` raises ImportError
        "runpy.run_module('moeport', run_name='__main__')"
    )
    plot = tmp_path / "x.png"
    cmd = [sys.executable, "-c", no_matplotlib, "verify", str(src), str(out), "--plot", str(plot)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --plot needs matplotlib (pip install 'moeport[plot]')\n"
    assert not plot.exists()


def _resave_without_metadata(folder: Path, edit) -> Path:
    """As another tool would: same tensors, its own metadata (moeport's recipe gone)."""
    shard = folder / "model.safetensors"
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def test_one_changed_element_is_caught_without_moeports_metadata(checkpoint, tmp_path) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    out = hf(src, tmp_path / "hub", "hub")
    victim = L1 + "2.up_proj.weight"

    def poke(t):
        t[victim][3, 5] += 1.0

    report = verify(src, _resave_without_metadata(out, poke))
    assert not report.lossless and _flagged(report) == {victim}
    assert report.flagged[0].problem.endswith("although both sides store it alike")
    lossy = verify(src, out, lossless=False)  # told lossy: its bit-exact peers still give it away
    assert _flagged(lossy) == {victim} and "of its" in lossy.flagged[0].problem


def test_one_bad_group_scale_is_found_and_named(checkpoint, tmp_path) -> None:
    src = checkpoint("qwen3_moe", "hub", "bf16")
    out = tmp_path / "w4a16"
    with open_checkpoint(src) as ck:
        execute(plan_gpu(ck, detect(ck), Recipe("w4a16", group_size=32)), ck, out, 5 * 10**9, {})
    assert verify(src, out).ok

    def triple(t):
        t[L1 + "3.gate_proj.weight_scale"][5, 1] *= 3

    report = verify(src, plant(out, triple))
    victim = L1 + "3.gate_proj.weight"
    assert _flagged(report) == {victim}
    flagged = report.flagged[0]
    assert flagged.rel_l2 < 0.25 and flagged.problem.startswith("row 5, columns 32-63: relative error")


def test_fp8_dequantized_to_bf16_is_rounding_not_bad_scales(checkpoint, tmp_path) -> None:
    """Blocks whose FP8 scale is a power of two come out of a BF16 cast exact, the others off by
    BF16's rounding: against a median block of 0 that read as 'inf x, a bad scale?'. A block
    really changed in the BF16 output is still named."""
    fp8 = shutil.copytree(checkpoint("qwen3_moe", "hub", "fp8-block"), tmp_path / "fp8")

    def powers_of_two_but_one(t):
        for k, v in t.items():
            if k.endswith("weight_scale_inv"):
                scale = torch.exp2(torch.round(torch.log2(v.float())))
                scale.view(-1)[0] = v.view(-1)[0]  # one block keeps its own scale
                t[k] = scale.to(v.dtype)

    plant(fp8, powers_of_two_but_one)
    out = tmp_path / "bf16"
    run_convert(fp8, out, "hf", Options(dtype="bf16"), RunFlags(quiet=True), Console(quiet=True))
    assert verify(fp8, out).ok

    def scale_a_block(t):
        t[L1 + "1.up_proj.weight"][7, 32:64] *= 1.05

    assert _flagged(verify(fp8, plant(out, scale_a_block))) == {L1 + "1.up_proj.weight"}
