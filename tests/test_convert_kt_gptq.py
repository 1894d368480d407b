"""`--to kt-gptq-int4 --method gptq`: calibrated GPTQ codes in kt-kernel's GPTQ_INT4 storage.

On a tiny DeepSeek-V3 written by transformers (kt-sized: hidden 256, expert intermediate 256):
the output is the RTN output's storage (same tensors, dtypes, shapes, scales and zeros; only the
codes differ), config.json keeps GPTQModel's fields with the GPTQ settings recorded, `moeport
verify` passes it as lossy, and kt-kernel's own `KTMoEWrapper(method="GPTQ_INT4")` runs its experts
closer to the BF16 experts than it runs RTN's, on held-out hidden states of the calibration's kind
(routed as the model routes them). A run killed between layers resumes byte-identical.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from kt_support import import_kt, kt_wrapper
from test_convert_kt import I_SIZE, TOPK, E, H, _torch_moe, kt_checkpoint, main  # noqa: F401 - fixtures
from test_kt_native import _stored_experts
from typer.testing import CliRunner

from moeport.cli.app import app
from moeport.detect import detect
from moeport.report import inspect_report
from moeport.sources import open_checkpoint
from moeport.verify.run import recipe_of

SAMPLES, SEQ = 32, 64
V1_ZERO_8 = 0x77777777  # eight 4-bit zeros of 8, stored as 7 (AutoGPTQ v1)


def moeport(*args) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--quiet", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def gptq_job(calib: Path) -> list[str]:
    return ["--to", "kt-gptq-int4", "--method", "gptq", "--calibration", str(calib),
            "--samples", str(SAMPLES), "--seq-len", str(SEQ), "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def outputs(kt_checkpoint, tmp_path_factory):  # noqa: F811
    """(source, folder with rtn/ and gptq/ outputs and ids.json, the GPTQ run's summary)."""
    src, root = kt_checkpoint("deepseek_v3"), tmp_path_factory.mktemp("kt-gptq")
    ids = torch.randint(0, 128, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    moeport("convert", src, root / "rtn", "--to", "kt-gptq-int4")
    return src, root, moeport("convert", src, root / "gptq", *gptq_job(root / "ids.json"))


def test_gptq_codes_in_rtns_storage_with_gptqmodels_config(outputs) -> None:
    src, root, summary = outputs
    assert any("calibrated on 32 x 64 tokens" in n for n in summary["notes"]), summary["notes"]
    ours, rtn = load_tensors(root / "gptq"), load_tensors(root / "rtn")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in rtn.items()}
    qweights = [k for k in ours if k.endswith(".qweight")]
    assert len(qweights) == 2 * 3 * E
    for base in (k.removesuffix("qweight") for k in qweights):  # same scale rule, zeros and groups
        for part in ("scales", "qzeros", "g_idx"):
            assert torch.equal(ours[base + part], rtn[base + part]), base + part
        assert bool((ours[base + "qzeros"] == V1_ZERO_8).all())
    changed = [k for k in qweights if not torch.equal(ours[k], rtn[k])]
    assert len(changed) == len(qweights), "GPTQ left some experts with RTN's codes"
    assert all(torch.equal(ours[k], rtn[k]) for k in ours if ".experts." not in k)
    quant = json.loads((root / "gptq" / "config.json").read_text())["quantization_config"]
    rtn_quant = json.loads((root / "rtn" / "config.json").read_text())["quantization_config"]
    assert {k: quant[k] for k in rtn_quant} == rtn_quant  # GPTQModel's fields as kt and servers read them
    assert quant["desc_act"] is False and quant["sym"] is True and quant["damp_percent"] == 0.01
    assert quant["gptq"] | {"calibration": ""} == {
        "method": "gptq", "block_size": 128, "dampening_frac": 0.01, "act_order": False,
        "all_experts": False, "samples": SAMPLES, "seq_len": SEQ, "calibration": "",
    }  # fmt: skip
    verdict = CliRunner().invoke(app, ["verify", str(src), str(root / "gptq"), "--quiet"])
    assert verdict.exit_code == 0 and "lossy" in verdict.stdout, verdict.stdout
    with open_checkpoint(root / "gptq") as ck:  # still kt's GPTQ_INT4 folder, GPTQ recorded beside it
        made = inspect_report(root / "gptq", detect(ck), recipe_of(ck))["written_by"]
    assert (made["target"], made["kt_method"], made["options"]["quantizer"]) == (
        "kt-gptq-int4",
        "GPTQ_INT4",
        "gptq",
    )


def _expert_inputs(src: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out tokens of the calibration's kind through the BF16 model (transformers): the hidden
    states entering `layer`'s routed experts, and the experts and weights its router picks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seen = {}

    def grab(_mod, args, kwargs):
        seen["x"], seen["ids"], seen["w"] = (*args, *kwargs.values())[:3]

    model.model.layers[layer].mlp.experts.register_forward_pre_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 128, (4, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(input_ids=ids)
    return seen["x"].bfloat16(), seen["ids"].long(), seen["w"].float()


def _kt_forward(monkeypatch, path: Path, layer: int, x, ids, weights) -> torch.Tensor:
    """kt-kernel's GPTQ_INT4 forward of `path`'s experts, 32 tokens a call (its prefill chunk)."""
    _, experts_base = import_kt()
    monkeypatch.setenv("KT_FORCE_SYNC_SUBMIT", "1")
    monkeypatch.setattr(experts_base.KExpertsCPUBuffer, "temp_bs", 0)
    wrapper = kt_wrapper(monkeypatch, path, layer, E, TOPK, H, I_SIZE, "GPTQ_INT4", 1, cpu_save=False)
    wrapper.load_weights(torch.arange(E, dtype=torch.int64))
    out = [
        wrapper.forward(x[i : i + 32], ids[i : i + 32], weights[i : i + 32], 0).float().clone()
        for i in range(0, x.shape[0], 32)
    ]
    del wrapper
    return torch.cat(out)


@pytest.mark.parametrize("layer", [1, 2])
def test_kt_kernel_runs_gptq_experts_closer_to_bf16_than_rtn(monkeypatch, outputs, layer) -> None:
    import_kt()
    src, root, _ = outputs
    x, ids, weights = _expert_inputs(src, layer)
    want = _torch_moe(x, ids, weights, _stored_experts(src, layer, "deepseek_v3"))
    err = {}
    for name in ("gptq", "rtn"):
        got = _kt_forward(monkeypatch, root / name, layer, x, ids, weights)
        err[name] = float((got - want).norm() / want.norm())
    print(f"layer {layer}: kt GPTQ_INT4 vs BF16 experts, rel-L2 gptq {err['gptq']:.5f} rtn {err['rtn']:.5f}")
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--method", "gptq", "--calibration", "{ids}", "--act-order"),
         "--act-order: not with --to kt-gptq-int4 (kt-kernel's GPTQ_INT4 loader refuses desc_act: true"),
        (("--method", "gptq"), "--method gptq needs --calibration FILE"),
        (("--calibration", "{ids}"), "--calibration: only with --method gptq"),
        (("--method", "gptq", "--calibration", "{ids}", "--group-size", "64"), "--group-size: not an option"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line(main, outputs, tmp_path, extra, says) -> None:  # noqa: F811
    src, root, _ = outputs
    args = [a.replace("{ids}", str(root / "ids.json")) for a in extra]
    code, _, err = main("convert", str(src), str(tmp_path / "out"), "--to", "kt-gptq-int4", *args)
    assert code == 2 and says in err and not (tmp_path / "out").exists(), err


SLOW_LAYER_2 = """
import sys, time
from moeport.calibrate import sequential
run = sequential.Calibrator._run
def slow(self, layer):  # time to be killed with layers 0 and 1 published
    if layer == 2:
        time.sleep(120)
    run(self, layer)
sequential.Calibrator._run = slow
from moeport.cli.app import main
sys.argv = ["moeport", *sys.argv[1:]]
main()
"""


def test_killed_run_resumes_from_saved_states_byte_identical(outputs, tmp_path) -> None:
    """SIGKILL while layer 2 waits (layers 0 and 1 published): the re-run keeps those pieces, starts
    from the states saved before layer 2 and ends with the uninterrupted run's bytes."""
    src, root, _ = outputs
    dst, job = tmp_path / "resumed", gptq_job(root / "ids.json")
    args = [sys.executable, "-c", SLOW_LAYER_2, "convert", str(src), str(dst), *job, "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = dst.parent / f"{dst.name}.moeport-partial" / "moeport-journal.json"

    def pieces_done() -> int:  # tensors outside the layers, then one piece per layer
        try:
            return len(json.loads(journal.read_text())["steps"])
        except (OSError, ValueError):
            return 0

    deadline = time.monotonic() + 120
    while proc.poll() is None and pieces_done() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = moeport("convert", src, dst, *job)
    assert "gptq: resumed from the hidden states saved before layer 2" in summary["notes"], summary["notes"]
    assert summary["pieces_kept"] == 3 and not (dst / "gptq-states").exists()
    whole = {p.name: p.read_bytes() for p in (root / "gptq").glob("*.safetensors")}
    assert whole == {p.name: p.read_bytes() for p in dst.glob("*.safetensors")}
