"""Where each thread of a conversion spends its time: a sampling profile of every thread.

    python bench/profile_threads.py [--job 1] [--device cpu] [--threads 16] [--layers 2] [--experts 16]

Runs one job of bench/real_shapes.py (DeepSeek-V3 expert shape) while a sampler thread reads
every other thread's Python stack every few milliseconds (`sys._current_frames`), then prints,
per kind of thread (compute, write, hash, read-ahead, main...), how many samples it had and its
top innermost frames. A frame inside a GIL-releasing call (numba kernel, pread, pwrite, torch op,
hashing) is where that thread waits or works outside Python. Why not cProfile: it sees the main
thread only, and the work here is on the others.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import threading
import time
from pathlib import Path

from real_shapes import JOBS, build_sources, convert  # bench/ is on sys.path
from scratch import work_dir

from moeport.parallel import available_cores


def sample(stop: threading.Event, every: float, counts: dict) -> None:
    me = threading.get_ident()
    names = {}
    while not stop.is_set():
        names.update({t.ident: t.name for t in threading.enumerate()})
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            kind = re.sub(r"[-_]?\d+(_\d+)?$", "", names.get(ident, "?"))
            stack = []
            while frame is not None and len(stack) < 3:
                code = frame.f_code
                stack.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            counts[kind][" < ".join(stack)] += 1
        time.sleep(every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", type=int, default=1, help="job number of bench/real_shapes.py (1-6)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--host-threads", type=int, default=0, help="CUDA host threads (0: default)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None, help="where the output goes (default: in --work)")
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-prof-")
    work.mkdir(parents=True, exist_ok=True)
    name = list(JOBS)[args.job - 1]
    kind, to, extra = JOBS[name]
    src = build_sources(work, args.layers, args.experts)[kind]
    out = args.out or work / "out"
    convert(src, out, to, extra, args.device, args.threads, args.host_threads)  # warm-up
    counts: dict = collections.defaultdict(collections.Counter)
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, 0.005, counts), daemon=True)
    sampler.start()
    seconds, written = convert(src, out, to, extra, args.device, args.threads, args.host_threads)
    stop.set()
    sampler.join()
    rate = written / seconds / 1e9
    print(f"{name} on {args.device}, {args.threads} threads: {seconds:.2f} s, {rate:.2f} GB/s out")
    for kind_name, frames in sorted(counts.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(frames.values())
        print(f"\n[{kind_name}] {total} samples")
        for frame, n in frames.most_common(args.top):
            print(f"  {100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
