"""GPTQ (Frantar et al., 2022) for one weight: codes that minimise the layer-output error
||W X - Q X|| given the input Hessian H = 2 X X^T / n, with fixed scales.

Written with torch by hand because the reference kernel (llmcompressor's `quantize_weight`) lives in
a library that pins its own compressed-tensors; this one follows it step for step (dead columns,
dampening as a fraction of mean(diag H), upper Cholesky factor of H^-1, lazy block updates) so that
for the same weight, Hessian and scales it gives the same codes, and with H = I exactly RTN's.
Scales are the min-max (RTN) scales of the original weight, as llmcompressor's observer gives them.
"""

from __future__ import annotations

import torch

from moeport.codecs.int_rtn import int_range

BLOCK = 128  # columns per lazy-update block (llmcompressor's default)


def inverse_factor(h: torch.Tensor, dampening: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damp I)^-1, or None when H is not positive definite even after
    dampening (the weight then falls back to RTN)."""
    h = h.clone()
    diag = torch.diagonal(h)
    diag.add_(dampening * diag.mean())
    low, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    inv = torch.cholesky_inverse(low)
    upper, info = torch.linalg.cholesky_ex(inv, upper=True)
    return None if int(info) != 0 else upper


def gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    dampening: float = 0.01,
    act_order: bool = False,
    block: int = BLOCK,
) -> torch.Tensor | None:
    """Signed int8 codes [N, K] of `weight` [N, K] for per-group `scale` [N, G] (symmetric, zero
    point 0), or None when the Hessian cannot be factorised. act_order: columns are quantized in
    decreasing order of diag(H), each still with the scale of its own group (static order: no
    g_idx in the output, the format stays the RTN one)."""
    qmin, qmax = int_range(bits)
    w = weight.float().clone()
    h = hessian.float().clone()
    n, k = w.shape
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):  # inputs never seen: their columns cannot matter to the output
        torch.diagonal(h)[dead] = 1.0
        w[:, dead] = 0
    col_scale = scale.float().repeat_interleave(k // scale.shape[-1], dim=-1)  # [N, K]
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h, col_scale = w[:, perm], h[perm][:, perm], col_scale[:, perm]
    hinv = inverse_factor(h, dampening)
    if hinv is None:
        return None
    codes = torch.empty(n, k, dtype=torch.int8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s = w1[:, i], col_scale[:, i1 + i]
            q = torch.round(col / s).clamp(qmin, qmax)
            codes[:, i1 + i] = q.to(torch.int8)
            err = (col - q * s) / h1[i, i]
            err1[:, i] = err
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes
