"""ModelOpt's own HF export (`mtq.quantize` + `export_hf_checkpoint`, in its venv: skipped without it)
against `--to nvfp4 --flavor modelopt` on the same tiny Qwen3-MoE: the same bytes in every quantized
tensor and the same `hf_quant_config.json` / `quantization_config` (but the producer), weight-only
(`W4A16_NVFP4_CFG`) and W4A4 (`NVFP4_DEFAULT_CFG`, calibrated by ModelOpt; our calibration file is
the absmax its exported `input_scale`s stand for, input_scale x 2688, exact in float64).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from fixtures import load_tensors
from test_convert_fp4 import HAVE_MODELOPT, MODELOPT_PYTHON, here, raw

CHILD = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM
src, out = sys.argv[1:3]
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
def calibrate(m):
    with torch.no_grad():
        m(input_ids=ids)
for cfg in sys.argv[3:]:  # one interpreter for both (importing modelopt is most of the time)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model.config.architectures = [type(model).__name__]  # its export reads it
    mtq.quantize(model, getattr(mtq, cfg), forward_loop=calibrate)
    export_hf_checkpoint(model, export_dir=f"{out}/{cfg}")
"""
CONFIGS = ("W4A16_NVFP4_CFG", "NVFP4_DEFAULT_CFG")
QUANTIZED = (".weight_scale", ".weight_scale_2", ".input_scale")


def without_producer(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "producer"}


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    if not HAVE_MODELOPT:
        pytest.skip(f"nvidia-modelopt venv not found at {MODELOPT_PYTHON}")
    src, root = checkpoint("qwen3_moe"), tmp_path_factory.mktemp("modelopt")
    r = subprocess.run(
        [MODELOPT_PYTHON, "-c", CHILD, str(src), str(root), *CONFIGS], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return src, root


@pytest.mark.parametrize("config", CONFIGS)
def test_modelopt_export_matches_ours(exported, tmp_path, config) -> None:
    src, root = exported
    theirs_dir, ours_dir = root / config, tmp_path / "ours"
    theirs = load_tensors(theirs_dir)
    options = {"flavor": "modelopt", "targets": "all-linear"}
    scales = {k.removesuffix(".input_scale"): v for k, v in theirs.items() if k.endswith(".input_scale")}
    assert bool(scales) == (config == "NVFP4_DEFAULT_CFG")
    if scales:
        cal = {k: float(v.double() * (6 * 448)) for k, v in scales.items()}
        (tmp_path / "cal.json").write_text(json.dumps(cal))
        options["input_scales"] = str(tmp_path / "cal.json")
    here(src, ours_dir, "nvfp4", **options)
    ours = load_tensors(ours_dir)
    quantized = [k for k, t in theirs.items() if k.endswith(QUANTIZED) or t.dtype == torch.uint8]
    assert len(quantized) == 48 * (4 if scales else 3)  # every linear but the routers and lm_head
    for k in quantized:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(raw(ours[k]), raw(theirs[k])), k
    assert not [k for k in ours if k.endswith(QUANTIZED) and k not in theirs]
    for name in ("hf_quant_config.json", "config.json"):
        a, b = (json.loads((d / name).read_text()) for d in (ours_dir, theirs_dir))
        if name == "config.json":
            a, b = a["quantization_config"], b["quantization_config"]
        else:
            a, b = a["quantization"], b["quantization"]
        assert without_producer(a) == without_producer(b), name
