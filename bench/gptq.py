"""Calibrated GPTQ: moeport (streamed, one layer at a time) vs llmcompressor's `oneshot` GPTQ.

    python bench/gptq.py [--layers 2,6] [--hidden 256] [--experts 8] [--samples 32] [--seq-len 128]
                         [--work DIR] [--skip-llmc] [--spill]

For each depth, a seeded synthetic DeepSeek-V3-shaped BF16 checkpoint (moeport.synthetic) and the
same seeded random-id calibration set; then, each in its own process (peak RSS of the process
tree sampled every 10 ms, bench/convert_rss.py):
- `moeport convert --to w4a16 --method gptq --all-experts` (llmcompressor's MoE calibration);
- llmcompressor 0.14 `oneshot` + `GPTQModifier` (its venv, `.llmc` or MOEPORT_LLMC_PYTHON), same
  group size, dampening, block size, no act-order, routed experts only (same ignore list);
- with `--spill`, the same GPTQ job with `--spill-states` (the states in the staging folder);
- moeport RTN (`--to w4a16`), the floor.
Error: logit rel-L2 vs the BF16 model on held-out ids (transformers, float32). The point of the
two depths: moeport's peak RSS stays about one layer + the calibration states whatever the depth,
while a whole-model tool grows with it. Memory columns for moeport's GPTQ rows: `bound`, the
plan's stated bound for the walk (one float32 layer + the states in and out, or one chunk of
each when spilled, + the layer's Hessians: the "memory bound" note of `--dry-run`), `base`, the
peak of the same command with `--dry-run` (interpreter, imports, the family's model on `meta`, the
calibration ids: everything but the walk), and `walk` = peak - base, to be read against `bound`
(the rest of `walk` is one forward call's activations and the RTN plan's own buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from convert_rss import peak_rss
from scratch import work_dir

from moeport.synthetic import SyntheticSpec, write_synthetic

ROOT = Path(__file__).resolve().parents[1]
LLMC_PYTHON = os.environ.get("MOEPORT_LLMC_PYTHON") or str(ROOT / ".llmc" / "bin" / "python")
LLMC_JOB = r"""
import sys, json, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
src, dst, calib, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# the synthetic checkpoint has no tokenizer and oneshot wants a processor: the ids are given already
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
ids = json.load(open(calib))
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
ignore = ["lm_head", "re:.*embed_tokens.*", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*shared_expert.*",
          "re:model\\.layers\\.0\\.mlp\\..*"]
recipe = GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=ignore,
                      dampening_frac=0.01, block_size=128, actorder=None)
oneshot(model=model, dataset=ds, recipe=recipe, processor=tok, num_calibration_samples=len(ids),
        max_seq_length=len(ids[0]))
model.save_pretrained(dst, save_compressed=True)
"""


def logit_error(path: Path, reference: torch.Tensor, ids: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return float((out - reference).norm() / reference.norm())


def stated_bound(cmd: list[str]) -> float:
    """MiB: the walk's memory bound as the plan states it (`--dry-run --json` notes)."""
    done = subprocess.run([*cmd, "--dry-run", "--json"], capture_output=True, text=True, check=True)
    notes = " ".join(json.loads(done.stdout)["notes"])
    found = re.search(r"the RTN bound \+ ([\d.]+) MiB", notes)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,6")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--spill", action="store_true", help="also run GPTQ with --spill-states")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    work = work_dir(args.work, "gptq-bench-")
    g = torch.Generator().manual_seed(0)
    calib = work / "calib.json"
    work.mkdir(parents=True, exist_ok=True)
    calib.write_text(json.dumps(torch.randint(0, 512, (args.samples, args.seq_len), generator=g).tolist()))
    held_out = torch.randint(0, 512, (8, args.seq_len), generator=g)
    moeport = [sys.executable, "-m", "moeport", "convert"]
    w4 = ["--to", "w4a16", "--group-size", str(args.group_size), "--quiet", "--device", "cpu"]
    rows = []
    for depth in (int(d) for d in args.layers.split(",")):
        src = work / f"src-{depth}"
        if not (src / "config.json").exists():
            spec = SyntheticSpec(
                hidden_size=args.hidden, moe_intermediate_size=args.hidden // 2,
                n_routed_experts=args.experts,
                num_hidden_layers=depth, intermediate_size=2 * args.hidden,
            )  # fmt: skip
            write_synthetic(src, spec)
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            reference = ref_model(input_ids=held_out).logits
            del ref_model
        jobs = {
            "moeport GPTQ": [*moeport, str(src), str(work / f"gptq-{depth}"), *w4, "--method", "gptq",
                             "--calibration", str(calib), "--samples", str(args.samples),
                             "--seq-len", str(args.seq_len), "--all-experts", "--overwrite"],
        }  # fmt: skip
        if args.spill:
            jobs["moeport GPTQ spilled"] = [*jobs["moeport GPTQ"], "--spill-states"]
            jobs["moeport GPTQ spilled"][5] = str(work / f"gptq-spill-{depth}")
        jobs["moeport RTN"] = [*moeport, str(src), str(work / f"rtn-{depth}"), *w4, "--overwrite"]
        if not args.skip_llmc and Path(LLMC_PYTHON).exists():
            jobs["llmcompressor GPTQ"] = [LLMC_PYTHON, "-c", LLMC_JOB, str(src), str(work / f"llmc-{depth}"),
                                          str(calib), str(args.group_size)]  # fmt: skip
        for name, cmd in jobs.items():
            seconds, peak = peak_rss(cmd)
            out = Path(cmd[5] if name.startswith("moeport") else cmd[4])
            err = logit_error(out, reference, held_out)
            row = {"layers": depth, "tool": name, "seconds": round(seconds, 1),
                   "peak_rss_mb": round(peak / 2**20), "logit_rel_l2": round(err, 5)}  # fmt: skip
            if name.startswith("moeport GPTQ"):
                base = peak_rss([*cmd, "--dry-run"])[1] / 2**20
                row |= {"bound_mb": round(stated_bound(cmd), 1), "base_mb": round(base),
                        "walk_mb": round(peak / 2**20 - base)}  # fmt: skip
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print("\n| layers | tool | wall s | peak RSS MB | logit rel-L2 | bound MB | base MB | walk MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        keys = ("layers", "tool", "seconds", "peak_rss_mb", "logit_rel_l2", "bound_mb", "base_mb", "walk_mb")
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
