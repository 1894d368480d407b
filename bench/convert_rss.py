"""Peak memory of `moeport convert --to hf` vs one MoE layer, and vs transformers doing the same job.

    python bench/convert_rss.py --gb 2.2 [--work DIR] [--skip-transformers]

Builds a seeded synthetic DeepSeek-V3-shaped BF16 checkpoint of about `--gb` GB (hub layout), then,
in one run, measures (peak RSS of the process tree, sampled every 10 ms):
- the fixed overhead: a Python process that imports moeport's CLI and torch;
- `moeport convert SRC DST --to hf --layout fused` (stacks every layer's experts) and back to hub;
- the peer: transformers `from_pretrained` + `save_pretrained(save_original_format=False)`, which
  writes the same fused layout (our output is checked equal to it).
Prints a table: seconds, GB/s of source bytes, peak RSS, peak above the fixed overhead, and that
excess as a multiple of the largest MoE layer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from scratch import work_dir

from moeport.detect import detect
from moeport.sources import open_checkpoint
from moeport.synthetic import SyntheticSpec, write_synthetic

TRANSFORMERS_JOB = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], save_original_format=False)
"""


def peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run `cmd` (in `env`); return (seconds, peak RSS in bytes of it and its children)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def synthetic_source(work: Path, gb: float) -> tuple[Path, int, int, int]:
    """`work/src`, a synthetic checkpoint of about `gb` GB (built once), with its total bytes, the
    bytes of its largest MoE layer and its number of MoE layers."""
    src = work / "src"
    if not (src / "config.json").exists():
        write_synthetic(src, SyntheticSpec.of_size(gb))
    with open_checkpoint(src) as ck:
        det = detect(ck)
        layer = max(det.layer_bytes[L] for L in det.moe_layers)
        return src, ck.total_bytes, layer, len(det.moe_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-rss-")
    src, total, layer, moe_layers = synthetic_source(work, args.gb)
    py = sys.executable
    rows = []
    _, base = peak_rss([py, "-c", "import torch, moeport.cli.app, moeport.recipes.hf"])
    rows.append(("fixed overhead (imports)", None, base))
    moeport = [py, "-m", "moeport", "convert", "--quiet", "--overwrite"]
    secs, rss = peak_rss([*moeport, str(src), str(work / "fused"), "--layout", "fused"])
    rows.append(("moeport hub -> fused", secs, rss))
    secs, rss = peak_rss([*moeport, str(work / "fused"), str(work / "hub"), "--layout", "hub"])
    rows.append(("moeport fused -> hub", secs, rss))
    if not args.skip_transformers:
        secs, rss = peak_rss([py, "-c", TRANSFORMERS_JOB, str(src), str(work / "tf-fused")])
        rows.append(("transformers load + save fused (peer)", secs, rss))

    print(f"source: {total / 1e9:.2f} GB, {moe_layers} MoE layers, largest {layer / 1e9:.3f} GB")
    print("| job | s | GB/s | peak RSS GB | above overhead GB | × one MoE layer |")
    print("|---|---|---|---|---|---|")
    for name, secs, rss in rows:
        speed = f"{total / secs / 1e9:.2f}" if secs else "-"
        excess = rss - base
        print(
            f"| {name} | {secs:.1f} | {speed} | {rss / 1e9:.2f} | {excess / 1e9:.2f} | {excess / layer:.2f} |"
            if secs
            else f"| {name} | - | - | {rss / 1e9:.2f} | - | - |"
        )
    print(f"work dir: {work}" if args.work else "work dir: removed (pass --work DIR to keep it)")


if __name__ == "__main__":
    main()
