"""Nothing wrong ever leaves with exit 0: bad input, changed sources, races and non-finite weights
end in one line and exit 2 with no output at DST; everything else ends verified."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures import sigint_default
from safetensors.torch import load_file, save_file

from moeport.convert.destination import JOURNAL_NAME, staging_of


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeport", *args], capture_output=True, text=True, timeout=300
    )


def refused(result: subprocess.CompletedProcess, dst: Path | None, *words: str) -> str:
    """Exit 2, one line naming what is wrong, no traceback, nothing at DST."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = " ".join(lines[0].split())
    for w in words:
        assert w in line, line
    if dst is not None:
        assert not dst.exists()
    return line


def edited(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    """A copy of `src` with its tensors changed by edit(dict) and/or its config by config_edit(dict)."""
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("to", ["w4a16", "fp8-block", "fp8"])
def test_nonfinite_weights_are_refused_unless_allowed(tiny, tmp_path, to):
    def poison(t):
        t[EXPERT][5, 7] = float("nan")
        t[EXPERT][5, 9] = float("inf")
        t[EXPERT][9, 1] = float("-inf")

    src = edited(tiny, tmp_path / "src", poison)
    dst = tmp_path / "out"
    line = refused(
        cli("convert", str(src), str(dst), "--to", to, "--quiet"), dst, EXPERT.removesuffix(".weight")
    )
    assert "3 NaN/Inf value(s) in 2 row(s), first in row 5" in line and "--allow-nonfinite" in line
    assert cli("convert", str(src), str(dst), "--to", to, "--quiet", "--allow-nonfinite").returncode == 0


def test_missing_router_or_its_bias_is_refused_before_any_work(tiny, tmp_path):
    for i, key in enumerate(
        ("model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.e_score_correction_bias")
    ):
        src = edited(tiny, tmp_path / f"src{i}", lambda t, k=key: t.pop(k))
        for args in (("inspect", str(src)), ("convert", str(src), str(tmp_path / f"out{i}"), "--quiet")):
            refused(cli(*args), tmp_path / f"out{i}", key)


def test_a_layer_missing_a_norm_is_refused(tiny, tmp_path):
    key = "model.layers.2.post_attention_layernorm.weight"
    src = edited(tiny, tmp_path / "src", lambda t: t.pop(key))
    refused(cli("convert", str(src), str(tmp_path / "out"), "--quiet"), tmp_path / "out", key)


def test_transposed_expert_is_refused_even_for_a_plain_copy(tiny, tmp_path):
    def transpose(t):
        t[EXPERT] = t[EXPERT].t().contiguous()

    src = edited(tiny, tmp_path / "src", transpose)
    refused(cli("convert", str(src), str(tmp_path / "out"), "--quiet"), tmp_path / "out", EXPERT, "shape")


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("n_routed_experts", "8", ["n_routed_experts", "'8'", "whole number"]),
        ("hidden_size", 256.5, ["hidden_size", "256.5"]),
        ("n_routed_experts", 16, ["16 experts per layer", "hold 8"]),
    ],
)
def test_bad_config_values_are_refused(tiny, tmp_path, field, value, words):
    src = edited(tiny, tmp_path / "src", config_edit=lambda c: c.update({field: value}))
    refused(cli("convert", str(src), str(tmp_path / "out"), "--quiet"), tmp_path / "out", *words)


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = mutate(raw[8 : 8 + n].decode().rstrip())
    text += " " * (n - len(text))
    assert len(text) == n  # same length: the data stays where it was
    path.write_bytes(raw[:8] + text.encode() + raw[8 + n :])


@pytest.mark.parametrize(
    "old,new,words",
    [
        ('"shape":[8]', '"shape":[8.0]', ["shape [8.0]", "non-negative integers"]),
        ('"shape":[256,512]', '"shape":[-256,-512]', ["shape [-256, -512]"]),
    ],
)
def test_bad_header_values_are_refused(tiny, tmp_path, old, new, words):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny.iterdir():
        (src / f.name).write_bytes(f.read_bytes())

    def mutate(text: str) -> str:
        assert old in text
        return text.replace(old, new, 1)

    _rewrite_header(src / "model.safetensors", mutate)
    for args in (("inspect", str(src)), ("convert", str(src), str(tmp_path / "out"), "--quiet")):
        refused(cli(*args), tmp_path / "out", *words)


def test_duplicate_header_key_is_refused(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    key = "model.norm.weight"

    def duplicate(text: str) -> str:
        doc = json.loads(text)
        entry = json.dumps(doc[key], separators=(",", ":"))
        return text[:-1] + f',"{key}":{entry}' + "}"

    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = duplicate(raw[8 : 8 + n].decode().rstrip())
    padded = text + " " * (-len(text) % 8)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(padded)) + padded.encode() + raw[8 + n :])
    refused(cli("inspect", str(src)), None, f"key '{key}' appears twice")


