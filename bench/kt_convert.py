"""Benchmark: `moeport convert --to kt-int4|kt-int8` vs kt-kernel's own converter script.

kt-kernel's wheel does not ship `scripts/convert_cpu_weights.py`; it is fetched at bench time from
GitHub (kvcache-ai/ktransformers, `--kt-ref`, default main) unless `--kt-script PATH` is given. It
is run unmodified, in a child process that only (a) stubs `triton` (imported at the top, used for
CUDA FP8 only), (b) drops `pin_memory=True` (CPU-only torch rejects it) and (c) drops keyword
arguments that the installed kt-kernel does not know (HEAD passes `weight_strategy`, 0.7.2 lacks it).

Both convert the same seeded synthetic DeepSeek-V3-shaped BF16 checkpoint (moeport.synthetic, at
least `--gb` GB). Reported per tool: wall time, throughput (GB of source expert bytes per second),
peak RSS of the process (from wait4; kt's /dev/shm scratch copy is not included), and how many
expert tensors of the two merged outputs are byte-identical.

    python bench/kt_convert.py --gb 2 --to kt-int4 --numa 2 [--kt-script PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RAW = "https://raw.githubusercontent.com/kvcache-ai/ktransformers/{ref}/kt-kernel/scripts/convert_cpu_weights.py"

RUNNER = r"""
import functools, inspect, runpy, sys, types
import torch

def _drop_pin(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)
    return wrapped

for _name in ("empty", "zeros", "full"):
    setattr(torch, _name, _drop_pin(getattr(torch, _name)))

_triton = types.ModuleType("triton")
_triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
_triton.cdiv = lambda a, b: -(-a // b)
_tl = types.ModuleType("triton.language")
_tl.constexpr = int
_triton.language = _tl
sys.modules.setdefault("triton", _triton)
sys.modules.setdefault("triton.language", _tl)

import kt_kernel
_orig = kt_kernel.KTMoEWrapper
_known = set(inspect.signature(_orig.__new__).parameters)

class _Shim:
    def __new__(cls, *args, **kwargs):
        return _orig(*args, **{k: v for k, v in kwargs.items() if k in _known})

kt_kernel.KTMoEWrapper = _Shim
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def kt_script(args: argparse.Namespace) -> Path:
    if args.kt_script:
        return Path(args.kt_script)
    path = args.work / f"convert_cpu_weights-{args.kt_ref}.py"
    if not path.exists():
        url = RAW.format(ref=args.kt_ref)
        print(f"fetching {url}")
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https URL
            path.write_bytes(resp.read())
    return path


def make_source(args: argparse.Namespace) -> tuple[Path, int]:
    from moeport.detect import detect
    from moeport.sources import open_checkpoint
    from moeport.synthetic import SyntheticSpec, write_synthetic

    spec = SyntheticSpec.of_size(args.gb)
    src = args.work / f"src-{args.gb:g}gb"
    if not (src / "config.json").exists():
        print(f"writing synthetic checkpoint ({args.gb:g} GB) to {src}")
        shutil.rmtree(src, ignore_errors=True)
        write_synthetic(src, spec)
    with open_checkpoint(src) as ck:
        det = detect(ck)
        return src, sum(det.layer_expert_bytes[L] for L in det.moe_layers)


def timed(cmd: list[str], log: Path) -> dict:
    """Run cmd; wall seconds, peak RSS (bytes) and exit status, from wait4."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "exit_code": proc.returncode,
        "log": str(log),
    }


def compare(ours: Path, theirs: Path) -> dict:
    """Expert tensors (blk.*) present in both merged outputs, and how many are byte-identical."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys() if k.startswith("blk.")})
        return out

    a, b = index(ours), index(theirs)
    common = sorted(set(a) & set(b))
    equal = 0
    for key in common:
        with safe_open(str(a[key]), "pt") as ha, safe_open(str(b[key]), "pt") as hb:
            ta, tb = ha.get_tensor(key), hb.get_tensor(key)
            equal += ta.dtype == tb.dtype and ta.shape == tb.shape and bool((ta == tb).all())
    return {"ours": len(a), "theirs": len(b), "common": len(common), "byte_identical": equal}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="size of the synthetic BF16 checkpoint")
    p.add_argument("--to", default="kt-int4", choices=["kt-int4", "kt-int8"])
    p.add_argument("--numa", type=int, default=2, help="T (threadpool_count)")
    p.add_argument("--work", type=Path, default=Path("/tmp/moeport-kt-bench"))
    p.add_argument("--kt-script", help="local convert_cpu_weights.py (default: fetch from GitHub)")
    p.add_argument("--kt-ref", default="main", help="git ref of kvcache-ai/ktransformers to fetch")
    p.add_argument("--skip-kt", action="store_true", help="only time moeport")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    src, expert_bytes = make_source(args)
    results: dict = {
        "source": str(src),
        "source_expert_bytes": expert_bytes,
        "to": args.to,
        "numa": args.numa,
        "cpus": os.cpu_count(),
    }
    ours = args.work / f"moeport-{args.to}"
    shutil.rmtree(ours, ignore_errors=True)
    cmd = [sys.executable, "-m", "moeport", "convert", str(src), str(ours), "--to", args.to]
    results["moeport"] = timed([*cmd, "--numa", str(args.numa), "--quiet"], args.work / "moeport.log")
    if not args.skip_kt:
        theirs = args.work / f"kt-{args.to}"
        shutil.rmtree(theirs, ignore_errors=True)
        script = kt_script(args)
        kt_cmd = [
            sys.executable, "-c", RUNNER, str(script), "--input-path", str(src), "--input-type", "bf16",
            "--output", str(theirs), "--quant-method", args.to.removeprefix("kt-"),
            "--cpuinfer-threads", str(os.cpu_count()), "--threadpool-count", str(args.numa),
        ]  # fmt: skip
        results["kt"] = timed(kt_cmd, args.work / "kt.log")
        if results["kt"]["exit_code"] == 0 and results["moeport"]["exit_code"] == 0:
            results["compare"] = compare(ours, theirs)
    for tool in ("moeport", "kt"):
        r = results.get(tool)
        if r:
            r["gb_per_s"] = expert_bytes / r["seconds"] / 1e9
    if "kt" in results:
        m, k = results["moeport"], results["kt"]
        results["throughput_ratio_moeport_over_kt"] = m["gb_per_s"] / k["gb_per_s"]
        results["peak_rss_ratio_moeport_over_kt"] = m["peak_rss_bytes"] / k["peak_rss_bytes"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(results[t]["exit_code"] == 0 for t in ("moeport", "kt") if t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
