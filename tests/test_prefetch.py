"""The read-ahead thread gives back exactly what a direct read gives, in any order, within its budget."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from moeport.sources import open_checkpoint
from moeport.sources.prefetch import Prefetcher


def test_prefetch_returns_the_same_tensors_in_any_order(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(64, 64 + i, generator=g).to(torch.bfloat16) for i in range(12)}
    tensors["big"] = torch.randn(512, 512, generator=g)  # 1 MiB: larger than the budget, read directly
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        order = [*tensors]
        fetch = Prefetcher(ck, order, budget=40_000)
        got = {n: fetch.get(n) for n in [order[3], *order[:3], *order[4:]]}  # one out of order
        fetch.close()
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_prefetch_budget_is_respected(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(128, 128, generator=g) for i in range(8)}  # 64 KiB each
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        fetch = Prefetcher(ck, list(tensors), budget=3 * 65536)
        import time

        time.sleep(0.2)  # let the reader run ahead as far as it may
        assert fetch._held <= 3 * 65536 and len(fetch._ready) == 3
        assert all(torch.equal(fetch.get(n), t) for n, t in tensors.items())
        fetch.close()


def test_each_tensor_is_read_once_while_readers_race_the_consumer(tmp_path) -> None:
    """A tensor being read ahead when it is asked for is waited for, not read a second time, and
    the budget comes back whole (nothing is left stranded in the ready set)."""
    import threading
    import time

    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(32, 32 + i, generator=g) for i in range(40)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as ck:
        reads: list[str] = []
        lock = threading.Lock()
        real_read = ck.read

        def slow_read(name: str) -> torch.Tensor:
            with lock:
                reads.append(name)
            time.sleep(0.002)  # widen the window in which a get meets a read in flight
            return real_read(name)

        ck.read = slow_read  # type: ignore[method-assign]
        fetch = Prefetcher(ck, list(tensors), budget=4 * 32 * 80 * 4, readers=3)
        got = {n: fetch.get(n) for n in tensors}
        fetch.close()
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert sorted(reads) == sorted(tensors)  # every tensor read exactly once
    assert fetch._held == 0 and not fetch._ready
