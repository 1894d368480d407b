"""GPU fast path: `--device cuda` vs `--device cpu` on the same checkpoint, against the I/O bounds.

    python bench/gpu_path.py --gb 4 [--work DIR]

Builds a seeded synthetic DeepSeek-V3-shaped BF16 checkpoint and its FP8-block copy, then times
each job on CPU and on CUDA (each a fresh process, output byte-compared between the two) and
prints GB/s of source bytes next to three bounds measured in the same run: reading the source
(`cat` to /dev/null, warm page cache), writing to the work folder's disk (write + fsync) and a
pinned host-to-device copy (PCIe). "out GB/s" is the CUDA run's output bytes over its time, to
hold against the write bound.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from scratch import work_dir

from moeport.sinks.safetensors_file import start_writeback
from moeport.sources import open_checkpoint
from moeport.synthetic import SyntheticSpec, write_synthetic

JOBS = [  # (name, source, convert arguments)
    ("FP8 -> BF16 (hf)", "fp8", ["--to", "hf", "--dtype", "bf16"]),
    ("BF16 -> W4A16 experts", "bf16", ["--to", "w4a16"]),
    ("FP8 -> W4A16 experts", "fp8", ["--to", "w4a16"]),
    ("BF16 -> kt INT4", "bf16", ["--to", "kt-int4"]),
    ("FP8 -> kt INT4", "fp8", ["--to", "kt-int4"]),
]


def timed(cmd: list[str]) -> float:
    return run(cmd)[0]


def run(cmd: list[str]) -> tuple[float, float | None]:
    """Wall seconds of the process, and the conversion's own seconds as it reports them
    ("... in X s": without interpreter start-up and CUDA initialisation)."""
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)}:\n{r.stderr[-2000:]}")
    m = re.search(r" in\s+([\d.]+)\s+s\b", r.stdout)
    return time.perf_counter() - start, float(m[1]) if m else None


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    return names == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def write_gbps(folder: Path, nbytes: int = 2 * 2**30, writeback: bool = False) -> float:
    """Writing `nbytes` to a file in `folder` and fsyncing it, as a conversion's output is;
    `writeback`: starting the disk's writeback after every 64 MiB, as moeport's writer does (the
    disk's sustained rate, where plain write + fsync adds the page-cache copy before the flush)."""
    block = os.urandom(64 * 2**20)
    path = folder / "write-bound.tmp"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(nbytes // len(block)):
            os.write(fd, block)
            if writeback:
                start_writeback(fd, i * len(block), len(block))
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / seconds / 1e9


def output_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pcie_gbps(nbytes: int = 2 * 2**30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    work = work_dir(args.work, "moeport-gpu-")
    src = {"bf16": work / "bf16", "fp8": work / "fp8"}
    moeport = [sys.executable, "-m", "moeport", "convert", "--overwrite"]
    if not (src["bf16"] / "config.json").exists():
        write_synthetic(src["bf16"], SyntheticSpec.of_size(args.gb))
    if not (src["fp8"] / "config.json").exists():
        timed([*moeport, str(src["bf16"]), str(src["fp8"]), "--to", "fp8-block", "--device", "cuda"])
    size = {k: open_checkpoint(v).total_bytes for k, v in src.items()}
    read = {}
    for k, v in src.items():
        files = [str(f) for f in sorted(v.glob("*.safetensors"))]
        cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]
        timed(cat)  # warm the page cache, as it is for the jobs
        read[k] = size[k] / timed(cat) / 1e9
    pcie = pcie_gbps()
    write = write_gbps(work)
    print(
        f"{torch.cuda.get_device_name()}; source {size['bf16'] / 1e9:.2f} GB BF16, "
        f"{size['fp8'] / 1e9:.2f} GB FP8"
    )
    print(
        f"bounds: read (warm cache) BF16 {read['bf16']:.2f} GB/s, FP8 {read['fp8']:.2f} GB/s; "
        f"write + fsync {write:.2f} GB/s; PCIe H2D {pcie:.1f} GB/s"
    )
    print("wall: whole process; conv: the conversion itself (no start-up, no CUDA initialisation)")
    print(
        "| job | CPU wall s | CUDA wall s | CPU conv GB/s | CUDA conv GB/s | CUDA / CPU "
        "| CUDA out GB/s | bytes equal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, kind, extra in JOBS:
        out = {d: work / f"out-{d}" for d in ("cpu", "cuda")}
        wall, conv = {}, {}
        for d in ("cpu", "cuda"):
            shutil.rmtree(out[d], ignore_errors=True)
            wall[d], conv[d] = run([*moeport, str(src[kind]), str(out[d]), *extra, "--device", d])
        gb = {d: size[kind] / conv[d] / 1e9 if conv[d] else float("nan") for d in conv}
        equal = same_output(out["cpu"], out["cuda"])
        out_gbps = output_bytes(out["cuda"]) / conv["cuda"] / 1e9 if conv["cuda"] else float("nan")
        print(
            f"| {name} | {wall['cpu']:.1f} | {wall['cuda']:.1f} | {gb['cpu']:.2f} | {gb['cuda']:.2f} "
            f"| {gb['cuda'] / gb['cpu']:.2f}× | {out_gbps:.2f} | {equal} |"
        )


if __name__ == "__main__":
    main()
