"""The codec contract and the checks every codec shares.

A codec turns the companion tensors of one weight ("parts": `weight` + `weight_scale_inv`,
`qweight`/`scales`/`qzeros`, ...) into a float32 tensor [..., N, K] (`decode`) and back
(`encode`). Bad parts raise MoeportError naming the tensor and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from moeport.errors import MoeportError

Parts = Mapping[str, torch.Tensor]


class Codec(Protocol):
    name: str
    required: tuple[str, ...]  # parts that must be present to decode

    @property
    def stacked_decode(self) -> bool:
        """Whether `decode` takes a stack of same-shape weights (parts stacked on a new dim 0) in
        one call; callers decode the others one weight at a time."""
        ...

    @property
    def stacked_encode(self) -> bool:
        """Whether `encode` takes a stack [B, N, K] and returns every part stacked."""
        ...

    def decode(self, parts: Parts, where: str = "") -> torch.Tensor: ...

    def encode(self, weight: torch.Tensor) -> dict[str, torch.Tensor]: ...


class CodesCodec(Codec, Protocol):
    """A symmetric integer format that takes codes chosen elsewhere (GPTQ): its scale rule and how
    signed codes [N, K] (zero point 0, value = code * scale of the column's group) and per-group
    scales [N, G] become its parts. With the codes of round-to-nearest, `from_codes` gives `encode`'s
    bytes, so GPTQ with an identity Hessian writes exactly the codec's own RTN output."""

    @property
    def bits(self) -> int: ...

    def code_scale(self, weight: torch.Tensor) -> torch.Tensor: ...

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]: ...


def need(parts: Parts, names: tuple[str, ...], where: str, codec: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise MoeportError(f"{where}: {codec} needs tensor(s) {missing}; found {sorted(parts)}")


def check_dtype(t: torch.Tensor, allowed: tuple[torch.dtype, ...], where: str, part: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise MoeportError(f"{where}.{part}: dtype {str(t.dtype).removeprefix('torch.')}, expected {names}")


def check_shape(t: torch.Tensor, shape: tuple[int, ...], where: str, part: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise MoeportError(f"{where}.{part}: shape {list(t.shape)}, expected {list(shape)}")


def check_finite(scale: torch.Tensor, where: str, part: str) -> torch.Tensor:
    """Scales as float32; NaN/Inf (or E8M0's NaN byte 255) is corrupt data, not a value."""
    s = scale.float()
    if not torch.isfinite(s).all():
        bad = int((~torch.isfinite(s)).sum())
        raise MoeportError(f"{where}.{part}: {bad} scale value(s) are NaN or Inf")
    return s


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


CHUNK_ELEMENTS = 1 << 18  # ~1 MB of float32: temporaries of a chunk stay in cache (about 5x faster on CPU)


def row_chunks(n_rows: int, row_len: int, multiple: int = 1) -> list[slice]:
    """Row slices of about CHUNK_ELEMENTS elements each, sizes a multiple of `multiple` (e.g. a block)."""
    rows = max(multiple, (CHUNK_ELEMENTS // max(row_len, 1)) // multiple * multiple)
    return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


def divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor, correctly rounded on every device.

    CUDA turns a Python-scalar divisor into a multiply by its reciprocal (off by an ULP at times),
    which would make GPU output differ from CPU output; a 0-d tensor divisor keeps true division.
    """
    return t / torch.tensor(divisor, dtype=t.dtype, device=t.device)
