"""What a GGUF of a hub checkpoint must hold, stated with gguf-py's and llama.cpp's own rules.

Names come from gguf-py's `get_tensor_name_map` (the table llama.cpp's converter uses; experts
are merged under `...experts.{proj}.weight` first, as it does); q/k rows of the llama arch are
permuted with the formula of llama.cpp's `LlamaModel.permute`; expected bytes come from
`gguf.quants.quantize`. Nothing here calls moeport.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ARCHS = {"qwen3_moe": "QWEN3MOE", "mixtral": "LLAMA", "deepseek_v3": "DEEPSEEK2"}
EXPERT = re.compile(r"^(?P<head>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (n_head_kv already chosen)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_gguf(tensors: dict[str, torch.Tensor], model_type: str, config: dict) -> dict[str, torch.Tensor]:
    """{GGUF name: float32 tensor} a converter following llama.cpp must write for `tensors`."""
    import gguf

    arch = getattr(gguf.MODEL_ARCH, ARCHS[model_type])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    stacks: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.float()
        if name.endswith("kv_b_proj.weight"):  # DeepseekV2Model: MLA's kv_b split, k_b transposed
            heads, nope = config["num_attention_heads"], config["qk_nope_head_dim"]
            kv_b = t.view(heads, t.shape[0] // heads, t.shape[-1])
            k_b, v_b = torch.split(kv_b, [nope, kv_b.shape[1] - nope], dim=1)
            out[names.get_name(name.replace("kv_b", "k_b"), try_suffixes=(".weight",))] = k_b.transpose(1, 2)
            out[names.get_name(name.replace("kv_b", "v_b"), try_suffixes=(".weight",))] = v_b
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")  # as DeepseekV2Model does
        if model_type == "mixtral" and name.endswith(("q_proj.weight", "k_proj.weight")):
            kv = name.endswith("k_proj.weight")
            t = llama_permute(t, config["num_key_value_heads" if kv else "num_attention_heads"])
        m = EXPERT.match(name)
        if m:
            stacks[f"{m['head']}.{m['proj']}.weight"][int(m["e"])] = t
            continue
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    for name, experts in stacks.items():
        stacked = torch.stack([experts[e] for e in range(len(experts))])
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = stacked
    return out


def read_gguf(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (GGML type name, raw data as gguf-py's reader gives it)} over a file or split set."""
    from gguf import GGUFReader

    files = sorted(path.glob("*.gguf")) if path.is_dir() else [path]
    out = {}
    for f in files:
        for t in GGUFReader(f).tensors:
            out[t.name] = (t.tensor_type.name, np.array(t.data))
    return out


def dequantized(kind: str, data: np.ndarray) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]).astype(np.float32))
