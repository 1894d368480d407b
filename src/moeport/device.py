"""Where decode/quantize math runs: `cpu`, `cuda` (or `cuda:N`), or `auto` (CUDA when present).

Reads and writes stay on the host; only the math moves. Every codec gives the same bytes on both
(tests compare them), so the device is a speed choice, never a format choice.
"""

from __future__ import annotations

import torch

from moeport.errors import MoeportError


def resolve_device(name: str) -> str:
    if name == "auto":
        return resolve_device("cuda") if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MoeportError(f"--device {name}: this torch build sees no CUDA device")
        try:
            torch.zeros(1, device=name)  # initialise CUDA now, not inside the first layer
        except (RuntimeError, AssertionError) as exc:
            raise MoeportError(f"--device {name}: {exc}") from None
        return name
    raise MoeportError(f"--device {name}: expected cpu, cuda, cuda:N or auto")


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """Host -> device copy; asynchronous when the host tensor is pinned."""
    if device == "cpu" or t.device.type != "cpu":
        return t
    return t.to(device, non_blocking=t.is_pinned())
