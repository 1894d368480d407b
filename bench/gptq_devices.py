"""`--method gptq` on the CPU and on CUDA: the same output within a stated tolerance.

    python bench/gptq_devices.py [--devices cpu,cuda] [--layers 4] [--samples 64] [--seq-len 128]
                                 [--work DIR] [--json FILE]

Builds a tiny DeepSeek-V3 checkpoint with transformers' own DeepseekV3ForCausalLM (seeded random
init, BF16, `save_pretrained`) and a seeded random-id calibration set, then for each device runs
`moeport convert --to w4a16 --method gptq --device DEVICE` (a fresh process each) and compares
every output with the first device's:
- codes: the int4 codes of every quantized weight (unpacked from `weight_packed`), the fraction
  that differ and the largest difference; scales: the fraction of `weight_scale` values that
  differ (min-max scales of the same weights: expected 0);
- logits: the rel-L2 error vs the BF16 model on held-out ids, for each device's output (decoded
  by `moeport convert --to hf --dtype fp32`, then run by transformers in float32 on the CPU), and
  the rel-L2 between the two outputs' logits.
Tolerance (the check that sets the exit status): each output's logit error within 2% (relative)
of the first device's, and at most 5% of the codes differing. Why not bit-identical: the Hessians
are sums over thousands of tokens, accumulated in a different order by the CPU's and the GPU's
matmuls (float32, last-bit differences); GPTQ rounds column after column and feeds each rounding
error into the next columns, so a near-tie that rounds the other way changes the rest of that row
(an equally good solution), and the next layer sees slightly different states.
A device this machine lacks (no CUDA) is skipped and said so. `cpu-1` is the CPU pinned to one
core (a different summation order on the same hardware: the size of this effect without a GPU).
Needs torch, transformers, safetensors and moeport only (not compressed-tensors: the outputs are
decoded by moeport itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from scratch import work_dir

from moeport.codecs.packing import unpack_int32

LOGIT_TOLERANCE = 0.02  # relative difference of the logit errors
CODE_TOLERANCE = 0.05  # fraction of differing int4 codes


def build_checkpoint(path: Path, layers: int) -> None:
    """A tiny DeepSeek-V3 (MLA attention, 1 dense + MoE layers, sigmoid group routing) saved by
    transformers itself."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    if (path / "config.json").exists():
        return
    cfg = DeepseekV3Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
        n_shared_experts=1, n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(path)


def moeport(*args: str, cores: set[int] | None = None) -> float:
    """Run `python -m moeport ARGS` (optionally pinned to `cores`); its wall seconds."""
    start = time.perf_counter()
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    done = subprocess.run(
        [sys.executable, "-m", "moeport", *args, "--quiet"], capture_output=True, text=True, preexec_fn=pin
    )
    if done.returncode:
        raise SystemExit(f"moeport {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def codes_of(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """weight name -> (int4 codes [N, K], scales) of every quantized weight of an output."""
    found = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if key.endswith(".weight_packed"):
                    base = key.removesuffix("_packed")
                    n, k = (int(d) for d in f.get_tensor(base + "_shape"))
                    codes = unpack_int32(f.get_tensor(key), 4, k)[:n]
                    found[base] = (codes, f.get_tensor(base + "_scale"))
    return found


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def compare(work: Path, devices: list[str], layers: int, samples: int, seq_len: int) -> dict:
    """Run every available device; rows of times, code/scale differences and logit errors, and
    whether every device is within the tolerance of the first."""
    src = work / "src"
    build_checkpoint(src, layers)
    g = torch.Generator().manual_seed(0)
    calib = work / "calib.json"
    calib.write_text(json.dumps(torch.randint(0, 512, (samples, seq_len), generator=g).tolist()))
    held_out = torch.randint(0, 512, (8, seq_len), generator=g)
    reference = logits(src, held_out)
    rows, skipped, first = [], [], None
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            skipped.append(f"{device}: no CUDA device here, skipped")
            continue
        out, deq = work / f"gptq-{device}", work / f"deq-{device}"
        cores = {min(os.sched_getaffinity(0))} if device == "cpu-1" else None
        seconds = moeport(
            "convert", str(src), str(out), "--to", "w4a16", "--group-size", "128", "--method", "gptq",
            "--calibration", str(calib), "--samples", str(samples), "--seq-len", str(seq_len),
            "--device", device.removesuffix("-1"), "--overwrite", cores=cores,
        )  # fmt: skip
        moeport(
            "convert", str(out), str(deq), "--to", "hf", "--dtype", "fp32", "--device", "cpu", "--overwrite"
        )
        ours, codes = logits(deq, held_out), codes_of(out)
        row = {"device": device, "seconds": round(seconds, 1), "logit_rel_l2": round(rel(ours, reference), 6)}
        if first is None:
            first = (codes, ours, row)
        else:
            base_codes, base_logits, base_row = first
            total = sum(c.numel() for c, _ in codes.values())
            differ = sum(int((c != base_codes[k][0]).sum()) for k, (c, _) in codes.items())
            worst = max(int((c.int() - base_codes[k][0].int()).abs().max()) for k, (c, _) in codes.items())
            scales = sum(int((s != base_codes[k][1]).sum()) for k, (_, s) in codes.items())
            scale_total = sum(s.numel() for _, s in codes.values())
            err_gap = abs(row["logit_rel_l2"] - base_row["logit_rel_l2"]) / base_row["logit_rel_l2"]
            row |= {
                "vs": base_row["device"], "codes_differing": round(differ / total, 6), "max_code_diff": worst,
                "scales_differing": round(scales / scale_total, 6),
                "logits_vs_first_rel_l2": round(rel(ours, base_logits), 6),
                "logit_error_gap": round(err_gap, 4),
                "within_tolerance": differ / total <= CODE_TOLERANCE and err_gap <= LOGIT_TOLERANCE,
            }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"rows": rows, "skipped": skipped, "ok": all(r.get("within_tolerance", True) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cpu-1, cuda, cuda:N")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    work = work_dir(args.work, "gptq-devices-")
    work.mkdir(parents=True, exist_ok=True)
    result = compare(work, args.devices.split(","), args.layers, args.samples, args.seq_len)
    for line in result["skipped"]:
        print(line)
    head = ("device | vs | wall s | logit rel-L2 | codes differing | max code diff | scales differing | "
            "logits vs first | error gap | within tolerance")  # fmt: skip
    print(f"\n| {head} |\n" + "|---" * 10 + "|")
    keys = ("device", "vs", "seconds", "logit_rel_l2", "codes_differing", "max_code_diff", "scales_differing",
            "logits_vs_first_rel_l2", "logit_error_gap", "within_tolerance")  # fmt: skip
    for r in result["rows"]:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
