"""Output targets: each is one recipe (a plan of ops over the source) plus one sink.

`TARGETS` is the only list of targets: the CLI's `--to` choices, its help, the demo and the
README read it. Adding a target is a recipe module and one line here.
"""

from __future__ import annotations

from moeport.recipes import fp4, gguf, gptq, gpu, hf, kt, kt_native
from moeport.recipes.base import Options, Target, job_recipe

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        hf.TARGET,
        *(gptq.with_method(t) if t.name in gpu.INT_SCHEMES else t for t in gpu.TARGETS),
        *fp4.TARGETS,
        *kt.TARGETS,
        *kt_native.TARGETS,
        gguf.TARGET,
    )
}

__all__ = ["TARGETS", "Options", "Target", "job_recipe"]
