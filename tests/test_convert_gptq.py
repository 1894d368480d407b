"""`--to w4a16 --method gptq`: calibrated GPTQ, layer by layer, checked by its consumers.

On tiny checkpoints written by transformers' own classes (DeepSeek-V3, Qwen3-MoE from BF16, FP8
and the fused expert layout, Mixtral's w1/w3/w2): transformers loads the output with no missing
keys, in exactly RTN's format, its logit error on held-out inputs is below RTN's, `moeport verify`
passes it as lossy, and (when llmcompressor's venv is there) it is within 10% of llmcompressor's
`oneshot` GPTQ with the same samples, group size and targets. A run killed mid-way resumes from
the hidden states saved at a layer boundary and ends byte-identical.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from typer.testing import CliRunner

from moeport.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = os.environ.get("MOEPORT_LLMC_PYTHON") or str(ROOT / ".llmc" / "bin" / "python")
HAVE_LLMC = Path(LLMC_PYTHON).exists()
SAMPLES, SEQ = 16, 32
W4 = ("--to", "w4a16", "--group-size", "32", "--device", "cpu")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """Seeded random token ids (the fixtures have no tokenizer): SAMPLES x SEQ."""
    path = tmp_path_factory.mktemp("calib") / "ids.json"
    ids = torch.randint(0, 128, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    path.write_text(json.dumps(ids.tolist()))
    return path


def moeport(*args: str) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--quiet", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def gptq(src: Path, out: Path, calib: Path, *extra: str) -> dict:
    return moeport("convert", src, out, *W4, "--method", "gptq", "--calibration", calib, *extra,
                   "--samples", SAMPLES, "--seq-len", SEQ)  # fmt: skip


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{path}: {kind} {sorted(info[kind])[:5]}"
    return model.eval()


def logit_error(path: Path, reference: torch.Tensor) -> float:
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))  # held out
    with torch.no_grad():
        out = load(path)(input_ids=ids).logits
    return float((out - reference).norm() / reference.norm())


def reference_logits(src: Path) -> torch.Tensor:
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return load(src)(input_ids=ids).logits


@pytest.mark.parametrize(
    ("model_type", "layout", "fmt"),
    [
        ("deepseek_v3", "hub", "bf16"),
        ("qwen3_moe", "hub", "fp8-block"),
        ("qwen3_moe", "fused", "bf16"),
        ("mixtral", "hub", "bf16"),
    ],
)
def test_gptq_beats_rtn_in_rtns_format_and_verifies(
    checkpoint, calibration, tmp_path, model_type, layout, fmt
):
    src = checkpoint(model_type, layout, fmt)
    bf16 = checkpoint(model_type, "hub", "bf16")
    moeport("convert", src, tmp_path / "rtn", *W4)
    summary = gptq(src, tmp_path / "gptq", calibration)
    assert any("calibrated on 16 x 32 tokens" in n for n in summary["notes"]), summary["notes"]
    ours, rtn = load_tensors(tmp_path / "gptq"), load_tensors(tmp_path / "rtn")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in rtn.items()}
    changed = [k for k in ours if k.endswith("weight_packed") and not torch.equal(ours[k], rtn[k])]
    assert len(changed) > len(ours) // 8, "GPTQ gave RTN's codes almost everywhere"
    quant = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert quant["gptq"]["samples"] == SAMPLES and quant["format"] == "pack-quantized"
    reference = reference_logits(bf16)
    err_gptq, err_rtn = logit_error(tmp_path / "gptq", reference), logit_error(tmp_path / "rtn", reference)
    print(f"{model_type}/{layout}/{fmt}: logit rel-L2 gptq {err_gptq:.5f}, rtn {err_rtn:.5f}")
    assert err_gptq < err_rtn
    if fmt != "bf16":
        return  # verify flags FP8 -> bf16 attention blocks in RTN's output too (not GPTQ's doing)
    verdict = CliRunner().invoke(app, ["verify", str(src), str(tmp_path / "gptq"), "--quiet"])
    assert verdict.exit_code == 0 and "lossy" in verdict.stdout, verdict.stdout


LLMC_CHILD = r"""
import sys, json, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from compressed_tensors.quantization import QuantizationArgs
src, dst, calib, kernel = sys.argv[1:5]
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
# 1. the GPTQ kernel alone, on the weight/Hessian/scales the test wrote
k = torch.load(kernel)
zero = torch.zeros_like(k["scale"])[None]
q, _, fallback = quantize_weight(k["w"][None], k["h"][None], k["scale"][None], zero,
                                 None, QuantizationArgs(**weights), blocksize=128, percdamp=0.01)
