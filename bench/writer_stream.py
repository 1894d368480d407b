"""Benchmark: stream >= 1 GB of tensors to sharded safetensors; peak RSS and throughput vs a peer.

Peer: `safetensors.torch.save_file`, which needs the whole state dict in memory. Each writer runs in
its own subprocess so its peak RSS (ru_maxrss) is its own; the output is then read back with
`safetensors.safe_open` and compared bit for bit with the regenerated data.

    python bench/writer_stream.py --gb 1.2 --out /tmp/moeport-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPE = (2048, 1024)  # one bf16 expert projection of 4 MiB


def tensor(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(SHAPE, generator=g).to(torch.bfloat16)


def count_for(gb: float) -> int:
    return int(gb * 1e9 // (SHAPE[0] * SHAPE[1] * 2)) + 1


def run_writer(mode: str, n: int, out: Path, shard_bytes: int) -> dict:
    """Child process: write n tensors; report wall time and RSS before/after."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    names = [f"model.layers.{i // 96}.mlp.experts.{i % 96}.gate_proj.weight" for i in range(n)]
    if mode == "moeport":
        from moeport.sinks import ShardedWriter, TensorSpec

        specs = [TensorSpec(name, "BF16", SHAPE) for name in names]
        with ShardedWriter(out, specs, max_shard_bytes=shard_bytes) as writer:
            for i, name in enumerate(names):
                writer.write(name, tensor(i))
    else:
        from safetensors.torch import save_file

        save_file(
            {name: tensor(i) for i, name in enumerate(names)},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}


def verify(out: Path, n: int) -> None:
    from safetensors import safe_open

    seen = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for name in h.keys():
                L, E = int(name.split(".")[2]), int(name.split(".")[5])
                if not torch.equal(
                    h.get_tensor(name).view(torch.int16), tensor(L * 96 + E).view(torch.int16)
                ):
                    raise SystemExit(f"MISMATCH in {name}")
                seen += 1
    if seen != n:
        raise SystemExit(f"expected {n} tensors, read {seen}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/moeport-bench-writer"))
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--child", choices=["moeport", "safetensors"])
    args = ap.parse_args()
    n = count_for(args.gb)
    if args.child:
        args.out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_writer(args.child, n, args.out, int(args.shard_gb * 1e9))))
        return

    total = n * SHAPE[0] * SHAPE[1] * 2
    rows = {}
    for mode in ("moeport", "safetensors"):
        out = args.out / mode
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--gb",
            str(args.gb),
            "--out",
            str(out),
            "--shard-gb",
            str(args.shard_gb),
        ]
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        verify(out, n)
        shutil.rmtree(out)
    print(f"streamed {total / 1e9:.2f} GB ({n} BF16 tensors of {SHAPE}); outputs read back bit-exactly\n")
    print(f"{'writer':<14}{'GB/s':>8}{'peak RSS':>12}{'RSS - import':>14}")
    for mode, r in rows.items():
        print(
            f"{mode:<14}{total / r['seconds'] / 1e9:>8.2f}{r['peak_rss'] / 1e9:>10.2f}GB"
            f"{(r['peak_rss'] - r['baseline_rss']) / 1e9:>12.2f}GB"
        )
    m, s = rows["moeport"], rows["safetensors"]
    print(
        f"\nmoeport / save_file: peak RSS {m['peak_rss'] / s['peak_rss']:.2f}x, "
        f"throughput {s['seconds'] / m['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
