"""The benchmark suite: every moeport job next to the peer that does the same job, in one run.

    python bench/suite.py --gb 2.2 [--work DIR] [--kt-script PATH] [--llmc-python .llmc/bin/python]

Builds a seeded synthetic DeepSeek-V3-shaped BF16 checkpoint (DeepSeek-V3 proportions scaled down)
and an FP8-block copy of it (with moeport itself, timed as a job), then runs each job and its peer
as separate processes, measuring wall time and peak RSS (process tree, sampled every 10 ms):

| job | moeport | peer |
|---|---|---|
| read bound | - | `cat` of every shard to /dev/null |
| BF16 -> transformers fused | `convert --layout fused` | transformers from_pretrained + save_pretrained |
| BF16 -> W4A16 experts (g128) | `convert --to w4a16` | llmcompressor model_free_ptq |
| BF16 -> kt INT4 (T=2) | `convert --to kt-int4 --numa 2` | kt-kernel's convert_cpu_weights.py |
| BF16 -> FP8 block | `convert --to fp8-block` | - |
| FP8 -> BF16 hub | `convert --to hf --dtype bf16` | - |
| FP8 -> kt INT4 | `convert --to kt-int4 --numa 2` | kt's script (needs CUDA for FP8: not run on CPU) |
| verify W4A16 vs source | `verify` | - |

GB/s counts source bytes. Ratios: peer seconds / moeport seconds (>1: moeport faster), moeport
peak RSS / peer peak RSS, and moeport GB/s over the `cat` read bound of the same source.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from convert_rss import TRANSFORMERS_JOB, peak_rss
from gpu_target import LLMC_JOB
from kt_convert import RUNNER as KT_RUNNER
from scratch import work_dir

from moeport.sources import open_checkpoint
from moeport.synthetic import SyntheticSpec, write_synthetic

PY = sys.executable


def moeport(*args: str) -> list[str]:
    return [PY, "-m", "moeport", *args, "--quiet"]


def size_of(folder: Path) -> int:
    with open_checkpoint(folder) as ck:
        return ck.total_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--kt-script", type=Path, default=None, help="kt-kernel's scripts/convert_cpu_weights.py")
    ap.add_argument("--llmc-python", default=str(Path(__file__).resolve().parents[1] / ".llmc/bin/python"))
    ap.add_argument("--skip-peers", action="store_true")
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-suite-")
    work.mkdir(parents=True, exist_ok=True)
    bf16, fp8 = work / "src-bf16", work / "src-fp8"
    if not (bf16 / "config.json").exists():
        write_synthetic(bf16, SyntheticSpec.of_size(args.gb))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    rows: list[tuple[str, str, float, float, int]] = []  # job, tool, seconds, source bytes, peak rss

    def run(job: str, tool: str, cmd: list[str], src: Path) -> None:
        secs, rss = peak_rss(cmd)
        rows.append((job, tool, secs, size_of(src), rss))
        print(
            f"{job:<28} {tool:<14} {secs:7.1f} s  {size_of(src) / secs / 1e9:6.3f} GB/s  {rss / 1e9:5.2f} GB"
        )

    shutil.rmtree(fp8, ignore_errors=True)
    run("BF16 -> FP8 block", "moeport", moeport("convert", str(bf16), str(fp8), "--to", "fp8-block"), bf16)
    for src in (bf16, fp8):
        files = sorted(str(f) for f in src.glob("*.safetensors"))
        run(f"read bound ({src.name})", "cat", ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], src)

    run(
        "BF16 -> fused",
        "moeport",
        moeport("convert", str(bf16), str(out / "fused"), "--layout", "fused"),
        bf16,
    )
    run(
        "BF16 -> W4A16 experts",
        "moeport",
        moeport("convert", str(bf16), str(out / "w4a16"), "--to", "w4a16"),
        bf16,
    )
    kt_args = ["--to", "kt-int4", "--numa", "2"]
    run("BF16 -> kt INT4 T=2", "moeport", moeport("convert", str(bf16), str(out / "kt"), *kt_args), bf16)
    run("FP8 -> BF16 hub", "moeport", moeport("convert", str(fp8), str(out / "deq"), "--dtype", "bf16"), fp8)
    run("FP8 -> kt INT4 T=2", "moeport", moeport("convert", str(fp8), str(out / "kt-fp8"), *kt_args), fp8)
    run("verify W4A16", "moeport", [PY, "-m", "moeport", "verify", str(bf16), str(out / "w4a16")], bf16)
    if not args.skip_peers:
        run("BF16 -> fused", "transformers", [PY, "-c", TRANSFORMERS_JOB, str(bf16), str(out / "tf")], bf16)
        if Path(args.llmc_python).exists():
            llmc = [args.llmc_python, "-c", LLMC_JOB, str(bf16), str(out / "llmc"), "128"]
            run("BF16 -> W4A16 experts", "llmcompressor", llmc, bf16)
        if args.kt_script:
            kt = [
                PY, "-c", KT_RUNNER, str(args.kt_script), "--input-path", str(bf16), "--input-type", "bf16",
                "--output", str(out / "kt-peer"), "--quant-method", "int4", "--cpuinfer-threads", "2",
                "--threadpool-count", "2",
            ]  # fmt: skip
            run("BF16 -> kt INT4 T=2", "kt script", kt, bf16)
    _table(rows)
    print(f"work dir: {work}" if args.work else "work dir: removed (pass --work DIR to keep it)")


def _table(rows: list[tuple[str, str, float, float, int]]) -> None:
    read = {
        job.split("(")[1].rstrip(")"): nbytes / secs for job, tool, secs, nbytes, _ in rows if tool == "cat"
    }
    print(
        "\n| job | tool | s | GB/s | × read bound | peak RSS GB | peer s / moeport s | RSS moeport / peer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for job, tool, secs, nbytes, rss in rows:
        if tool == "cat":
            continue
        speed = nbytes / secs
        bound = read.get("src-fp8" if job.startswith("FP8") else "src-bf16")
        peer = [r for r in rows if r[0] == job and r[1] not in ("moeport", "cat")]
        best = min(peer, key=lambda r: r[2]) if peer and tool == "moeport" else None
        ratio = f"{best[2] / secs:.2f}× vs {best[1]}" if best else "-"
        mem = f"{rss / best[4]:.2f}" if best else "-"
        frac = f"{speed / bound:.2f}" if bound else "-"
        print(
            f"| {job} | {tool} | {secs:.1f} | {speed / 1e9:.3f} | {frac} | {rss / 1e9:.2f} "
            f"| {ratio} | {mem} |"
        )
    for job, tool, secs, nbytes, _ in rows:
        if tool == "cat":
            print(f"| {job} | cat | {secs:.1f} | {nbytes / secs / 1e9:.3f} | 1.00 | - | - | - |")


if __name__ == "__main__":
    main()
