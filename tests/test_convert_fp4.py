"""`--to nvfp4|mxfp4`: byte-checked against the libraries that write and read these formats.

- the numba CPU kernel gives the torch path's bytes (every codec, bf16 and float32 weights, ties);
- compressed-tensors' own NVFP4/MXFP4 compressors give our bytes (test_fp4_compressors.py);
- llmcompressor's model-free PTQ (NVFP4A16, MXFP4A16) gives our bytes on the same checkpoint, except
  where it leaves gate and up of an expert with different global scales (its fused-set patterns
  only match `mlp.gate_proj`, `w1`): there ours share one, and only its fused re-layout is refused;
- ModelOpt's `NVFP4QTensor` (its own venv, `MOEPORT_MODELOPT_PYTHON` or /work/.modelopt) gives
  our `--flavor modelopt` bytes, with its own and with a shared `weights_scaling_factor_2`;
- transformers loads both outputs with no missing keys; MXFP4 logits equal the fake-quantized model's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import load_tensors
from test_convert_gpu import HAVE_LLMC, LLMC_PYTHON, NOT_EXPERTS, load, logits, rel

from moeport.codecs import CtMxfp4Codec, CtNvfp4Codec, GptOssMxfp4Codec, Nvfp4Codec, fp4, fp4_kernels
from moeport.errors import MoeportError

MODELOPT_PYTHON = os.environ.get("MOEPORT_MODELOPT_PYTHON") or "/work/.modelopt/bin/python"
HAVE_MODELOPT = Path(MODELOPT_PYTHON).exists()
CODECS = [CtNvfp4Codec(), Nvfp4Codec(), CtMxfp4Codec(), GptOssMxfp4Codec()]


def here(src: Path, dst: Path, to: str, **options) -> None:
    """A conversion in this process (what the CLI runs, without starting an interpreter)."""
    from moeport.convert.execute import execute
    from moeport.detect import detect
    from moeport.recipes import TARGETS, Options
    from moeport.sources import open_checkpoint

    with open_checkpoint(src) as ck:
        plan, sink = TARGETS[to].build(ck, detect(ck), Options(**options), {})
        execute(plan, ck, dst, sink, {})


def convert(src: Path, dst: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "moeport",
        "convert",
        str(src),
        str(dst),
        *args,
        "--quiet",
        "--device",
        "cpu",
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def outputs(checkpoint, tmp_path_factory) -> dict[str, Path]:
    src = checkpoint("qwen3_moe")
    root = tmp_path_factory.mktemp("fp4")
    outs = {"src": src}
    for name, (to, flavor) in {
        "ct": ("nvfp4", ""),
        "modelopt": ("nvfp4", "modelopt"),
        "mx": ("mxfp4", ""),
    }.items():
        here(src, root / name, to, flavor=flavor)
        outs[name] = root / name
    return outs


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def weights(seed: int, shape=(48, 96), dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)
    w[0, :32] = torch.tensor([0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, -0.1] + [1.0] * 20)
    w[1] = 0  # an all-zero row: zero block scales
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_cpu_kernel_gives_the_torch_bytes(codec, dtype, monkeypatch) -> None:
    w = weights(1, dtype=dtype)
    assert fp4_kernels.supported(w, 16)
    fast = codec.encode(w)
    monkeypatch.setattr(fp4_kernels, "AVAILABLE", False)  # the torch path (what CUDA runs)
    slow = codec.encode(w)
    for part in fast:
        assert torch.equal(raw(fast[part]), raw(slow[part])), part
    assert float((codec.decode(fast).to(dtype) - w).float().norm() / w.float().norm()) < 0.15


def test_mxfp4_spec_vectors() -> None:
    """formats.md §2.3 test vectors (OCP scale choice, RNE ties)."""
    row = torch.zeros(1, 32)
    row[0, :4] = torch.tensor([1, -0.5, 6, 3])
    parts = GptOssMxfp4Codec().encode(row)
    assert parts["_scales"].tolist() == [[0x7F]]
    assert parts["_blocks"].flatten()[:2].tolist() == [0x92, 0x57]
    row = (torch.arange(32.0) / 4 - 4).unsqueeze(0)
    parts = GptOssMxfp4Codec().encode(row)
    assert parts["_scales"].tolist() == [[0x7F]]
    assert bytes(parts["_blocks"].flatten().tolist()).hex() == "eededdccccabaa890021224344545566"


def _own_and_shared(src: dict, base: str, codec) -> tuple[dict, dict]:
    m = re.match(r"(.*)\.(gate_proj|up_proj)\.$", base)
    own = codec.encode(src[base + "weight"])
    if not m or not getattr(codec, "shares_global_scale", False):
        return own, own
    amax = torch.stack(
        [src[f"{m[1]}.{p}.weight"].float().abs().amax() for p in ("gate_proj", "up_proj")]
    ).amax()
    return own, codec.encode(src[base + "weight"], global_amax=amax)


@pytest.mark.skipif(not HAVE_LLMC, reason=f"llmcompressor venv not found at {LLMC_PYTHON}")
def test_llmcompressor_model_free_gives_our_bytes(outputs, tmp_path) -> None:
    child = (
        "import sys, json\nfrom llmcompressor.entrypoints.model_free import model_free_ptq\n"
        "model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], ignore=json.loads(sys.argv[4]), "
        "max_workers=1, device='cpu')\n"
    )
    src = load_tensors(outputs["src"])
    for preset, ours_dir, codec in (("NVFP4A16", "ct", CtNvfp4Codec()), ("MXFP4A16", "mx", CtMxfp4Codec())):
        out = tmp_path / preset
        r = subprocess.run(
            [LLMC_PYTHON, "-c", child, str(outputs["src"]), str(out), preset, json.dumps(NOT_EXPERTS)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        theirs, ours = load_tensors(out), load_tensors(outputs[ours_dir])
        ours_cfg = json.loads((outputs[ours_dir] / "config.json").read_text())["quantization_config"]
        their_cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert ours_cfg["format"] == their_cfg["format"]
        assert (
            next(iter(ours_cfg["config_groups"].values()))["weights"]
            == next(iter(their_cfg["config_groups"].values()))["weights"]
        )
        assert sorted(k for k in theirs if "experts" in k) == sorted(k for k in ours if "experts" in k)
        differ = 0
        for key in (k for k in theirs if k.endswith("weight_packed")):
            base = key.removesuffix("weight_packed")
            own, shared = _own_and_shared(src, base, codec)
            for part in own:  # llmcompressor's bytes = ours with the weight's own global scale
                assert torch.equal(raw(theirs[base + part]), raw(own[part])), key
                assert torch.equal(raw(ours[base + part]), raw(shared[part])), key
            differ += not torch.equal(theirs[key], ours[key])
        if preset == "NVFP4A16":  # theirs: gate/up global scales differ; a fused re-layout is refused
            assert differ > 0
            r = convert(out, tmp_path / "llmc-fused", "--to", "hf", "--layout", "fused")
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        else:
            assert differ == 0


def test_gate_and_up_share_one_global_scale_and_fuse(outputs, tmp_path) -> None:
    for flavor, part in (("ct", "weight_global_scale"), ("modelopt", "weight_scale_2")):
        t = load_tensors(outputs[flavor])
        gates = [k for k in t if k.endswith(f"gate_proj.{part}")]
        assert gates
        for key in gates:
            assert torch.equal(t[key], t[key.replace("gate_proj", "up_proj")]), key
        fused = tmp_path / flavor
        here(outputs[flavor], fused, "hf", layout="fused")
        f = load_tensors(fused)
        assert any(k.endswith("experts.gate_up_proj_scale") for k in f)
        v = subprocess.run(
            [sys.executable, "-m", "moeport", "verify", str(outputs[flavor]), str(fused), "--quiet"],
            capture_output=True,
            text=True,
        )
        m = re.search(r"(\d+) tensors compared \((\d+) bit-exact\)", v.stdout)
        assert v.returncode == 0 and m and m[1] == m[2], v.stdout + v.stderr  # a lossless re-layout


def test_modelopt_flavour_files(outputs) -> None:
    hf_quant = json.loads((outputs["modelopt"] / "hf_quant_config.json").read_text())
    quant = hf_quant["quantization"]  # weight-only, as ModelOpt's export names it (NVFP4 is W4A4)
    assert quant["quant_algo"] == "W4A16_NVFP4" and quant["group_size"] == 16
    cfg = json.loads((outputs["modelopt"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "W4A16_NVFP4"
    assert "lm_head" in hf_quant["quantization"]["exclude_modules"] and "lm_head" in cfg["ignore"]
    assert not (outputs["ct"] / "hf_quant_config.json").exists()
    t = load_tensors(outputs["modelopt"])
    key = "model.layers.0.mlp.experts.0.down_proj."
    assert t[key + "weight"].dtype == torch.uint8 and t[key + "weight_scale_2"].shape == ()


MODELOPT_CHILD = r"""
import sys, torch
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
ws = torch.load(sys.argv[1])
out = []
for w, ws2 in ws:
    q, s, s2 = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=ws2)
    out.append((q._quantized_data, s, s2))
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(not HAVE_MODELOPT, reason=f"nvidia-modelopt venv not found at {MODELOPT_PYTHON}")
def test_modelopt_nvfp4qtensor_gives_our_bytes(tmp_path) -> None:
    cases = []
    for seed in range(4):
        w = weights(seed, (64, 128))
        shared = None if seed % 2 == 0 else (w.float().abs().amax() * 1.5)  # a partner's larger amax
        cases.append((w, shared))
    torch.save([(w, None if a is None else a / (6 * 448)) for w, a in cases], tmp_path / "in.pt")
    r = subprocess.run(
        [MODELOPT_PYTHON, "-c", MODELOPT_CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for (w, amax), (q, s, s2) in zip(cases, torch.load(tmp_path / "out.pt"), strict=True):
        ours = Nvfp4Codec().encode(w, global_amax=amax)
        assert torch.equal(ours["weight"], q)
        assert torch.equal(raw(ours["weight_scale"]), raw(s))
        assert torch.equal(ours["weight_scale_2"], s2.reshape(()).float())


def test_transformers_loads_our_outputs(outputs) -> None:
    src = load(outputs["src"])
    ref = logits(src)
    mx = load(outputs["mx"])  # asserts no missing/unexpected keys
    t = load_tensors(outputs["mx"])
    fake = src.state_dict()  # the fake-quantized model: our decoded experts in the source model
    for key in (k for k in t if k.endswith("weight_packed")):
        base = key.removesuffix("weight_packed")
        decoded = CtMxfp4Codec().decode({"weight_packed": t[key], "weight_scale": t[base + "weight_scale"]})
        m = re.match(r"(.*experts)\.(\d+)\.(\w+)_proj\.$", base)
        e, proj = int(m[2]), m[3]
        if proj == "down":
            fake[f"{m[1]}.down_proj"][e] = decoded
        else:
            rows = decoded.shape[0]
            fake[f"{m[1]}.gate_up_proj"][
                e, (0 if proj == "gate" else rows) : rows * (1 if proj == "gate" else 2)
            ] = decoded
    src.load_state_dict(fake)
    fake_logits = logits(src)
    # transformers holds the experts in bf16 (exact for MXFP4 values) and runs them in bf16
    assert rel(logits(mx), fake_logits) < 0.1 * rel(fake_logits, ref)
    load(outputs["ct"])  # NVFP4: loads, no missing keys (logits: see the xfail below)


@pytest.mark.xfail(
    strict=False,  # CI installs the newest transformers 5.x: a release with the fix must not fail it
    reason="transformers 5.24 CompressedTensorsDequantize decompresses MoE experts through a module "
    "holding weight_packed/weight_scale/weight_shape only: weight_global_scale is dropped, so NVFP4 "
    "experts come out ~global-scale (1e4x) too large (llmcompressor's own output too)",
)
def test_transformers_nvfp4_logits(outputs) -> None:
    ref = logits(load(outputs["src"]))
    assert rel(logits(load(outputs["ct"])), ref) < 0.2


def test_cli_flavour_errors(outputs, tmp_path) -> None:
    cases = [
        (
            ["--to", "mxfp4", "--flavor", "modelopt"],
            "--flavor modelopt: --to mxfp4 writes compressed-tensors",
        ),
        (["--to", "nvfp4", "--flavor", "gguf"], "--flavor gguf"),
        (["--to", "w4a16", "--flavor", "modelopt"], "--flavor: not an option of --to w4a16"),
    ]
    for args, message in cases:
        r = convert(outputs["src"], tmp_path / "x", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_nonfinite_is_refused_naming_the_weight(checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    orig = checkpoint("qwen3_moe")
    for f in orig.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    for f in orig.glob("*.safetensors"):
        t = load_file(f)
        key = "model.layers.1.mlp.experts.2.up_proj.weight"
        if key in t:
            t[key][3, 5] = float("nan")
        save_file(t, src / f.name, metadata={"format": "pt"})
    for to in ("nvfp4", "mxfp4"):
        with pytest.raises(MoeportError, match=r"experts\.2\.up_proj.*row"):
            here(src, tmp_path / to, to)


def test_scales_of_an_all_zero_weight() -> None:
    z = torch.zeros(4, 32)
    for codec in CODECS:
        parts = codec.encode(z)
        assert torch.equal(codec.decode(parts), z), codec.name
    assert float(CtNvfp4Codec().encode(z)["weight_global_scale"]) == 1.0
    assert float(Nvfp4Codec().encode(z)["weight_scale_2"]) == 1.0
    assert fp4.mx_exponent(torch.tensor([1.75, 1.74, 0.0]), ct=True).tolist() == [-1, -2, -127]


def _json(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "moeport", "convert", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_lossless_moves_keep_codes_and_scales(outputs, tmp_path) -> None:
    """CT -> ModelOpt -> CT (hub), and CT fused -> ModelOpt hub: codes and block scales bit-exact,
    the global scale as its reciprocal; the plan says so; the same flavour is carried as is."""
    plan = _json(
        [
            str(outputs["ct"]),
            str(tmp_path / "p"),
            "--to",
            "nvfp4",
            "--flavor",
            "modelopt",
            "--dry-run",
            "--json",
        ]
    )
    assert any("moved ct-nvfp4 -> nvfp4 without requantizing" in n for n in plan.get("notes", [])), plan
    fused = tmp_path / "fused"
    here(outputs["ct"], fused, "hf", layout="fused")
    ct = load_tensors(outputs["ct"])
    for src in (outputs["ct"], fused):
        mo = tmp_path / f"mo-{src.name}"
        here(src, mo, "nvfp4", flavor="modelopt")
        back = tmp_path / f"back-{src.name}"
        here(mo, back, "nvfp4")
        m, b = load_tensors(mo), load_tensors(back)
        assert set(b) == set(ct)
        for key in (k for k in ct if k.endswith("weight_packed")):
            base = key.removesuffix("weight_packed")
            assert torch.equal(m[base + "weight"], ct[key]) and torch.equal(b[key], ct[key])
            assert torch.equal(raw(m[base + "weight_scale"]), raw(ct[base + "weight_scale"]))
            gs = ct[base + "weight_global_scale"]
            assert torch.equal(m[base + "weight_scale_2"], fp4.reciprocal(gs).reshape(()))
            ulp = torch.nextafter(gs, torch.tensor(float("inf"))) - gs
            assert float((b[base + "weight_global_scale"] - gs).abs()) <= float(ulp)
    v = subprocess.run(
        [sys.executable, "-m", "moeport", "verify", str(outputs["ct"]), str(mo), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert v.returncode == 0, v.stdout + v.stderr  # reciprocal global scales: float32 rounding only
    same = tmp_path / "same"
    here(outputs["mx"], same, "mxfp4")
    mx, again = load_tensors(outputs["mx"]), load_tensors(same)
    assert all(torch.equal(raw(mx[k]), raw(again[k])) for k in mx)


@pytest.mark.parametrize("to", [("w4a16", "--group-size", "32"), ("hf", "--dtype", "bf16")])
def test_a_modelopt_source_statement_does_not_follow_its_weights(outputs, tmp_path, to) -> None:
    """hf_quant_config.json says "NVFP4" to vLLM/SGLang: an output that re-quantizes (W4A16) or
    dequantizes the ModelOpt source must not carry it; the config's quantization_config is the truth."""
    done = convert(outputs["modelopt"], tmp_path / "o", "--to", *to)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "o" / "hf_quant_config.json").exists()
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg.get("quantization_config", {}).get("quant_method") != "modelopt"
