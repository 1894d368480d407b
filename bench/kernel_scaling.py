"""How a job's compute alone scales with CPU threads: no disk, no read-ahead, no writer.

    python bench/kernel_scaling.py [--layers 2] [--experts 16] [--jobs 3,4,5,6] [--threads 1,2,4,8,16]
                                   [--pin cores|all] [--work DIR] [--json OUT.json]

bench/real_shapes.py measures whole conversions; when N threads fall short of N x the one-thread
rate there, this tells whether the compute itself stops scaling (the CPU: shared cores of SMT
siblings, memory bandwidth, allocation) or the pipeline around it does (read-ahead, writer, disk).
Every MoE unit's inputs of `--layers` layers are read into memory first; then the units run on the
same thread pool a conversion uses (moeport.parallel.Workers), their outputs computed and dropped.

Two probes of the machine itself run first, on the same thread counts: an arithmetic loop held in
registers (how many cores' worth of compute N threads get: turbo clocks, vCPUs that share a
host core) and a copy of private 256 MiB buffers per thread (memory bandwidth). A job that
scales as the arithmetic probe does is at the CPU's limit, not ours.

`--pin cores` runs N threads on N distinct physical cores (one logical CPU of each, from
/sys/devices/system/cpu/*/topology), `--pin siblings` on N/2 cores with both of their logical
CPUs, `--pin all` (default) on every CPU the process may use. The CPU topology is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from real_shapes import JOBS, build_sources  # bench/ is on sys.path
from scratch import work_dir

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


def _probe_kernels():
    from numba import njit

    @njit(nogil=True, cache=True)
    def spin(n):  # pragma: no cover - compiled
        a = b = c = d = 1.0
        for _ in range(n):  # four independent multiply-add chains, no memory traffic
            a = a * 0.999999 + 1e-7
            b = b * 0.999998 + 2e-7
            c = c * 0.999997 + 3e-7
            d = d * 0.999996 + 4e-7
        return a + b + c + d

    return spin


def probe(threads: int, which: str) -> float:
    """Aggregate rate of `threads` threads running the arithmetic or copy probe (units/s)."""
    from concurrent.futures import ThreadPoolExecutor

    if which == "alu":
        spin = _probe_kernels()
        spin(10)
        steps = 200_000_000

        def work() -> None:
            spin(steps)
    else:
        steps = 256 * 2**20 * 8  # bytes read and written per thread: 8 copies of 256 MiB
        bufs = [(torch.randn(2**26), torch.empty(2**26)) for _ in range(threads)]

        def work() -> None:
            src, dst = bufs.pop()
            for _ in range(8):
                dst.copy_(src)

    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda _: work(), range(threads)))
        seconds = time.perf_counter() - start
    return threads * steps / seconds / 1e9


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
    probes: dict[str, dict[str, float]] = {}
    for which in ("alu", "copy"):
        rates = {n: max(probe(n, which) for _ in range(2)) for n in (int(x) for x in args.threads.split(","))}
        one = rates[min(rates)] / min(rates)
        probes[which] = {str(n): round(r / (n * one), 2) for n, r in rates.items()}
        probes[which + " rate"] = {str(n): round(r, 2) for n, r in rates.items()}
    # arithmetic: G multiply-adds/s per chain step x4; copy: GB/s of bytes copied
    print(json.dumps({"probes, N threads / (N x one)": probes}), flush=True)
    work = work_dir(args.work, "moeport-kscale-")
    work.mkdir(parents=True, exist_ok=True)
    src = build_sources(work, args.layers, args.experts)
    rows = []
    for number in args.jobs.split(","):
        name = list(JOBS)[int(number) - 1]
        kind, to, extra = JOBS[name]
        ck, units, tensors, nbytes = held_units(src[kind], to, extra, args.layers)
        run(ck, units, tensors, 2)  # compile / warm the kernels of every kind of unit
        rates: dict[str, float] = {}
        for pin in args.pin.split(","):
            for n in (int(x) for x in args.threads.split(",")):
                cpus = cpus_for(n, pin, cores)
                if cpus is None:
                    continue
                os.sched_setaffinity(0, cpus)
                try:
                    best = min(run(ck, units, tensors, n) for _ in range(2))
                    rates[f"{pin} {n}"] = nbytes / best / 1e9
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
        args.json.write_text(json.dumps({"cores": cores, "probes": probes, "jobs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