torch.save({"q": q[0], "fallback": bool(fallback[0])}, kernel + ".out")
# 2. oneshot on the model: routed experts only, every token to every expert (llmcompressor's default)
ids = json.load(open(calib))
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
ignore = ["lm_head", "re:.*embed_tokens.*", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*shared_expert.*"]
recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=ignore,
                      dampening_frac=0.01, block_size=128, actorder=None)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
model.save_pretrained(dst, save_compressed=True)
"""


@pytest.mark.skipif(not HAVE_LLMC, reason=f"llmcompressor not installed ({LLMC_PYTHON} missing)")
def test_within_llmcompressor_oneshot_gptq(checkpoint, calibration, tmp_path) -> None:
    """Same kernel (codes of llmcompressor's quantize_weight for the same weight, Hessian and
    scales) and, on the model, a logit error within 10% of oneshot's (same samples, group size,
    targets, no act-order, all-experts calibration as its MoE default)."""
    from moeport.calibrate.kernel import gptq_codes
    from moeport.codecs.int_rtn import rtn_dequantize, rtn_params

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    w = torch.randn(48, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    scale, _ = rtn_params(w, 4, 32, True, torch.bfloat16)
    torch.save({"w": w, "h": h, "scale": scale.float()}, tmp_path / "kernel.pt")
    src = checkpoint("qwen3_moe", "hub", "bf16")
    args = [
        LLMC_PYTHON,
        "-c",
        LLMC_CHILD,
        str(src),
        str(tmp_path / "llmc"),
        str(calibration),
        str(tmp_path / "kernel.pt"),
    ]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "kernel.pt.out")
    ours = rtn_dequantize(gptq_codes(w, h, scale, 4, 0.01), scale, None)
    assert not theirs["fallback"]
    assert torch.equal(ours, theirs["q"].float())
    gptq(src, tmp_path / "ours", calibration, "--all-experts")
    reference = reference_logits(src)
    err_ours, err_theirs = (
        logit_error(tmp_path / "ours", reference),
        logit_error(tmp_path / "llmc", reference),
    )
    print(f"logit rel-L2 moeport {err_ours:.5f}, llmcompressor {err_theirs:.5f}")
    assert err_ours <= 1.1 * err_theirs


def test_spilled_states_give_the_same_bytes_and_spill_by_default_past_the_budget(
    checkpoint, calibration, tmp_path, monkeypatch
) -> None:
    """States read and written a chunk of samples at a time from the staging folder's files (here
    2 samples per chunk, 8 chunks) give the bytes of states held in memory; past the budget the
    default spills without being asked."""
    from moeport.calibrate import sequential
    from moeport.recipes import gptq as recipe

    monkeypatch.setattr(sequential, "CHUNK_TOKENS", 2 * SEQ)
    src = checkpoint("qwen3_moe", "hub", "bf16")
    kept = gptq(src, tmp_path / "memory", calibration, "--no-spill-states")
    assert any("in memory" in n for n in kept["notes"]), kept["notes"]
    monkeypatch.setattr(recipe, "SPILL_BYTES", 1024)  # the states: 2 x 16 x 32 x 64 x 4 B = 256 KiB
    spilled = gptq(src, tmp_path / "spilled", calibration)
    assert any("spilled to gptq-states/" in n and "read 2 samples at a time" in n for n in spilled["notes"])
    assert not (tmp_path / "spilled" / "gptq-states").exists()
    memory = {p.name: p.read_bytes() for p in (tmp_path / "memory").glob("*.safetensors")}
    assert memory == {p.name: p.read_bytes() for p in (tmp_path / "spilled").glob("*.safetensors")}
    shown = CliRunner().invoke(app, ["inspect", str(tmp_path / "memory"), "--json"])
    made = json.loads(shown.stdout)["written_by"]  # the recorded recipe; no kt-kernel method here
    assert (made["target"], made["options"]["method"], "kt_method" in made) == ("w4a16", "gptq", False)
    # the stated bound counts one chunk (2 samples) of states in and out instead of all 16 of each
    found = [re.search(r"the RTN bound \+ ([\d.]+) MiB", " ".join(s["notes"])) for s in (kept, spilled)]
    bounds = [float(f.group(1)) for f in found if f]
    assert bounds[0] - bounds[1] == pytest.approx(2 * (SAMPLES - 2) * SEQ * 64 * 4 / 2**20, abs=0.1)


@pytest.mark.parametrize("spill", ["--no-spill-states", "--spill-states"])
def test_killed_run_resumes_from_saved_states_byte_identical(checkpoint, tmp_path, spill) -> None:
    """Killed after two layers were published, a re-run starts from the states saved before layer
    2 (in memory or spilled: the boundary file is the same either way)."""
    src = checkpoint("qwen3_moe", "hub", "bf16")
    ids = torch.randint(0, 128, (96, 64), generator=torch.Generator().manual_seed(5))  # layers of ~0.3 s
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    job = [*W4, "--method", "gptq", "--calibration", str(tmp_path / "ids.json"), "--samples", "96"]
    job += ["--seq-len", "64"]
    moeport("convert", src, tmp_path / "whole", *job)
    job.append(spill)
    dst = tmp_path / "resumed"
    args = [sys.executable, "-m", "moeport", "convert", str(src), str(dst), *job, "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = dst.parent / f"{dst.name}.moeport-partial" / "moeport-journal.json"

    def pieces_done() -> int:  # pieces: tensors outside the layers, then one per layer
        try:
            return len(json.loads(journal.read_text())["steps"])
        except (OSError, ValueError):
            return 0

    killed = False
    while proc.poll() is None:
        if pieces_done() >= 3:  # layers 0 and 1 published: the resumed run starts at layer 2
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.001)
    proc.wait()
    assert killed, "the run finished before the kill point"
    summary = moeport("convert", src, dst, *job)
    assert "gptq: resumed from the hidden states saved before layer 2" in summary["notes"], summary["notes"]
    assert summary["pieces_kept"] == 3
    assert not (dst / "gptq-states").exists()
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.safetensors")}
    assert whole == {p.name: p.read_bytes() for p in dst.glob("*.safetensors")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bench/gptq_devices.py)")
def test_cpu_and_cuda_outputs_agree_within_the_stated_tolerance(tmp_path) -> None:
    """bench/gptq_devices.py on a tiny DeepSeek-V3 made by transformers: the CUDA output's logit
    error within 2% of the CPU output's, at most 5% of the int4 codes differing."""
    script = ROOT / "bench" / "gptq_devices.py"
    args = ["--devices", "cpu,cuda", "--layers", "3", "--samples", "32", "--seq-len", "64"]
    args += ["--work", str(tmp_path), "--json", str(tmp_path / "result.json")]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert (tmp_path / "result.json").exists(), done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    print(json.dumps(result["rows"]))
    assert not result["skipped"] and [r["device"] for r in result["rows"]] == ["cpu", "cuda"]
    assert result["ok"] and done.returncode == 0, result["rows"]


