"""Where decode/quantize math runs: `cpu`, `cuda` (or `cuda:N`), or `auto`.

`auto` takes CUDA when usable, else the CPU: with its batches run by two host threads, an H200
host's GPU path is as fast as all 16 of its cores or faster on DeepSeek-V3-shaped experts (up to
1.26x, bench/RESULTS.md "Real-sized experts"), and it leaves the cores free.

Reads and writes stay on the host; only the math moves. Every codec gives the same bytes on both
(tests compare them), so the device is a speed choice, never a format choice.
"""

from __future__ import annotations

import torch

from moeport.errors import MoeportError


def resolve_device(name: str) -> str:
    if name == "auto":  # best effort: a CUDA that is present but cannot start leaves the CPU
        if not torch.cuda.is_available():
            return "cpu"
        try:
            return resolve_device("cuda")
        except MoeportError:
            return "cpu"
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


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Device -> host copy into pinned memory: a DMA at PCIe speed, where a copy into ordinary
    (pageable) memory runs at a few GB/s (measured on an H200, bench/RESULTS.md). torch caches
    freed pinned blocks, so after the first batches this allocates nothing new."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def stack_to(device: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-shape tensors on `device`. Host ones are gathered into one pinned buffer and
    copied in one asynchronous transfer (torch keeps that buffer until the copy has run)."""
    if device == "cpu" or not all(t.device.type == "cpu" for t in tensors):
        return torch.stack([t.to(device) for t in tensors])
    staging = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    torch.stack(tensors, out=staging)
    return staging.to(device, non_blocking=True)
