"""Codec benchmark: throughput per codec (CPU, and CUDA when present) and RTN error vs llmcompressor.

    python bench/codecs.py --mb 256                       # throughput + our RTN error table
    python bench/codecs.py --mb 64 --llmc-python /tmp/llmc/bin/python   # + llmcompressor's RTN, same tensors

Throughput is GB/s of BF16 source bytes (for decode: of the bytes the encode consumed), median of
5 runs after a warm-up, on one thread and on all threads; the FP8-block -> INT4 rows count FP8
input bytes (weight + scales), once as decode-then-encode and once through `transcode` (fused
kernel on CPU).
The llmcompressor comparison writes the same tensors as a checkpoint, runs its model-free PTQ
(RTN) in the given interpreter (a separate venv: it pins its own compressed-tensors), decodes its
output with compressed-tensors' layout and reports both errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import torch

from moeport.codecs import (
    AwqCodec,
    CtMxfp4Codec,
    CtNvfp4Codec,
    Dsv4Mxfp4Codec,
    FloatCodec,
    Fp8BlockCodec,
    GptOssMxfp4Codec,
    GptqCodec,
    Nvfp4Codec,
    PackQuantizedCodec,
)
from moeport.codecs.transcode import transcode

SHAPE = (2048, 4096)  # one expert projection, [N, K]


def expert_weights(mb: int, device: str) -> list[torch.Tensor]:
    count = max(1, mb * 2**20 // (SHAPE[0] * SHAPE[1] * 2))
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16).to(device) for _ in range(count)]


def timed(fn, reps: int = 5) -> float:
    """Median wall time of `reps` runs after one warm-up run (which also compiles numba kernels)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


CODECS = {
    "bf16->fp16": FloatCodec("fp16"),
    "fp8-block 128x128": Fp8BlockCodec(),
    "mxfp4 (dsv4)": Dsv4Mxfp4Codec(),
    "nvfp4 (modelopt)": Nvfp4Codec(),
    "nvfp4 (compressed-tensors)": CtNvfp4Codec(),
    "mxfp4 (compressed-tensors)": CtMxfp4Codec(),
    "mxfp4 (gpt-oss)": GptOssMxfp4Codec(),
    "gptq int4 g128": GptqCodec(group_size=128),
    "awq int4 g128": AwqCodec(group_size=128),
    "ct int4 g128": PackQuantizedCodec(bits=4, group_size=128),
    "ct int8 channel": PackQuantizedCodec(bits=8, group_size=None),
}


def throughput(weights: list[torch.Tensor]) -> list[tuple[str, float, float]]:
    nbytes = sum(w.numel() * 2 for w in weights)
    rows = []
    for name, codec in CODECS.items():
        encoded = [codec.encode(w) for w in weights]
        enc = timed(lambda c=codec: [c.encode(w) for w in weights])
        dec = timed(lambda c=codec, e=encoded: [c.decode(p) for p in e])
        rows.append((name, nbytes / enc / 1e9, nbytes / dec / 1e9))
    # the headline path: FP8-block checkpoint -> compressed-tensors INT4 group 128
    fp8, int4 = Fp8BlockCodec(), PackQuantizedCodec(bits=4, group_size=128)
    sources = [fp8.encode(w) for w in weights]
    fp8_bytes = sum(p["weight"].numel() + p["weight_scale_inv"].numel() * 4 for p in sources)
    t = timed(lambda: [int4.encode(fp8.decode(p)) for p in sources])
    rows.append(("FP8-block -> INT4 g128, decode+encode", fp8_bytes / t / 1e9, float("nan")))
    t = timed(lambda: [transcode(fp8, p, int4) for p in sources])
    rows.append(("FP8-block -> INT4 g128, transcode", fp8_bytes / t / 1e9, float("nan")))
    return rows