def test_longcat_layers_under_num_layers_are_calibrated(calibration, tmp_path) -> None:
    """LongCat-Flash states its depth as `num_layers` (transformers' `num_hidden_layers` counts two
    attention sublayers per layer): every decoder layer is calibrated, none silently left at RTN,
    and transformers' model runs closer to the source with the GPTQ experts than with RTN's (each
    output dequantized to transformers' fused layout by moeport); the MTP layer is carried."""
    from public_fixtures import with_public_names
    from test_detect_zero_experts import _hub_form
    from test_zoo_derived import _save_tiny

    saved = _save_tiny("longcat_flash", tmp_path / "saved", hidden=128, inter=128)
    src = with_public_names(_hub_form(saved, tmp_path / "hub"), tmp_path / "pub", "longcat_flash")
    moeport("convert", src, tmp_path / "rtn", *W4)
    summary = gptq(src, tmp_path / "gptq", calibration)
    assert any(re.search(r"gptq: [1-9]\d* weights of 1 layers calibrated", n) for n in summary["notes"])
    ours = load_tensors(tmp_path / "gptq")
    assert torch.equal(
        ours["model.mtp.layers.0.eh_proj.weight"], load_tensors(src)["model.mtp.layers.0.eh_proj.weight"]
    )
    reference = reference_logits(saved)
    errors = {}
    for name in ("gptq", "rtn"):
        fused = tmp_path / f"{name}-fused"
        moeport("convert", tmp_path / name, fused, "--to", "hf", "--layout", "fused", "--dtype", "bf16")
        errors[name] = logit_error(fused, reference)
    print(f"longcat_flash: logit rel-L2 gptq {errors['gptq']:.5f}, rtn {errors['rtn']:.5f}")
    assert errors["gptq"] < errors["rtn"], errors
