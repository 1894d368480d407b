"""Bit packing of small integers into int32 words (LSB first), as GPTQ, AWQ and compressed-tensors do."""

from __future__ import annotations

import sys

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble slot i of an AWQ word holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_int32(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Unsigned values < 2^bits -> int32 words along `dim`, dense LSB-first (padded with zeros)."""
    if bits in (4, 8) and values.shape[dim] % (32 // bits) == 0 and sys.byteorder == "little":
        return _pack_bytes(values.movedim(dim, -1), bits).movedim(-1, dim)
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    words = -(-n * bits // 32)
    v = torch.nn.functional.pad(v, (0, -(-words * 32 // bits) - n))  # zero-fill the last word
    pos = torch.arange(v.shape[-1]) * bits
    word, shift = pos // 32, pos % 32
    out = torch.zeros(*v.shape[:-1], words + 2, dtype=torch.int64)
    # a value may straddle two words: its low bits go to one, its high bits to the next
    out.scatter_add_(-1, word.expand_as(v), (v << shift) & 0xFFFFFFFF)
    out.scatter_add_(-1, (word + 1).expand_as(v), v >> (32 - shift))
    out = out[..., :words]
    return (out - ((out >> 31) << 32)).to(torch.int32).movedim(-1, dim)  # reinterpret as signed int32


def unpack_int32(words: torch.Tensor, bits: int, count: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_int32: `count` unsigned values of `bits` bits along `dim` (int32 result)."""
    if bits in (4, 8) and sys.byteorder == "little":
        return _unpack_bytes(words.movedim(dim, -1), bits)[..., :count].movedim(-1, dim)
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))
    pos = torch.arange(count) * bits
    word, shift = pos // 32, pos % 32
    both = w[..., word] | (w[..., word + 1] << 32)
    return ((both >> shift) & ((1 << bits) - 1)).to(torch.int32).movedim(-1, dim)


def interleave_awq(values: torch.Tensor) -> torch.Tensor:
    """Columns in AWQ's nibble order (last dim a multiple of 8) before plain 4-bit packing."""
    v = values.reshape(*values.shape[:-1], -1, 8)
    return v[..., list(AWQ_ORDER)].reshape(values.shape)


def deinterleave_awq(values: torch.Tensor) -> torch.Tensor:
    v = values.reshape(*values.shape[:-1], -1, 8)
    return v[..., list(AWQ_REVERSE)].reshape(values.shape)


def _pack_bytes(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Fast path: on a little-endian host LSB-first int32 words are just the packed bytes in order."""
    b = v.to(torch.uint8)
    if bits == 4:
        b = b[..., 0::2] | (b[..., 1::2] << 4)
    # through a flat view: torch may leave a size-1 leading dim with an odd stride, which .view refuses
    return b.contiguous().reshape(-1).view(torch.int32).reshape(*b.shape[:-1], b.shape[-1] // 4)


def _unpack_bytes(words: torch.Tensor, bits: int) -> torch.Tensor:
    b = words.contiguous().view(torch.uint8)
    if bits == 4:
        b = torch.stack((b & 0x0F, b >> 4), dim=-1).flatten(-2)
    return b.to(torch.int32)
