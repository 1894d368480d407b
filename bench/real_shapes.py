"""Throughput on DeepSeek-V3's real expert shape, against the machine's bounds, CPU threads and CUDA.

    python bench/real_shapes.py [--layers 7] [--experts 16] [--threads 1,2,4,8,16] [--devices cpu,cuda]
                                [--jobs all] [--work DIR] [--json OUT.json]

Builds a seeded synthetic checkpoint whose experts have DeepSeek-V3's shape (hidden 7168, expert
intermediate 2048; `--layers` MoE layers of `--experts` routed + 1 shared expert; small attention
and vocabulary) and its FP8-block copy, then measures in one run:

- bounds: reading the source (`cat`, warm page cache), write + fsync to the work disk, pinned
  host-to-device copy (PCIe, with CUDA);
- per job, its compute alone ("kernel" rate): the job's own plan applied to one MoE layer held in
  memory, nothing written, on one CPU thread (and batched on CUDA, transfers included);
- per job, the whole conversion in this process (no interpreter start-up) on `--threads` CPU
  thread counts and on CUDA, as GB/s of source bytes, with output bytes compared (xxh3 of every
  file) to the one-thread CPU run.

The CPU goal (issue 15): N threads >= 0.7 x N x the one-thread kernel rate, until a disk bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import xxhash
from gpu_path import pcie_gbps, write_gbps  # the same bounds as the GPU bench (bench/ is on sys.path)
from scratch import work_dir

from moeport.convert.batching import DEFAULT_HOST_THREADS, Batcher, batching
from moeport.convert.execute import describe_recipe, execute
from moeport.convert.plan import apply_unit
from moeport.detect import detect
from moeport.mappings.values import realize
from moeport.parallel import available_cores
from moeport.recipes import TARGETS, Options, job_recipe
from moeport.sources import open_checkpoint
from moeport.synthetic import SyntheticSpec, write_synthetic

JOBS = {  # name: (source, target, options)
    "BF16 -> fused (lossless)": ("bf16", "hf", {"layout": "fused"}),
    "FP8 -> BF16 hub": ("fp8", "hf", {"dtype": "bf16"}),
    "BF16 -> W4A16": ("bf16", "w4a16", {}),
    "FP8 -> W4A16": ("fp8", "w4a16", {}),
    "BF16 -> kt INT4": ("bf16", "kt-int4", {}),
    "FP8 -> kt INT4": ("fp8", "kt-int4", {}),
}


def real_shape_spec(layers: int, experts: int) -> SyntheticSpec:
    return SyntheticSpec(
        hidden_size=7168,
        intermediate_size=2048,
        moe_intermediate_size=2048,
        num_hidden_layers=layers + 1,  # layer 0 is dense, as DeepSeek-V3's first layers are
        first_k_dense_replace=1,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=min(8, experts),
        num_attention_heads=8,
        q_lora_rank=256,
        kv_lora_rank=128,
        vocab_size=4096,
    )


def build_sources(work: Path, layers: int, experts: int) -> dict[str, Path]:
    src = {"bf16": work / "bf16", "fp8": work / "fp8"}
    if not (src["bf16"] / "config.json").exists():
        write_synthetic(src["bf16"], real_shape_spec(layers, experts))
    if not (src["fp8"] / "config.json").exists():
        convert(src["bf16"], work / "fp8", "fp8-block", {}, "cpu", available_cores())
    return src


def convert(
    src: Path, dst: Path, to: str, extra: dict, device: str, threads: int, host_threads: int = 0
) -> tuple[float, int]:
    """One conversion in this process: (seconds, bytes written). On CUDA, `host_threads` (0: the
    default) host threads run its batches."""
    shutil.rmtree(dst, ignore_errors=True)
    target = TARGETS[to]
    options = Options(**{**extra, "device": device})
    with open_checkpoint(src) as ck:
        det = detect(ck)
        recipe = job_recipe(target, options, ck, det)
        plan, sink = target.build(ck, det, options, describe_recipe(**recipe))
        batcher = None
        if device != "cpu":
            batcher = Batcher(device, host_threads=host_threads or DEFAULT_HOST_THREADS)
        result = execute(plan, ck, dst, sink, None, None, batcher, recipe=recipe, threads=threads)
    return result.seconds, result.bytes_written


def digest(folder: Path) -> str:
    h = xxhash.xxh3_128()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "moeport-journal.json":
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while chunk := f.read(64 * 2**20):
                    h.update(chunk)
    return h.hexdigest()


def kernel_rate(src: Path, to: str, extra: dict, device: str) -> float:
    """GB/s of source bytes of the job's own compute on one MoE layer in memory, one CPU thread
    (or batched on CUDA), nothing read from disk or written."""
    target = TARGETS[to]
    options = Options(**{**extra, "device": device})
    with open_checkpoint(src) as ck:
        det = detect(ck)
        plan, _ = target.build(ck, det, options, {})
        layer = next(u.layer for u in plan.units if u.layer is not None and u.layer > 0)
        units = [u for u in plan.units if u.layer == layer]
        tensors = {n: ck.read(n) for u in units for n in u.op.inputs}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            best = float("inf")
            for _ in range(2):  # the first also compiles/warms
                batcher = Batcher(device) if device != "cpu" else None
                start = time.perf_counter()
                with batching(batcher):
                    outs = [apply_unit(u, ck, tensors.__getitem__) for u in units]
                    for out in outs:
                        for value in out.values():
                            realize(value)
                if device != "cpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
    return nbytes / best / 1e9


def read_gbps(folder: Path) -> float:
    files = [str(f) for f in sorted(folder.glob("*.safetensors"))]
    size = sum(os.path.getsize(f) for f in files)
    cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]
    subprocess.run(cat, check=True)  # warm the page cache, as it is for the jobs
    start = time.perf_counter()
    subprocess.run(cat, check=True)
    return size / (time.perf_counter() - start) / 1e9


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--jobs", default="all", help="comma-separated job numbers (1-6) or 'all'")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD here)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where outputs go (default: the work folder; /dev/shm takes the disk out)",
    )
    args = ap.parse_args()
    cores = available_cores()
    threads = [n for n in (int(x) for x in args.threads.split(",")) if n <= cores]
    # "cuda": batches run by the default number of host threads; "cuda@N": by N host threads
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    names = list(JOBS) if args.jobs == "all" else [list(JOBS)[int(i) - 1] for i in args.jobs.split(",")]
    work = work_dir(args.work, "moeport-real-")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = build_sources(work, args.layers, args.experts)
    size = {k: sum(f.stat().st_size for f in v.glob("*.safetensors")) for k, v in src.items()}
    report: dict = {
        "machine": f"{platform.node()}: {cores} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if any(d.startswith("cuda") for d in devices) else ""),
        "commit": args.commit or git_commit(),
        "source_gb": {k: round(v / 1e9, 2) for k, v in size.items()},
        "build_s": round(time.perf_counter() - t0, 1),
    }
    bounds = {f"read {k}": read_gbps(v) for k, v in src.items()}
    bounds["write+fsync"] = write_gbps(args.out or work)
    bounds["write, writeback as it goes"] = write_gbps(args.out or work, writeback=True)
    if any(d.startswith("cuda") for d in devices):
        bounds["PCIe H2D"] = pcie_gbps()
    report["bounds_gbps"] = {k: round(v, 2) for k, v in bounds.items()}
    print(json.dumps(report), flush=True)
    rows = []
    for name in names:
        kind, to, extra = JOBS[name]
        row: dict = {"job": name, "kernel_1t": round(kernel_rate(src[kind], to, extra, "cpu"), 3)}
        if any(d.startswith("cuda") for d in devices):
            row["kernel_cuda"] = round(kernel_rate(src[kind], to, extra, "cuda"), 2)
        reference = None
        for spec in devices:
            device, _, host_threads = spec.partition("@")
            for n in threads if device == "cpu" else [cores]:
                out = (args.out or work) / "out"
                seconds, written = convert(src[kind], out, to, extra, device, n, int(host_threads or 0))
                key = f"{device}{n}" if device == "cpu" else spec
                row[key] = round(size[kind] / seconds / 1e9, 3)
                row[f"{key}_out"] = round(written / seconds / 1e9, 3)
                d = digest(out)
                reference = reference or d
                row[f"{key}_same"] = d == reference
        rows.append(row)
        print(json.dumps(row), flush=True)
    report["jobs"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, threads, devices)


def print_table(report: dict, threads: list[int], devices: list[str]) -> None:
    cuda = [d for d in devices if d.startswith("cuda")]
    cols = [f"cpu{n}" for n in threads if "cpu" in devices] + cuda
    head = ["job", "kernel 1 thread"] + [
        c.replace("cpu", "CPU ") + " thr" if c.startswith("cpu") else c.replace("@", ", host threads ")
        for c in cols
    ]
    print("| " + " | ".join(head) + " | N-thread / (N x kernel) | bytes equal |")
    print("|" + "---|" * (len(head) + 2))
    for row in report["jobs"]:
        k = row["kernel_1t"]
        cells = [row["job"], f"{k:.3f}"] + [f"{row[c]:.3f} ({row[c + '_out']:.2f})" for c in cols]
        eff = ", ".join(f"{n}: {row[f'cpu{n}'] / (n * k):.2f}" for n in threads if f"cpu{n}" in row)
        same = all(row[f"{c}_same"] for c in cols)
        print("| " + " | ".join(cells) + f" | {eff} | {same} |")


if __name__ == "__main__":
    sys.exit(main())
