"""kt-kernel AMX codec throughput: GB/s of bf16 input for kt_quantize / kt_dequantize.

    python bench/kt_codec.py                 # 7168 x 2048 bf16, 1 thread and all threads
    python bench/kt_codec.py --n 2048 --k 7168

Median of 5 runs after a warm-up (which also compiles the numba kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numba
import torch

from moeport.codecs.kt_amx import kt_dequantize, kt_quantize


def _gbps(fn, nbytes: int, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=7168)
    ap.add_argument("--k", type=int, default=2048)
    args = ap.parse_args()
    w = torch.randn(args.n, args.k, generator=torch.Generator().manual_seed(0)).bfloat16()
    nbytes = w.numel() * 2
    rows = []
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        torch.set_num_threads(threads)
        for bits in (4, 8):
            q, s = kt_quantize(w, bits)
            rows.append(
                {
                    "bits": bits,
                    "threads": threads,
                    "quantize_GBps": round(_gbps(lambda b=bits: kt_quantize(w, b), nbytes), 2),
                    "quantize_torch_path_GBps": round(
                        _gbps(lambda b=bits: kt_quantize(w, b, use_numba=False), nbytes, reps=2), 2
                    ),
                    "dequantize_GBps": round(
                        _gbps(lambda b=bits, q=q, s=s: kt_dequantize(q, s, args.n, args.k, b), nbytes), 2
                    ),
                }
            )
    print(json.dumps({"shape": [args.n, args.k], "results": rows}, indent=1))


if __name__ == "__main__":
    main()
