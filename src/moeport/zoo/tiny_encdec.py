"""Tiny configs of the encoder-decoder MoE models (Switch Transformers, NLLB-MoE).

Their configs name the common facts their own way (`d_ff`, `encoder_ffn_dim`, `num_decoder_layers`,
a sparse *step* instead of a list of MoE layers), so the shared tiny text fields do not reach
them: at transformers' defaults the decoder keeps 12 layers of 2048-4096 wide MLPs. Here both
stacks get the tiny depth, with every other layer a MoE layer (the real checkpoints' pattern:
switch-base-8's odd blocks, NLLB-MoE's every 4th layer), so each stack holds dense and MoE layers.
"""

from __future__ import annotations

from typing import Any


def _switch(t: dict[str, Any]) -> dict[str, Any]:
    """Switch Transformers: one `d_ff` for dense and expert MLPs; `num_sparse_*_layers` of the
    depth are sparse, block i when i % (depth / sparse) == 1."""
    layers = t["num_hidden_layers"]
    return dict(
        d_ff=t["moe_intermediate_size"],
        d_kv=t["head_dim"],
        num_decoder_layers=layers,
        num_sparse_encoder_layers=max(layers // 2, 1),
        num_sparse_decoder_layers=max(layers // 2, 1),
    )


def _nllb_moe(t: dict[str, Any]) -> dict[str, Any]:
    """NLLB-MoE: one FFN width per stack, used by dense and expert MLPs; layer i is sparse when
    (i + 1) % step == 0."""
    inter, heads = t["moe_intermediate_size"], t["num_attention_heads"]
    return dict(
        encoder_layers=t["num_hidden_layers"],
        decoder_layers=t["num_hidden_layers"],
        encoder_ffn_dim=inter,
        decoder_ffn_dim=inter,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        max_position_embeddings=128,
    )


ENCDEC_OVERRIDES = {"switch_transformers": _switch, "nllb-moe": _nllb_moe}
