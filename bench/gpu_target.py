"""W4A16 / NVFP4A16 for GPU servers: moeport vs llmcompressor model-free PTQ, same checkpoint, one run.

    python bench/gpu_target.py --gb 2.2 [--work DIR] [--llmc-python .llmc/bin/python] [--group-size 128]
    python bench/gpu_target.py --scheme nvfp4 --gb 1   # NVFP4A16 (compressed-tensors flavour)

Builds a seeded synthetic DeepSeek-V3-shaped BF16 checkpoint of about `--gb` GB and quantizes every
routed expert to W4A16 (RTN, symmetric, group 128) with both tools (attention, routers, shared
experts, embeddings and lm_head kept), measuring wall time and peak RSS of each process tree.
llmcompressor runs in its own venv (it pins its own compressed-tensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convert_rss import peak_rss, synthetic_source
from scratch import work_dir

MOEPORT_JOB = """
import sys
from pathlib import Path
from moeport.convert.execute import execute
from moeport.recipes import fp4, gpu
from moeport.detect import detect
from moeport.sources import open_checkpoint
scheme = sys.argv[4]
recipe = fp4.Recipe(scheme) if scheme in ("nvfp4", "mxfp4") else gpu.Recipe(scheme, int(sys.argv[3]))
with open_checkpoint(sys.argv[1]) as ck:
    execute(gpu.plan_gpu(ck, detect(ck), recipe), ck, Path(sys.argv[2]), 5 * 10**9, {})
"""
LLMC_JOB = """
import sys, json
from compressed_tensors.quantization import QuantizationScheme, QuantizationArgs
from llmcompressor.entrypoints.model_free import model_free_ptq
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    type="int", num_bits=4, symmetric=True, strategy="group", group_size=int(sys.argv[3])))
scheme = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}.get(sys.argv[4], scheme)
ignore = ["lm_head", "re:.*embed_tokens.*", "re:.*self_attn.*", "re:.*mlp\\\\.gate$", "re:.*shared_experts.*",
          "re:.*layers\\\\.0\\\\.mlp.*"]
model_free_ptq(sys.argv[1], sys.argv[2], scheme=scheme, ignore=ignore, max_workers=1, device="cpu")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--llmc-python", default=str(Path(__file__).resolve().parents[1] / ".llmc/bin/python"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scheme", default="w4a16", choices=("w4a16", "nvfp4", "mxfp4"))
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-gpu-")
    src, total, layer, _ = synthetic_source(work, args.gb)
    g = str(args.group_size)
    _, base = peak_rss([sys.executable, "-c", "import torch, moeport.recipes.gpu"])
    rows = [
        (
            "moeport",
            *peak_rss([sys.executable, "-c", MOEPORT_JOB, str(src), str(work / "ours"), g, args.scheme]),
        )
    ]
    if Path(args.llmc_python).exists():
        rows.append(
            (
                "llmcompressor model_free_ptq",
                *peak_rss([args.llmc_python, "-c", LLMC_JOB, str(src), str(work / "llmc"), g, args.scheme]),
            )
        )
        ours = json.loads((work / "ours" / "config.json").read_text())["quantization_config"]
        theirs = json.loads((work / "llmc" / "config.json").read_text())["quantization_config"]
        print(f"formats: ours {ours['format']}, llmcompressor {theirs['format']}")
    print(
        f"source: {total / 1e9:.2f} GB BF16, largest MoE layer {layer / 1e9:.3f} GB; "
        f"imports alone {base / 1e9:.2f} GB"
    )
    print("| tool | s | GB/s | peak RSS GB | above imports, × one MoE layer |")
    print("|---|---|---|---|---|")
    for name, secs, rss in rows:
        print(
            f"| {name} | {secs:.1f} | {total / secs / 1e9:.3f} | {rss / 1e9:.2f} "
            f"| {(rss - base) / layer:.2f} |"
        )
    if len(rows) == 2:
        (_, s0, r0), (_, s1, r1) = rows
        print(f"moeport / llmcompressor: throughput {s1 / s0:.2f}×, peak RSS {r0 / r1:.2f}×")
    print(f"work dir: {work}" if args.work else "work dir: removed (pass --work DIR to keep it)")


if __name__ == "__main__":
    main()
