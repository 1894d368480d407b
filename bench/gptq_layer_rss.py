"""Peak RSS of `--method gptq` per decoder layer, in-process: does anything grow with depth?

    python bench/gptq_layer_rss.py [--layers 24] [--hidden 512] [--experts 16] [--work DIR] [-- EXTRA...]

Runs `moeport convert --to w4a16 --method gptq --all-experts` (32 x 128 seeded random ids) on a
seeded synthetic DeepSeek-V3-shaped checkpoint inside this process, with a thread sampling every
2 ms the RSS split into anonymous and file pages (/proc/self/status) and glibc's own account
(`mallinfo2`: bytes in use, heap arenas' size, mmapped blocks); each sample is charged to the
layer the walk is running (or "after L": between layers, while the executor writes). A peak that
grows from layer to layer while the bytes in use do not is the allocator (fragmentation); bytes in
use that grow are something kept. glibc only (mallinfo2: glibc 2.33+).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import threading
import time
from pathlib import Path

import torch
from scratch import work_dir
from typer.testing import CliRunner

from moeport.calibrate import sequential
from moeport.cli.app import app
from moeport.synthetic import SyntheticSpec, write_synthetic

MIB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("extra", nargs="*", help="more convert options (after --)")
    args = ap.parse_args()
    work = work_dir(args.work, "gptq-layers-")
    src = work / f"src-{args.layers}"
    if not (src / "config.json").exists():
        spec = SyntheticSpec(
            hidden_size=args.hidden, moe_intermediate_size=args.hidden // 2, n_routed_experts=args.experts,
            num_hidden_layers=args.layers, intermediate_size=2 * args.hidden,
        )  # fmt: skip
        write_synthetic(src, spec)
    calib = work / "calib.json"
    g = torch.Generator().manual_seed(0)
    calib.write_text(json.dumps(torch.randint(0, 512, (32, 128), generator=g).tolist()))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    current: dict[str, object] = {"at": "before"}
    peaks: dict[str, dict[str, int]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            status = {}
            for line in open("/proc/self/status"):
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    status[key] = int(value.split()[0]) * 1024 // MIB
            m = libc.mallinfo2()
            row = {**status, "in_use": (m.uordblks + m.hblkhd) // MIB, "arenas": m.arena // MIB}
            peak = peaks.setdefault(str(current["at"]), row)
            if row["VmRSS"] > peak["VmRSS"]:
                peaks[str(current["at"])] = row
            time.sleep(0.002)

    run_layer = sequential.Calibrator._run

    def charged(self, layer: int) -> None:  # the walk's own method, with the layer it runs noted
        current["at"] = layer
        run_layer(self, layer)
        current["at"] = f"after {layer}"

    sequential.Calibrator._run = charged  # type: ignore[method-assign]
    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    out = CliRunner().invoke(app, [
        "convert", str(src), str(work / "out"), "--to", "w4a16", "--device", "cpu", "--method", "gptq",
        "--calibration", str(calib), "--samples", "32", "--seq-len", "128", "--all-experts", "--overwrite",
        "--quiet", *args.extra,
    ])  # fmt: skip
    stop.set()
    if out.exit_code:
        sys.exit(f"convert failed: {out.output} {out.exception}")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{time.perf_counter() - start:.1f} s, max RSS {max_rss} MB")
    print("| at | peak RSS MB | anon MB | file MB | in use MB | arenas MB |\n|---|---|---|---|---|---|")
    for at, p in peaks.items():
        print(f"| {at} | {p['VmRSS']} | {p['RssAnon']} | {p['RssFile']} | {p['in_use']} | {p['arenas']} |")


if __name__ == "__main__":
    main()
