"""Planning a conversion of the full DeepSeek-V3 (671B, FP8): time and memory before any data.

    python bench/full_size_plan.py [--work DIR] [--targets kt-int4,w4a16,hf] [--json OUT.json]

Every conversion is planned in full on `meta` before a byte is written, so for a real model the
plan itself must stay cheap. This writes a header-only copy of DeepSeek-V3's FP8 checkpoint (its
config, its 61 layers of 256 experts, the real tensor names, shapes, dtypes and 128 x 128 block
scales, sharded into ~5 GB files) whose data is a hole: the files are sparse and use no disk. Then
it runs `moeport convert --dry-run` for each target in a fresh process and reports the wall time
and the peak RSS of the whole plan, next to `moeport inspect` (headers only) as the floor.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from scratch import work_dir

from moeport.synthetic import SyntheticSpec

SHARD = 5 * 2**30
BLOCK = 128
BF16_ONLY = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "e_score_correction_bias")


def deepseek_v3() -> SyntheticSpec:
    return SyntheticSpec(
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        first_k_dense_replace=3,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=129280,
    )


def entries(spec: SyntheticSpec):
    """(name, safetensors dtype, shape) of every tensor, FP8 with block scales as DeepSeek ships it."""
    for name, shape in spec.tensor_shapes():
        if len(shape) == 2 and not any(k in name for k in BF16_ONLY):
            yield name, "F8_E4M3", shape
            yield name + "_scale_inv", "F32", (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
        else:
            yield name, "F32" if "bias" in name else "BF16", shape


def write_headers(folder: Path, spec: SyntheticSpec) -> int:
    """Sparse shards holding only their headers; returns the bytes they claim."""
    size = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    shards: list[dict] = [{}]
    used = 0
    for name, dtype, shape in entries(spec):
        n = math.prod(shape) * size[dtype]
        if used + n > SHARD and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][name] = (dtype, shape, n)
        used += n
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, (dtype, shape, n) in tensors.items():
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)  # the data is a hole: no disk used
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = spec.config()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


# the CLI in a child that prints its own peak RSS (KiB) last, whatever way the CLI exits
CHILD = (
    "import resource, runpy, sys\n"
    "sys.argv = ['moeport', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('moeport', run_name='__main__')\n"
    "finally:\n    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
)


def timed(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GB, the CLI's last line of output) of `moeport ARGS` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"moeport {' '.join(args)}: {done.stderr.strip()[-400:]}")
    lines = done.stdout.strip().splitlines()
    peak = int(lines[-1].split()[1]) * 1024 / 1e9
    return seconds, peak, (lines[-2] if len(lines) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--targets", default="kt-int4,w4a16,hf")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-fullplan-")
    src = work / "DeepSeek-V3-headers"
    src.mkdir(parents=True, exist_ok=True)
    claimed = write_headers(src, deepseek_v3())
    rows = []
    runs = [("inspect", ["inspect", str(src)])] + [
        (f"convert --to {t} --dry-run", ["convert", str(src), str(work / t), "--to", t, "--dry-run"])
        for t in args.targets.split(",")
    ]
    for what, cli in runs:
        seconds, peak, last = timed(cli)
        rows.append({"run": what, "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2)})
        print(json.dumps(rows[-1] | {"last line": last[:120]}), flush=True)
    report = {"source_gb": round(claimed / 1e9, 1), "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