@pytest.mark.parametrize(
    "shard,words",
    [
        (7, ["'weight_map' values must be shard file names"]),
        ("../../etc/passwd", ["'../../etc/passwd'", "not a .safetensors file inside the folder"]),
        ("/etc/hosts.safetensors", ["'/etc/hosts.safetensors'", "inside the folder"]),
    ],
)
def test_index_may_not_point_outside_the_checkpoint(tiny, tmp_path, shard, words):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    keys = list(load_file(str(src / "model.safetensors")))
    weight_map = dict.fromkeys(keys, "model.safetensors") | {keys[0]: shard}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(cli("inspect", str(src)), None, *words)


def test_symlinked_shards_are_followed(tiny, tmp_path):
    """Hugging Face cache snapshots are links into blobs/: they convert like the files themselves."""
    src = tmp_path / "snapshot"
    src.mkdir()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in tiny.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (src / f.name).symlink_to(blobs / f.name)
    assert cli("convert", str(src), str(tmp_path / "out"), "--quiet").returncode == 0
    assert (
        load_file(str(tmp_path / "out" / "model.safetensors")).keys()
        == load_file(str(tiny / "model.safetensors")).keys()
    )


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> Path:
    """Sharded, with enough layers that a run lasts long enough to be interfered with."""
    from moeport.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("bigger") / "ds"
    spec = SyntheticSpec(hidden_size=256, moe_intermediate_size=256, n_routed_experts=8, num_hidden_layers=6)
    write_synthetic(out, spec)
    return out


def _pieces(dst: Path) -> int:
    try:
        return len(json.loads((staging_of(dst) / JOURNAL_NAME).read_text())["steps"])
    except (OSError, ValueError):
        return 0


def _start(src: Path, dst: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moeport", "convert", str(src), str(dst), "--quiet", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default
    )


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            return True
        time.sleep(0.002)
    return False


def test_a_source_changed_during_the_run_is_refused(bigger, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in bigger.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    shard = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    dst = tmp_path / "out"
    proc = _start(src, dst, "--to", "hf", "--layout", "fused", "--max-shard-size", "300KB")
    assert _wait_for(proc, lambda: _pieces(dst) >= 1), "the run ended before its first piece"
    with open(shard, "r+b") as fh:  # same size, new bytes in the middle: a copy still running
        fh.seek(shard.stat().st_size // 2)
        fh.write(os.urandom(4096))
    out, err = proc.communicate(timeout=300)
    refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), dst, str(shard), "changed")


def test_a_second_run_into_the_same_destination_is_refused(tiny, tmp_path):
    """While one run holds DST's lock (taken here exactly as a run takes it), another is refused
    naming the holder; once it is released, the same command runs."""
    from moeport.convert.destination import locked

    dst = tmp_path / "out"
    with locked(dst):
        refused(cli("convert", str(tiny), str(dst), "--quiet"), dst, str(dst), f"pid {os.getpid()}")
    assert not dst.with_name(f".{dst.name}.moeport-lock").exists()
    assert cli("convert", str(tiny), str(dst), "--quiet").returncode == 0
    assert not dst.with_name(f".{dst.name}.moeport-lock").exists()


def test_no_disk_space_is_found_before_any_work(tiny, tmp_path, monkeypatch, capsys):
    from moeport.cli.app import main
    from moeport.convert import destination

    monkeypatch.setattr(destination, "free_bytes", lambda p: 1000)
    for to in ("hf", "w4a16", "kt-int4"):
        monkeypatch.setattr(sys, "argv", ["moeport", "convert", str(tiny), str(tmp_path / to), "--to", to])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        assert "not enough disk space" in capsys.readouterr().err
        assert not (tmp_path / to).exists() and not staging_of(tmp_path / to).exists()


def test_interrupt_signal_leaves_no_output_and_resumes(bigger, tmp_path):
    """Ctrl-C (SIGINT) mid-run: exit 130, nothing at DST; the same command then finishes."""
    dst = tmp_path / "out"
    args = ("--to", "hf", "--layout", "fused", "--max-shard-size", "100KB")
    proc = _start(bigger, dst, *args)
    # the ~90 pieces are published within a second: the run is frozen (SIGSTOP) the moment two
    # are seen, so that a busy machine cannot let it finish before the interrupt is delivered
    assert _wait_for(proc, lambda: _pieces(dst) >= 2 and proc.send_signal(signal.SIGSTOP) is None)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and not dst.exists()
    assert cli("convert", str(bigger), str(dst), "--quiet", *args).returncode == 0
    back, want = load_file(str(next(dst.glob("*.safetensors")))), None
    assert back and all(torch.isfinite(t.float()).all() for t in back.values() if t.is_floating_point())
    assert want is None


@pytest.mark.parametrize("case", ["staging-is-a-file", "parent-is-a-file", "under-proc"])
def test_unusable_destinations_are_one_line(tiny, tmp_path, case):
    if case == "staging-is-a-file":
        dst = tmp_path / "out"
        staging_of(dst).write_text("not ours")
        words = [str(staging_of(dst)), "not a folder"]
    elif case == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        dst = tmp_path / "file" / "out"
        words = ["file"]
    else:
        dst = Path("/proc/moeport-test-out")
        words = ["/proc"]
    refused(cli("convert", str(tiny), str(dst), "--quiet"), None, *words)
