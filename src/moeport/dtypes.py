"""safetensors dtype names <-> torch dtypes and their storage sizes.

safetensors' own Python mapping lacks some 8-bit float names, so we keep the full table here,
keyed by the strings that appear in safetensors headers.
"""

from __future__ import annotations

import torch

# header dtype string -> (torch dtype, bits per element)
_SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 8),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "U16": (torch.uint16, 16),
    "I16": (torch.int16, 16),
    "U32": (torch.uint32, 32),
    "I32": (torch.int32, 32),
    "U64": (torch.uint64, 64),
    "I64": (torch.int64, 64),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F32": (torch.float32, 32),
    "F64": (torch.float64, 64),
    "C64": (torch.complex64, 64),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
}
_BITS_ONLY = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}  # sub-byte types we can describe but not stream

_NAME_BY_TORCH = {dt: name for name, (dt, _) in _SAFETENSORS_DTYPES.items()}


def known_dtype(name: str) -> bool:
    return name in _SAFETENSORS_DTYPES or name in _BITS_ONLY


def bits_of(name: str) -> int:
    """Bits per element of a safetensors dtype string."""
    if name in _SAFETENSORS_DTYPES:
        return _SAFETENSORS_DTYPES[name][1]
    return _BITS_ONLY[name]


def nbytes_of(name: str, shape: tuple[int, ...] | list[int]) -> int:
    """Storage bytes of a tensor; sub-byte types must fill whole bytes (as safetensors requires)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel * bits_of(name) // 8


def torch_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string (sub-byte types have none)."""
    try:
        return _SAFETENSORS_DTYPES[name][0]
    except KeyError:
        raise ValueError(f"safetensors dtype {name} has no torch equivalent") from None


def safetensors_name_of(dtype: torch.dtype) -> str:
    try:
        return _NAME_BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no safetensors equivalent") from None
