"""Synthetic DeepSeek-V3-shaped checkpoints (seeded random weights) for the demo and benchmarks.

The tensor names and shapes are those of transformers' DeepseekV3ForCausalLM hub layout, so the
output is a real checkpoint (transformers can load it); sizes scale from tiny to many GB. Tensors
are generated one at a time and streamed through the sharded writer: memory stays at one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moeport.sinks import ShardedWriter, TensorSpec
from moeport.sinks.sharded import DEFAULT_MAX_SHARD_BYTES


@dataclass(frozen=True)
class SyntheticSpec:
    hidden_size: int = 256
    intermediate_size: int = 512  # dense MLP layers
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 16
    v_head_dim: int = 16
    vocab_size: int = 512
    dtype: str = "bfloat16"
    seed: int = 0

    @classmethod
    def tiny(cls) -> SyntheticSpec:
        return cls()

    @classmethod
    def of_size(cls, gigabytes: float, **overrides: int) -> SyntheticSpec:
        """DeepSeek-V3 proportions scaled down; enough MoE layers to reach about `gigabytes` of BF16."""
        base = dict(
            hidden_size=1024,
            intermediate_size=2048,
            moe_intermediate_size=512,
            n_routed_experts=64,
            q_lora_rank=256,
            kv_lora_rank=128,
            num_attention_heads=8,
            vocab_size=4096,
        )
        base.update(overrides)
        per_layer = (
            3 * base["hidden_size"] * base["moe_intermediate_size"] * (base["n_routed_experts"] + 1) * 2
        )
        layers = max(2, round(gigabytes * 1e9 / per_layer) + 1)
        return cls(num_hidden_layers=layers, **base)  # type: ignore[arg-type]

    def config(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in ("dtype", "seed")}
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **fields,
            "num_key_value_heads": self.num_attention_heads,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "dtype": self.dtype,
        }

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        H, heads = self.hidden_size, self.num_attention_heads
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        yield "model.embed_tokens.weight", (self.vocab_size, H)
        for L in range(self.num_hidden_layers):
            p = f"model.layers.{L}."
            yield p + "input_layernorm.weight", (H,)
            yield p + "post_attention_layernorm.weight", (H,)
            a = p + "self_attn."
            yield a + "q_a_proj.weight", (self.q_lora_rank, H)
            yield a + "q_a_layernorm.weight", (self.q_lora_rank,)
            yield a + "q_b_proj.weight", (heads * qk_head, self.q_lora_rank)
            yield a + "kv_a_proj_with_mqa.weight", (self.kv_lora_rank + self.qk_rope_head_dim, H)
            yield a + "kv_a_layernorm.weight", (self.kv_lora_rank,)
            yield (
                a + "kv_b_proj.weight",
                (heads * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
            )
            yield a + "o_proj.weight", (H, heads * self.v_head_dim)
            if L < self.first_k_dense_replace:
                yield from _mlp(p + "mlp.", H, self.intermediate_size)
                continue
            yield p + "mlp.gate.weight", (self.n_routed_experts, H)
            yield p + "mlp.gate.e_score_correction_bias", (self.n_routed_experts,)
            for E in range(self.n_routed_experts):
                yield from _mlp(f"{p}mlp.experts.{E}.", H, self.moe_intermediate_size)
            yield from _mlp(p + "mlp.shared_experts.", H, self.moe_intermediate_size * self.n_shared_experts)
        yield "model.norm.weight", (H,)
        yield "lm_head.weight", (self.vocab_size, H)


def _mlp(prefix: str, hidden: int, inter: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield prefix + "gate_proj.weight", (inter, hidden)
    yield prefix + "up_proj.weight", (inter, hidden)
    yield prefix + "down_proj.weight", (hidden, inter)


def _random_tensor(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    if len(shape) == 1:  # norms and biases: near 1 / small, like trained weights
        base = 1.0 if "norm" in name else 0.0
        return (base + 0.05 * torch.randn(shape, generator=gen)).to(
            torch.float32 if "bias" in name else dtype
        )
    std = shape[-1] ** -0.5
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def write_synthetic(
    out_dir: str | Path, spec: SyntheticSpec, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write config.json and the weights of `spec` into `out_dir`, streaming one tensor at a time."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, spec.dtype)
    dtype_name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
    shapes = list(spec.tensor_shapes())
    specs = [TensorSpec(n, "F32" if n.endswith("bias") else dtype_name, s) for n, s in shapes]
    gen = torch.Generator().manual_seed(spec.seed)
    with ShardedWriter(out, specs, max_shard_bytes=max_shard_bytes) as writer:
        for name, shape in shapes:
            writer.write(name, _random_tensor(name, shape, dtype, gen))
    (out / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    return out
