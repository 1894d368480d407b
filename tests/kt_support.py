"""Running kt-kernel (PyPI `kt-kernel`, AMX build) from tests: its own bytes for given bf16 experts.

kt-kernel's wrapper allocates with ``pin_memory=True``, which CPU-only torch rejects; `no_pin_memory`
wraps torch.empty/zeros/full to drop that argument (scoped via pytest's monkeypatch). Its CPUInfer
is a process-wide singleton built for one threadpool_count, so it is reset before each run.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch


def import_kt():
    """kt_kernel's KTMoEWrapper and experts_base module, or skip with the import error as reason."""
    try:
        import kt_kernel  # noqa: F401
        from kt_kernel import experts_base
        from kt_kernel.experts import KTMoEWrapper
    except Exception as e:  # ImportError, or its extension failing to load on this CPU
        pytest.skip(
            f"kt_kernel cannot import ({type(e).__name__}: {e}); pip install --no-deps kt-kernel==0.7.2"
        )
    return KTMoEWrapper, experts_base


def _drop_pin(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapped


def no_pin_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("empty", "zeros", "full"):
        monkeypatch.setattr(torch, name, _drop_pin(getattr(torch, name)))


def _reset_cpu_infer(monkeypatch: pytest.MonkeyPatch, base: type) -> None:
    """Forget the CPUInfer singleton: `cls._cpu_infer_instance = ...` sets it on the subclass used."""
    todo = [base]
    while todo:
        cls = todo.pop()
        monkeypatch.setattr(cls, "_cpu_infer_instance", None, raising=False)
        todo.extend(cls.__subclasses__())


def kt_wrapper(
    monkeypatch: pytest.MonkeyPatch,
    path: Path,
    layer: int,
    experts: int,
    per_token: int,
    hidden: int,
    inter: int,
    method: str,
    tp: int,
    cpu_save: bool,
):
    """A fresh KTMoEWrapper on CPU experts only (pin_memory dropped, CPUInfer singleton reset).
    cpu_save True: it quantizes the tensors it is given and writes them under `path`; False: it
    loads its weights from `path`."""
    KTMoEWrapper, experts_base = import_kt()
    no_pin_memory(monkeypatch)
    _reset_cpu_infer(monkeypatch, experts_base._MoEBase)
    return KTMoEWrapper(
        layer_idx=layer,
        num_experts=experts,
        num_experts_per_tok=per_token,
        hidden_size=hidden,
        moe_intermediate_size=inter,
        gpu_experts_mask=torch.zeros(experts, dtype=torch.bool),
        cpuinfer_threads=tp,
        threadpool_count=tp,
        weight_path=str(path),
        chunked_prefill_size=32,
        cpu_save=cpu_save,
        method=method,
    )


def kt_write_folder(
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    method: str,
    tp: int,
    layer: int = 0,
) -> Path:
    """kt-kernel quantizes bf16 gate/up [E, I, H] and down [E, H, I] and writes its folder form in out."""
    num_experts, inter, hidden = gate.shape
    out.mkdir(parents=True, exist_ok=True)
    wrapper = kt_wrapper(
        monkeypatch, out, layer, num_experts, min(2, num_experts), hidden, inter, method, tp, cpu_save=True
    )
    wrapper.load_weights_from_tensors(
        gate.contiguous(), up.contiguous(), down.contiguous(), torch.arange(num_experts, dtype=torch.int64)
    )
    del wrapper
    return out


def tp_slices(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, tp: int):
    """The test's own statement of kt's `numa.t` parts: gate/up rows and down columns
    [t*I/T, (t+1)*I/T) (moeport plans them as Split ops; this is what they must equal)."""
    s = gate.shape[0] // tp
    rows = [slice(t * s, (t + 1) * s) for t in range(tp)]
    return [(gate[r].contiguous(), up[r].contiguous(), down[:, r].contiguous()) for r in rows]