RTN_CASES = [  # (label, bits, group, symmetric, llmcompressor scheme)
    ("INT4 sym g32", 4, 32, True, {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}),
    ("INT4 sym g64", 4, 64, True, {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 64}),
    (
        "INT4 sym g128",
        4,
        128,
        True,
        {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128},
    ),
    (
        "INT4 asym g128",
        4,
        128,
        False,
        {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
    ),
    ("INT8 sym channel", 8, None, True, {"num_bits": 8, "symmetric": True, "strategy": "channel"}),
    (
        "INT8 sym g128",
        8,
        128,
        True,
        {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 128},
    ),
]

LLMC_CHILD = r"""
import sys, json
from compressed_tensors.quantization import QuantizationScheme, QuantizationArgs
from llmcompressor.entrypoints.model_free import model_free_ptq
src, dst, weights = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(type="int", **weights))
model_free_ptq(src, dst, scheme=scheme, ignore=["lm_head"], max_workers=1, device="cpu")
"""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def rtn_errors(weights: list[torch.Tensor], llmc_python: str | None) -> list[tuple[str, float, float | None]]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        names = [f"model.layers.0.mlp.experts.{i}.gate_proj.weight" for i in range(len(weights))]
        save_file({n: w.cpu() for n, w in zip(names, weights, strict=True)}, str(src / "model.safetensors"))
        (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "architectures": ["X"]}))
        for label, bits, group, sym, scheme in RTN_CASES:
            codec = PackQuantizedCodec(bits=bits, group_size=group, symmetric=sym)
            ours = statistics.mean(rel_err(codec.decode(codec.encode(w.cpu())), w) for w in weights)
            theirs = None
            if llmc_python:
                dst = Path(tmp) / f"llmc-{label.replace(' ', '_')}"
                subprocess.run(
                    [llmc_python, "-c", LLMC_CHILD, str(src), str(dst), json.dumps(scheme)],
                    check=True,
                    capture_output=True,
                )
                errs = []
                for f in dst.glob("*.safetensors"):
                    with safe_open(str(f), "pt") as h:
                        for n, w in zip(names, weights, strict=True):
                            p = n.removesuffix("weight")
                            parts = {
                                k: h.get_tensor(p + k)
                                for k in (
                                    "weight_packed",
                                    "weight_scale",
                                    "weight_shape",
                                    "weight_zero_point",
                                )
                                if p + k in h.keys()
                            }
                            errs.append(rel_err(codec.decode(parts, where=p), w))
                theirs = statistics.mean(errs)
            rows.append((label, ours, theirs))
    return rows


def same_bytes_on_cpu_and_cuda() -> None:
    """Every codec must give the same bytes on CUDA as on the CPU (decode: the same floats)."""
    w = expert_weights(16, "cpu")[0]
    for name, codec in CODECS.items():
        cpu, gpu = codec.encode(w), codec.encode(w.cuda())
        same = all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)
        decoded = torch.equal(codec.decode(cpu), codec.decode({k: v.cuda() for k, v in cpu.items()}).cpu())
        print(f"{name:<40} encode bytes identical: {same}, decode identical: {decoded}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--llmc-python", help="python of a venv with llmcompressor installed")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-rtn", action="store_true")
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    args = ap.parse_args()

    devices = [
        d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())
    ]
    if "cuda" in devices:
        same_bytes_on_cpu_and_cuda()
    if not args.skip_throughput:
        for device in devices:
            threads = [1, torch.get_num_threads()] if device == "cpu" else [None]
            for n in threads:
                if n:
                    torch.set_num_threads(n)
                    numba.set_num_threads(n)  # the CPU kernels run on numba's threads
                weights = expert_weights(args.mb, device)
                where = f"{device}" + (f", {n} thread(s)" if n else f" ({torch.cuda.get_device_name()})")
                print(f"\nthroughput on {where}, {args.mb} MB of BF16 experts {SHAPE}")
                print(f"{'codec':<40}{'encode GB/s':>12}{'decode GB/s':>12}")
                for name, enc, dec in throughput(weights):
                    print(f"{name:<40}{enc:>12.2f}{dec:>12.2f}")
    if args.skip_rtn:
        return
    weights = expert_weights(min(args.mb, 64), "cpu")
    print("\nRTN error (relative L2 vs BF16 source, mean over tensors)")
    print(f"{'scheme':<20}{'moeport':>10}{'llmcompressor':>15}{'ratio':>8}")
    for label, ours, theirs in rtn_errors(weights, args.llmc_python):
        t = f"{theirs:>15.5f}{ours / theirs:>8.3f}" if theirs else f"{'(not run)':>15}"
        print(f"{label:<20}{ours:>10.5f}{t}")


if __name__ == "__main__":
    sys.exit(main())
