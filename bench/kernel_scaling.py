"""How a job's compute alone scales with CPU threads: no disk, no read-ahead, no writer.

    python bench/kernel_scaling.py [--layers 2] [--experts 16] [--jobs 3,4,5,6] [--threads 1,2,4,8,16]
                                   [--pin cores|all] [--work DIR] [--json OUT.json]

bench/real_shapes.py measures whole conversions; when N threads fall short of N x the one-thread
rate there, this tells whether the compute itself stops scaling (the CPU: shared cores of SMT
siblings, memory bandwidth, allocation) or the pipeline around it does (read-ahead, writer, disk).
Every MoE unit's inputs of `--layers` layers are read into memory first; then the units run on the
same thread pool a conversion uses (moeport.parallel.Workers), their outputs computed and dropped.

`--pin cores` runs N threads on N distinct physical cores (one logical CPU of each, from
/sys/devices/system/cpu/*/topology), `--pin siblings` on N/2 cores with both of their logical
CPUs, `--pin all` (default) on every CPU the process may use. The CPU topology is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from real_shapes import JOBS, build_sources  # bench/ is on sys.path

from moeport.convert.plan import apply_unit
from moeport.detect import detect
from moeport.mappings.values import realize
from moeport.parallel import Workers
from moeport.recipes import TARGETS, Options
from moeport.sources import open_checkpoint


def topology() -> dict[int, list[int]]:
    """Physical core id (package, core) -> its logical CPUs this process may use."""
    cores: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            key = (int((base / "physical_package_id").read_text()), int((base / "core_id").read_text()))
        except OSError:  # no topology: count each CPU as a core
            key = (0, cpu)
        cores.setdefault(key, []).append(cpu)
    return {i: cpus for i, (_, cpus) in enumerate(sorted(cores.items()))}


def cpus_for(n: int, pin: str, cores: dict[int, list[int]]) -> set[int] | None:
    """The CPUs to run `n` threads on, or None when that pinning cannot give them."""
    if pin == "all":
        return set().union(*cores.values())
    if pin == "cores":
        return {cpus[0] for cpus in list(cores.values())[:n]} if n <= len(cores) else None
    pairs = [cpus for cpus in cores.values() if len(cpus) >= 2][: max(1, n // 2)]
    chosen = {c for cpus in pairs for c in cpus[:2]}
    return chosen if len(chosen) == n else None


def held_units(src: Path, to: str, extra: dict, layers: int):
    """(checkpoint, units of the MoE layers, their inputs in memory, source bytes)."""
    ck = open_checkpoint(src).__enter__()
    target = TARGETS[to]
    plan, _ = target.build(ck, detect(ck), Options(**{**extra, "device": "cpu"}), {})
    moe = sorted({u.layer for u in plan.units if u.layer is not None and u.layer > 0})[:layers]
    units = [u for u in plan.units if u.layer in moe]
    tensors = {n: ck.read(n).clone() for u in units for n in u.op.inputs}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return ck, units, tensors, nbytes


def run(ck, units, tensors, threads: int) -> float:
    """Seconds to compute every unit's outputs on `threads` threads (outputs dropped)."""

    def task(unit):
        def compute():
            for value in apply_unit(unit, ck, tensors.__getitem__).values():
                realize(value)

        return compute

    workers = Workers(threads)
    start = time.perf_counter()
    for _ in workers.ordered((i, task(u)) for i, u in enumerate(units)):
        pass
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--jobs", default="3,4,5,6", help="job numbers of bench/real_shapes.py (1-6)")
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--pin", default="all", help="comma-separated: all, cores, siblings")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # parallelism is across units, as in a conversion
    everything = os.sched_getaffinity(0)
    cores = topology()
    print(json.dumps({"logical_cpus": len(everything), "physical_cores": len(cores), "cores": cores}))
    work = args.work or Path(tempfile.mkdtemp(prefix="moeport-kscale-"))
    work.mkdir(parents=True, exist_ok=True)
    src = build_sources(work, args.layers, args.experts)
    rows = []
    for number in args.jobs.split(","):
        name = list(JOBS)[int(number) - 1]
        kind, to, extra = JOBS[name]
        ck, units, tensors, nbytes = held_units(src[kind], to, extra, args.layers)
        run(ck, units[:2], tensors, 1)  # compile / warm the kernels
        rates: dict[str, float] = {}
        for pin in args.pin.split(","):
            for n in (int(x) for x in args.threads.split(",")):
                cpus = cpus_for(n, pin, cores)
                if cpus is None:
                    continue
                os.sched_setaffinity(0, cpus)
                try:
                    rates[f"{pin} {n}"] = nbytes / run(ck, units, tensors, n) / 1e9
                finally:
                    os.sched_setaffinity(0, everything)
        one = rates.get("all 1") or rates.get("cores 1")
        row = {
            "job": name,
            "units": len(units),
            "gb": round(nbytes / 1e9, 2),
            "gbps": {k: round(v, 3) for k, v in rates.items()},
            # N threads vs N x one thread: the goal is >= 0.7
            "scaling": {k: round(v / (int(k.split()[1]) * one), 2) for k, v in rates.items()} if one else {},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del tensors
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "jobs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
