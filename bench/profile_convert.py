"""Where a conversion's time goes: cProfile of one in-process conversion (top functions by own time).

    python bench/profile_convert.py SRC JOB BATCH [DEVICE [OUT]]

JOB: w4a16|w8a16|fp8|fp8-block|bf16 (hf, dequantized); BATCH: 1 to batch (the GPU way), 0 not.
"""

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from moeport.convert.batching import Batcher
from moeport.convert.execute import execute
from moeport.detect import detect
from moeport.recipes.gpu import Recipe, plan_gpu
from moeport.recipes.hf import DTYPES, plan_hf
from moeport.sources import open_checkpoint

src, job, batch = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
dev = sys.argv[4] if len(sys.argv) > 4 else "cpu"
out = Path(sys.argv[5]) if len(sys.argv) > 5 else Path(tempfile.mkdtemp()) / "out"
with open_checkpoint(src) as ck:
    det = detect(ck)
    plan = (
        plan_gpu(ck, det, Recipe(job), dev) if job != "bf16" else plan_hf(ck, det, "hub", DTYPES["bf16"], dev)
    )
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    execute(plan, ck, out, 5 * 10**9, {}, batcher=Batcher(dev) if batch else None)
    pr.disable()
    print("seconds", time.perf_counter() - t)
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
