"""Benchmark: every `moeport convert --to kt-*` method vs the nearest kt-kernel script, one run.

Sources (written once under --work): the seeded synthetic DeepSeek-V3-shaped BF16 checkpoint of
bench/kt_convert.py (`--gb`), its FP8 (128x128) form made by moeport, and BF16 Mixtral and
DeepSeek-V4 checkpoints saved by transformers' own classes (random weights, the tests' family
configs scaled up), for the methods whose kt loader reads only those names (kt-mxfp8, kt-mxfp4).

kt-kernel's scripts are taken from a kvcache-ai/ktransformers checkout (`--kt-repo`, e.g. the one
the `fetch` tool mirrors; `git show REF:kt-kernel/scripts/...`) and run unmodified through
kt_convert.py's shim. Where a kt script writes the method, it runs on the same source in the same
run: `convert_cpu_weights.py --quant-method int4|int8` (AMXINT4/AMXINT8), and
`convert_kimi_k2_fp8_to_bf16_cpu.py` (FP8 -> BF16, what kt-kernel's BF16 method reads) against
`--to kt-bf16` from the FP8 source. No kt script writes RAWINT4, FP8, FP8_PERCHANNEL, GPTQ_INT4,
MXFP4 or MXFP8 files (those methods read checkpoints as published): their rows say so.
Reported: wall time, GB/s of source expert bytes, peak RSS (wait4), exit code.

    python bench/kt_methods.py --gb 0.5 --kt-repo /work/.mirror/kvcache-ai+ktransformers/repo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kt_convert import RUNNER, make_source, timed

HERE = Path(__file__).resolve().parent
# (target, source, the nearest kt script and its arguments or None)
JOBS = [
    ("kt-int4", "ds3", "convert_cpu_weights.py"),
    ("kt-int8", "ds3", "convert_cpu_weights.py"),
    ("kt-rawint4", "ds3", None),
    ("kt-fp8", "ds3", None),
    ("kt-fp8-perchannel", "ds3", None),
    ("kt-bf16", "ds3-fp8", "convert_kimi_k2_fp8_to_bf16_cpu.py"),
    ("kt-gptq-int4", "ds3", None),
    ("kt-mxfp4", "dsv4", None),
    ("kt-mxfp8", "mixtral", None),
]


SOURCES = {"ds3-fp8": "ds3-fp8", "mixtral": "mixtral", "dsv4": "dsv4"}


def prepare(args: argparse.Namespace) -> int:
    ds3, _ = make_source(args)
    fp8 = args.work / SOURCES["ds3-fp8"]
    if not (fp8 / "config.json").exists():  # multi-shard: kt's FP8 script reads the index
        subprocess.run(moeport(ds3, fp8, "--to", "fp8-block", "--max-shard-size", "200MB"), check=True)
    transformers_source(args, "mixtral", SOURCES["mixtral"])
    transformers_source(args, "deepseek_v4", SOURCES["dsv4"])
    return 0


def kt_scripts(args: argparse.Namespace) -> dict[str, Path]:
    out = {}
    for name in {j[2] for j in JOBS if j[2]}:
        path = args.work / f"{args.kt_ref}-{name}"
        if not path.exists():
            text = subprocess.run(
                ["git", "--git-dir", str(args.kt_repo), "show", f"{args.kt_ref}:kt-kernel/scripts/{name}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            path.write_text(text)
        out[name] = path
    return out


def transformers_source(args: argparse.Namespace, model_type: str, name: str) -> Path:
    """A BF16 checkpoint saved by transformers' own class: the tests' family config, scaled up."""
    out = args.work / name
    if (out / "config.json").exists():
        return out
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch
    from fixtures import COMMON, FAMILY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    big = {"hidden_size": 1024, "num_hidden_layers": args.layers, "vocab_size": 1024}
    experts = {"num_local_experts": 32, "n_routed_experts": 32}
    inter = {"intermediate_size": 512, "moe_intermediate_size": 512}
    over = {**COMMON, **FAMILY_CONFIGS[model_type], **big}
    over |= {k: v for k, v in {**experts, **inter}.items() if k in FAMILY_CONFIGS[model_type]}
    if model_type == "deepseek_v4":  # routed (not hash-routed) MoE in every layer: one router shape
        over["mlp_layer_types"] = ["moe"] * args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **over), dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def expert_bytes(src: Path) -> int:
    from moeport.detect import detect
    from moeport.sources import open_checkpoint

    with open_checkpoint(src) as ck:
        det = detect(ck)
        return sum(det.layer_expert_bytes[L] for L in det.moe_layers)


def moeport(src: Path, dst: Path, *args: str) -> list[str]:
    shutil.rmtree(dst, ignore_errors=True)
    return [
        sys.executable,
        "-m",
        "moeport",
        "convert",
        str(src),
        str(dst),
        *args,
        "--quiet",
        "--device",
        "cpu",
    ]


def kt_command(script: Path, to: str, src: Path, dst: Path, numa: int) -> list[str]:
    shutil.rmtree(dst, ignore_errors=True)
    if script.name.endswith("convert_cpu_weights.py"):
        return [
            sys.executable, "-c", RUNNER, str(script), "--input-path", str(src), "--input-type", "bf16",
            "--output", str(dst), "--quant-method", to.removeprefix("kt-"),
            "--cpuinfer-threads", str(os.cpu_count()), "--threadpool-count", str(numa),
        ]  # fmt: skip
    return [
        sys.executable,
        "-c",
        RUNNER,
        str(script),
        "--input-fp8-hf-path",
        str(src),
        "--output-bf16-hf-path",
        str(dst),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=0.5, help="size of the synthetic DeepSeek-V3 BF16 checkpoint")
    p.add_argument("--layers", type=int, default=4, help="layers of the Mixtral/DeepSeek-V4 sources")
    p.add_argument("--numa", type=int, default=2, help="T for kt-int4/kt-int8")
    p.add_argument("--work", type=Path, default=Path("/tmp/moeport-kt-methods"))
    p.add_argument("--kt-repo", type=Path, required=True, help="git dir of kvcache-ai/ktransformers")
    p.add_argument("--kt-ref", default="HEAD")
    p.add_argument("--only", nargs="*", help="targets to run (default: all)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        return prepare(args)
    # the sources are written by a child: a child's peak RSS (wait4) starts from its parent's at fork
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--prepare"], check=True)
    sources = {n: args.work / d for n, d in SOURCES.items()} | {"ds3": args.work / f"src-{args.gb:g}gb"}
    scripts = kt_scripts(args)
    rows = []
    for to, source, script in JOBS:
        if args.only and to not in args.only:
            continue
        src = sources[source]
        size = expert_bytes(src)
        extra = ["--numa", str(args.numa)] if to in ("kt-int4", "kt-int8") else []
        row = {"to": to, "source": source, "expert_bytes": size}
        row["moeport"] = timed(
            moeport(src, args.work / f"ours-{to}", "--to", to, *extra), args.work / f"{to}.log"
        )
        if script:
            cmd = kt_command(scripts[script], to, src, args.work / f"kt-{to}", args.numa)
            row["kt"] = timed(cmd, args.work / f"kt-{to}.log") | {"script": script}
        else:
            row["kt"] = None  # no kt-kernel script writes this method
        for tool in ("moeport", "kt"):
            if row[tool]:
                row[tool]["gb_per_s"] = size / row[tool]["seconds"] / 1e9
        rows.append(row)
        print(json.dumps(row))
    text = json.dumps({"cpus": os.cpu_count(), "kt_ref": args.kt_ref, "rows": rows}, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(r["moeport"]["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
