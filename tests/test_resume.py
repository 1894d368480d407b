"""Resume belongs to the executor: every target continues after SIGKILL with byte-identical output,
refuses a different recipe into the same folder, and redoes a kept piece whose bytes changed."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import sigint_default

from moeport.convert.destination import JOURNAL_NAME, staging_of

H = I_SIZE = 256
# target -> its options; small shards so that an HF output has many pieces to resume from
JOBS = {
    "hf-fused": ("--to", "hf", "--layout", "fused", "--max-shard-size", "600KB"),
    "w4a16": ("--to", "w4a16", "--group-size", "64", "--max-shard-size", "600KB"),
    "kt-merged": ("--to", "kt-int8", "--numa", "2", "--kt-layout", "merged"),
    "kt-folders": ("--to", "kt-int4", "--numa", "2", "--kt-layout", "folders"),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A DeepSeek-V3-shaped BF16 checkpoint with 5 MoE layers of 8 experts."""
    from moeport.synthetic import SyntheticSpec, write_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "ds"
    spec = SyntheticSpec(hidden_size=H, moe_intermediate_size=I_SIZE, n_routed_experts=8, num_hidden_layers=6)
    write_synthetic(out, spec)
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeport", "convert", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pieces_done(dst: Path) -> int | None:
    """Pieces the journal records as published (in the staging folder while the run is going)."""
    for journal in (staging_of(dst) / JOURNAL_NAME, dst / JOURNAL_NAME):
        try:
            return len(json.loads(journal.read_text())["steps"])
        except (OSError, ValueError):
            continue
    return None


def kill_when(proc: subprocess.Popen, ready) -> bool:
    """SIGKILL `proc` as soon as ready() holds (polled every ms); False if it finished first."""
    while proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("job", sorted(JOBS))
def test_sigkill_and_resume_is_byte_identical(synthetic, tmp_path, job):
    """Kills land at seeded points of progress (after k published pieces, or while a piece is being
    written), found by watching the staging folder, so they fall inside the conversion whatever
    the machine's speed; the re-run finishes the job with exactly the uninterrupted run's bytes."""
    args = JOBS[job]
    ref = tmp_path / "ref"
    assert cli(str(synthetic), str(ref), *args).returncode == 0
    want = tree(ref)
    total = pieces_done(ref)
    assert total and total >= 4, total
    rng = random.Random(sum(map(ord, job)))
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "moeport", "convert", str(synthetic), str(dst), *args, "--quiet"]
    killed = []
    for target in sorted(rng.sample(range(1, total), 3)):
        inside = rng.random() < 0.5  # while a piece's temporary file or folder exists

        def ready(target=target, inside=inside) -> bool:
            n = pieces_done(dst) or 0
            if inside:
                partial = staging_of(dst).glob("*.partial")
                return n >= target - 1 and any(not p.name.endswith(".json.partial") for p in partial)
            return n >= target

        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_when(proc, ready):
            killed.append((target, inside, pieces_done(dst)))
            assert not dst.exists()  # nothing at DST until the output is whole
    assert killed, "every run finished before its kill point"
    # a kill may land after the last piece is recorded but before DST is published: still a kill
    assert all(n is not None and n <= total for _, _, n in killed), killed
    assert any(n < total for _, _, n in killed), killed
    result = cli(str(synthetic), str(dst), *args)
    assert result.returncode == 0, result.stderr
    assert tree(dst) == want
    assert not staging_of(dst).exists()


@pytest.mark.parametrize("job", ["hf-fused", "kt-merged"])
def test_a_changed_kept_piece_is_redone(synthetic, tmp_path, job):
    """A piece the journal lists as published but whose bytes changed since is written again."""
    args = JOBS[job]
    ref, dst = tmp_path / "ref", tmp_path / "dst"
    assert cli(str(synthetic), str(ref), *args).returncode == 0
    staging = staging_of(dst)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeport", "convert", str(synthetic), str(dst), *args, "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert kill_when(proc, lambda: (pieces_done(dst) or 0) >= 2)
    done = sorted(json.loads((staging / JOURNAL_NAME).read_text())["steps"])
    victim = staging / done[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40  # one flipped bit in a tensor, same size
    victim.write_bytes(bytes(data))
    assert cli(str(synthetic), str(dst), *args).returncode == 0
    assert tree(dst) == tree(ref)


@pytest.mark.parametrize("job", ["hf-fused", "w4a16"])
def test_recipe_mismatch_refused_and_complete_is_noop(synthetic, tmp_path, job):
    args = JOBS[job]
    dst = tmp_path / "out"
    assert cli(str(synthetic), str(dst), *args).returncode == 0
    before = tree(dst)
    again = subprocess.run(
        [sys.executable, "-m", "moeport", "convert", str(synthetic), str(dst), *args],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "already complete" in " ".join(again.stdout.split()), again.stderr
    other = cli(str(synthetic), str(dst), "--to", "fp8")
    assert other.returncode == 2 and "different recipe" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert tree(dst) == before


def test_ctrl_c_says_how_to_resume(synthetic, tmp_path):
    args = JOBS["w4a16"]
    ref, dst = tmp_path / "ref", tmp_path / "dst"
    assert cli(str(synthetic), str(ref), *args).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "moeport", "convert", str(synthetic), str(dst), *args, "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    )
    while proc.poll() is None and (pieces_done(dst) or 0) < 2:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and not dst.exists(), err
    assert err == "interrupted: run the same command again to continue where it stopped\n"
    assert cli(str(synthetic), str(dst), *args).returncode == 0
    assert tree(dst) == tree(ref)
