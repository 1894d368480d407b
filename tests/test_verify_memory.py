"""verify streams: on a GPT-OSS-shaped MXFP4 checkpoint it holds about one tensor of each side,
says how much before it starts (and refuses a smaller --max-memory), and stays within it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import COMMON, FAMILY_CONFIGS
from public_fixtures import gpt_oss_mxfp4
from typer.testing import CliRunner

from moeport.cli.app import app
from moeport.errors import MoeportError
from moeport.verify.run import verify

E, H, I_SIZE = 24, 512, 512

PEAK = """
import json, resource, sys
import torch
from moeport.verify.compare import measure
from moeport.verify.run import verify
measure("warm-up", 0, torch.randn(64, 64), torch.randn(64, 64))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
bound = verify(sys.argv[1], sys.argv[2], lossless=False).memory_bound if len(sys.argv) > 2 else 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"above": (peak - base) * 1024, "bound": bound}))
"""


def _peak(*args: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_verify_holds_a_tensor_per_side_not_a_layer(tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    over = dict(
        hidden_size=H, intermediate_size=I_SIZE, num_local_experts=E, num_hidden_layers=1, head_dim=64
    )
    cfg = AutoConfig.for_model("gpt_oss", **{**COMMON, **FAMILY_CONFIGS["gpt_oss"], **over})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    mxfp4 = gpt_oss_mxfp4(tmp_path / "bf16", tmp_path / "mxfp4")
    layer = 4 * E * 3 * H * I_SIZE  # one MoE layer of experts in float32 (what verify held per side)
    found = _peak(mxfp4, tmp_path / "bf16")
    assert found["above"] <= found["bound"] < 2 * layer, found
    cli = ["verify", str(mxfp4), str(tmp_path / "bf16"), "--lossy"]
    shown = CliRunner().invoke(app, cli)
    assert shown.exit_code == 0 and "memory: at most " in shown.stdout, shown.output
    with pytest.raises(MoeportError, match=r"--max-memory 10 MB is below it"):
        verify(mxfp4, tmp_path / "bf16", max_memory=10_000_000)
