"""`--device`: names resolve to where the math runs; a wrong one is a one-line error."""

from __future__ import annotations

import pytest
import torch

from moeport.device import resolve_device, stack_to, to_host
from moeport.errors import MoeportError


def test_names_resolve() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MoeportError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(MoeportError, match="--device cuda: this torch build sees no CUDA device"):
        resolve_device("cuda")


def test_stack_and_copy_back_keep_values() -> None:
    g = torch.Generator().manual_seed(3)
    device = resolve_device("auto")
    parts = [torch.randn(5, 7, generator=g).to(torch.bfloat16) for _ in range(4)]
    stacked = stack_to(device, parts)
    assert stacked.shape == (4, 5, 7) and stacked.device.type == torch.device(device).type
    back = to_host(stacked)
    assert back.device.type == "cpu" and all(torch.equal(back[i], p) for i, p in enumerate(parts))
